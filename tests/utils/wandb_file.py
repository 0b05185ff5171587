"""Read back offline W&B runs from their `run-<id>.wandb` transaction logs."""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

# Layout (LevelDB log format, with wandb's own file header and CRC flavour):
# file header "<4sHB": b":W&B", magic 0xBEE1, version 0; it occupies the first
# 7 bytes of block 0. Then 32 KiB blocks of records, each "<IHB" (crc32, length,
# type) + payload; a record never straddles a block, so long payloads are split
# FIRST/MIDDLE.../LAST, and a block tail shorter than a header is zero padding.
# The checksum is plain zlib CRC32 (IEEE, unmasked) over the type byte + payload.
FILE_HEADER = struct.Struct("<4sHB")
IDENT, MAGIC = b":W&B", 0xBEE1
REC_HEADER = struct.Struct("<IHB")
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_payloads(path: Path):
    """Yield each logical record's bytes, checking every chunk's CRC."""
    data = Path(path).read_bytes()
    ident, magic, _version = FILE_HEADER.unpack_from(data, 0)  # version 0 as of wandb 0.31
    if ident != IDENT or magic != MAGIC:
        raise ValueError(f"{path}: not a W&B transaction log (header {data[:7]!r})")
    pos, parts = FILE_HEADER.size, None
    while pos + REC_HEADER.size <= len(data):
        if BLOCK - pos % BLOCK < REC_HEADER.size:  # zero trailer: skip to next block
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, rtype = REC_HEADER.unpack_from(data, pos)
        start = pos + REC_HEADER.size
        chunk = data[start : start + length]
        if crc == 0 and length == 0 and rtype == 0:  # preallocated / padding zeros
            break
        if len(chunk) < length:
            raise ValueError(f"{path}: truncated record at offset {pos}")
        if zlib.crc32(chunk, zlib.crc32(bytes([rtype]))) != crc:
            raise ValueError(f"{path}: CRC mismatch at offset {pos}")
        if rtype == FULL:
            yield chunk
        elif rtype == FIRST:
            parts = [chunk]
        elif rtype in (MIDDLE, LAST) and parts is not None:
            parts.append(chunk)
            if rtype == LAST:
                yield b"".join(parts)
                parts = None
        else:
            raise ValueError(f"{path}: unexpected record type {rtype} at offset {pos}")
        pos = start + length


def iter_records(path: Path):
    """Yield each record as a `wandb_internal_pb2.Record`."""
    for payload in iter_payloads(path):
        rec = pb.Record()
        rec.ParseFromString(payload)
        yield rec


def _value(item) -> object:
    """An item's value: JSON text in value_json, or (history only) one typed field."""
    if item.value_json:
        return json.loads(item.value_json)
    kind = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if kind is None or kind == "none":
        return None
    value = getattr(item, kind)
    return json.loads(value) if kind == "json" else value


def _put(target: dict, item, value) -> None:
    """Set a value at its key, or at its nested_key path (["a", "b"] is target["a"]["b"])."""
    path = list(item.nested_key) or [item.key]
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = value


def _drop(target: dict, item) -> None:
    path = list(item.nested_key) or [item.key]
    for part in path[:-1]:
        target = target.get(part, {})
    target.pop(path[-1], None)


def read_run(path: Path) -> dict:
    """The run's metadata, config, history rows and final summary, values JSON-decoded.

    The `_wandb` config key (wandb's own bookkeeping) is returned apart, as `wandb_internal`;
    `exit_code` is None when the run never finished (or wandb-core had not yet flushed the file).
    """
    run = dict(run_id=None, project=None, group=None, job_type=None, name=None, tags=[],
               config={}, history=[], summary={}, wandb_internal={}, exit_code=None)
    for rec in iter_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            run.update(run_id=r.run_id, project=r.project, group=r.run_group, job_type=r.job_type,
                       name=r.display_name, tags=list(r.tags))
            for item in r.config.update:
                _put(run["config"], item, _value(item))
            for item in r.summary.update:
                _put(run["summary"], item, _value(item))
        elif kind in ("config", "summary"):
            section = getattr(rec, kind)
            for item in section.update:
                _put(run[kind], item, _value(item))
            for item in section.remove:
                _drop(run[kind], item)
        elif kind == "history":
            row: dict = {}
            for item in rec.history.item:
                _put(row, item, _value(item))
            run["history"].append(row)
        elif kind == "exit":  # written by finish(): without it the file is incomplete
            run["exit_code"] = rec.exit.exit_code
    run["wandb_internal"] = run["config"].pop("_wandb", {})
    return run


def find_runs(run_dir: Path) -> list:
    """The `.wandb` files under run_dir/wandb, oldest first.

    Run folders are `[offline-]run-<YYYYmmdd_HHMMSS>-<id>[-<n>]`; wandb adds `-<n>` when a
    folder of the same second already exists, so order by time, then by that counter.
    """
    def order(path: Path):
        match = re.match(r"(?:offline-)?run-(\d{8}_\d{6})-.+?(?:-(\d+))?$", path.parent.name)
        return (match.group(1), int(match.group(2) or 0)) if match else (path.parent.name, 0)

    return sorted(Path(run_dir, "wandb").glob("*run-*/run-*.wandb"), key=order)
