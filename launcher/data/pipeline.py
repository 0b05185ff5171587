"""prepare_data: files -> examples -> (held-out eval, mixing) -> packed or padded rows, cached on disk.

Only local rank 0 of a node builds; the other local ranks wait for the cache's completion marker
(no torch collective: its 30-minute default timeout kills ranks while big data is tokenised).
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from launcher import caches
from launcher.atomic import build_once
from launcher.data import token_cache as cache
from launcher.data.errors import BAD_ROW_REASONS, DataError
from launcher.data.examples import BLANK, LENGTH_STATUSES, ExampleBuilder, example_features
from launcher.data.files import Source, sources
from launcher.data.formats import load_raw
from launcher.data.packing import best_fit_decreasing, write_rows
from launcher.data.templates import resolve_template
from launcher.schema import MIN_SEQ_LEN, DataConfig, choice_fields, one_of, plain

# Bump when the output of the same inputs changes (tests/unit/test_cache_versions.py fails until you
# do). The cache key also carries a digest of this package's source and of the libraries that
# decide the rows, so even an unbumped edit never reads rows that older code wrote.
VERSION = 3  # 3: text NFC-normalised
LIBRARIES = ("transformers", "tokenizers", "datasets", "jinja2", "numpy", "pyarrow", "pandas")


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset: input_ids, labels, position_ids; packed rows are exactly seq_len
    eval: Any  # datasets.Dataset in the same form, or None without eval_files / eval_fraction
    eval_prompts: List[dict]  # [{"messages": prompt turns, "answer": last assistant text}], eval order
    stats: Dict[str, Any]  # flat and JSON-able: counts by reason, tokens, packing efficiency, cache


def prepare_data(data_cfg, tokenizer, *, local_rank: int = 0,
                 cache_root: Optional[str] = None, log: Callable[[str], Any] = print) -> PreparedData:
    """Tokenise, mask, pack and cache the data; every local rank returns the same PreparedData.

    Which rows exist (eval_fraction holdout, mixing) and how they are packed follow data.split_seed
    alone, so runs that differ only in the training seed (which orders the samples, in the trainer's
    sampler) share the rows, the eval set and the cache.

    With data.template set, the tokenizer's chat_template is replaced by it, so generation and the
    exported tokenizer use the template the model was trained with.
    """
    start = time.perf_counter()
    cfg = _plain(data_cfg)
    _check(cfg)
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("the data pipeline needs a fast tokenizer (it masks through offset mappings)")
    try:
        train_src = sources(cfg["train_files"], "data.train_files")
        eval_src = sources(cfg.get("eval_files"), "data.eval_files")
    except FileNotFoundError as e:
        raise DataError(f"data.train_files / data.eval_files: no file matches {e}") from None
    if not train_src:
        raise DataError("data.train_files names no file")
    label, template = ("none", None) if cfg["format"] == "text" else resolve_template(cfg.get("template"), tokenizer)
    if cfg.get("template") is not None:
        tokenizer.chat_template = template
    root = cache.cache_root(cache_root or cfg.get("cache_dir"))
    key = cache.cache_key({
        "version": VERSION, "code": caches.code_digest(str(Path(__file__).parent), LIBRARIES),
        "split_seed": cfg["split_seed"], "template": template, "tokenizer": cache.tokenizer_fingerprint(tokenizer),
        "train": [cache.source_key(s, root) for s in train_src], "eval": [cache.source_key(s, root) for s in eval_src],
        "pad_id": _pad_id(tokenizer),
        **{k: cfg.get(k) for k in ("format", "seq_len", "packing", "train_on", "truncation", "on_bad_row", "eval_fraction")},
    })
    final = root / key
    if local_rank == 0:
        hit = build_once(final, lambda tmp: _build(tmp, cfg, tokenizer, template, train_src, eval_src, log))
    else:
        cache.wait_for(final, float(cfg.get("prepare_timeout_min") or 120), log)
        hit = True
    data = load_prepared(final)
    data.stats.update(template=label, cache_key=key, cache_hit=hit, prepare_seconds=round(time.perf_counter() - start, 3))
    log(summary(data.stats))
    for note in data.stats.get("dropped_for_length_rows", []):
        log(f"data: {note}")
    return data


def load_prepared(path: Path) -> PreparedData:
    from datasets import Dataset

    ev = path / "eval.arrow"
    return PreparedData(
        train=Dataset.from_file(str(path / "train.arrow")),
        eval=Dataset.from_file(str(ev)) if ev.exists() else None,
        eval_prompts=json.loads((path / "prompts.json").read_text()),
        stats=json.loads((path / "stats.json").read_text()),
    )


def summary(stats: Dict[str, Any]) -> str:
    skipped = ", ".join(f"{k[8:]} {v}" for k, v in stats.items() if k.startswith("skipped_") and v)
    text = (f"data: {stats['rows_read']} rows read, {stats['rows_kept']} kept, {stats['rows_skipped']} skipped"
            f"{f' ({skipped})' if skipped else ''}, {stats['truncated']} truncated, "
            f"{stats['dropped_for_length']} dropped for length; train {stats['train_examples']} examples in "
            f"{stats['train_sequences']} sequences, {stats['train_trained_tokens']} trained tokens")
    if "train_packing_efficiency" in stats:
        text += f", packing efficiency {stats['train_packing_efficiency']:.3f}"
    if "eval_examples" in stats:
        text += f"; eval {stats['eval_examples']} examples, {stats['eval_prompts']} prompts"
    if "cache_hit" in stats:
        text += f" (cache {'hit' if stats['cache_hit'] else 'built'}, {stats['prepare_seconds']:.1f} s)"
    return text


# ---------------------------------------------------------------------------------------------- build
def _build(tmp: Path, cfg: dict, tokenizer, template, train_src, eval_src, log) -> None:
    from datasets import concatenate_datasets

    builder = ExampleBuilder(tokenizer, template, cfg["format"], cfg["train_on"], cfg["seq_len"], cfg["truncation"])
    counts: Dict[str, int] = {"rows_read": 0, "truncated": 0, "dropped_for_length": 0,
                              **{f"skipped_{r}": 0 for r in BAD_ROW_REASONS}}
    notes: List[str] = []  # which rows were dropped for length, per file
    parts, kept = [], {}  # kept[(split, source index)] = global indices into the concatenated pool
    offset = 0
    for split, srcs in (("train", train_src), ("eval", eval_src)):
        for si, src in enumerate(srcs):
            idx = []
            for path in src.files:
                ds, keep = _tokenise_file(path, len(parts), builder, tmp / "scratch", cfg, counts, notes, log)
                parts.append(ds)
                idx.append(keep + offset)
                offset += len(ds)
            kept[split, si] = np.concatenate(idx) if idx else np.zeros(0, np.int64)
    pool = concatenate_datasets(parts)
    lengths, trained = _column(pool, "length").astype(np.int64), _column(pool, "trained").astype(np.int64)

    train_idx, eval_idx = [], []
    for si, src in enumerate(train_src):
        rng = np.random.default_rng([cfg["split_seed"], si])  # not the training seed: a seed sweep shares rows
        mine = kept["train", si]
        if not eval_src and cfg.get("eval_fraction"):
            held = rng.permutation(len(mine))[: round(cfg["eval_fraction"] * len(mine))]
            eval_idx.append(mine[np.sort(held)])
            mine = np.delete(mine, held)
        train_idx.append(_mix(mine, src, rng))
    eval_idx += [kept["eval", si] for si in range(len(eval_src))]
    train_idx = np.concatenate(train_idx)
    has_eval = bool(eval_src) or bool(cfg.get("eval_fraction"))
    eval_idx = np.concatenate(eval_idx) if eval_idx else np.zeros(0, np.int64)

    seq_len, pad = cfg["seq_len"], _pad_id(tokenizer)
    skipped = sum(v for k, v in counts.items() if k.startswith("skipped_"))
    stats = {"rows_read": counts["rows_read"], "rows_kept": counts["rows_read"] - skipped - counts["dropped_for_length"],
             "rows_skipped": skipped, **counts, **({"dropped_for_length_rows": notes} if notes else {})}
    if not len(train_idx):
        raise DataError("no training example is left: " + summary({**stats, "train_examples": 0,
                                                                   "train_sequences": 0, "train_trained_tokens": 0})
                        + "".join(f"\n  {n}" for n in notes))
    for split, idx in (("train", train_idx), ("eval", eval_idx)):
        if split == "eval" and not has_eval:
            continue
        groups = (best_fit_decreasing(lengths[idx], seq_len, cfg["split_seed"]) if cfg["packing"]
                  else [[j] for j in range(len(idx))])
        groups = [[int(idx[j]) for j in g] for g in groups]
        write_rows(pool, lengths, groups, str(tmp / f"{split}.arrow"), seq_len if cfg["packing"] else None, pad)
        tokens = int(lengths[idx].sum())
        stats.update({f"{split}_examples": len(idx), f"{split}_sequences": len(groups),
                      f"{split}_tokens": tokens, f"{split}_trained_tokens": int(trained[idx].sum())})
        if cfg["packing"]:
            stats[f"{split}_packing_efficiency"] = round(tokens / max(1, len(groups) * seq_len), 4)
    prompts = _eval_prompts(pool, eval_idx)
    if has_eval:
        stats["eval_prompts"] = len(prompts)
    if stats["rows_skipped"]:
        log(f"data: skipped {stats['rows_skipped']} bad rows (data.on_bad_row=skip): "
            + ", ".join(f"{k[8:]} {v}" for k, v in counts.items() if k.startswith("skipped_") and v))
    (tmp / "prompts.json").write_text(json.dumps(prompts))
    (tmp / "stats.json").write_text(json.dumps(stats))
    del pool, parts
    import shutil

    shutil.rmtree(tmp / "scratch", ignore_errors=True)  # tokenised rows live on in train/eval.arrow


def _tokenise_file(path: str, n: int, builder, scratch: Path, cfg: dict, counts: Dict[str, int], notes: List[str], log):
    """(all rows tokenised, indices of kept rows); counts every row; error mode raises on a bad row."""
    raw, by_line = load_raw(path, str(scratch / "hf"))
    scratch.mkdir(parents=True, exist_ok=True)
    num_proc = max(1, min(int(cfg.get("num_proc") or 1), len(raw) // 256))
    log(f"data: tokenising {path} ({len(raw)} rows, num_proc={num_proc})")
    ds = raw.map(builder, batched=True, num_proc=num_proc if num_proc > 1 else None,
                 remove_columns=raw.column_names, features=example_features(),
                 cache_file_name=str(scratch / f"part{n}.arrow"), new_fingerprint=f"part{n}-{time.time_ns()}",
                 desc=f"tokenising {Path(path).name}")
    status = _column(ds, "status").astype(object)
    bad = np.flatnonzero(np.isin(status, BAD_ROW_REASONS))
    if len(bad) and cfg["on_bad_row"] == "error":
        i = int(bad[0])
        where = f"line {i + 1}" if by_line else f"row {i + 1}"
        raise DataError(f"{path}, {where}: {ds[i]['detail']} [{status[i]}] ({len(bad)} bad rows in this file; "
                        "data.on_bad_row=skip skips and counts them)")
    counts["rows_read"] += int((status != BLANK).sum())
    for reason, c in zip(*np.unique(status[bad], return_counts=True)):
        counts[f"skipped_{reason}"] += int(c)
    dropped = np.flatnonzero(np.isin(status, LENGTH_STATUSES))
    counts["dropped_for_length"] += len(dropped)
    if len(dropped):
        note = dropped_note(path, [(f"line {i + 1}" if by_line else f"row {i + 1}", status[i], ds[int(i)]["detail"])
                                   for i in dropped[:3]], len(dropped), cfg["seq_len"])
        notes.append(note)
    keep = np.flatnonzero(status == "")
    counts["truncated"] += int(_column(ds, "truncated")[keep].sum())
    return ds, keep


def dropped_note(path: str, shown: List[tuple], total: int, seq_len: int) -> str:
    """Which rows were dropped for length, why, and the setting that keeps them."""
    where = "; ".join(f"{w}: {detail}" for w, _, detail in shown) + (f" and {total - len(shown)} more" if total > len(shown) else "")
    if any(reason == "too_long" for _, reason, _ in shown):
        fix = f"raise data.seq_len (now {seq_len}), or data.truncation=truncate to keep their first tokens"
    else:
        fix = f"raise data.seq_len (now {seq_len}) so the answer fits after the prompt"
    return f"{path}: {total} row(s) dropped for length ({where}); {fix}"


def _column(ds, name: str) -> np.ndarray:
    """A whole column as numpy, read through Arrow (row-by-row access costs ~20 us a row)."""
    return ds.with_format("arrow")[name].to_numpy()


def _mix(idx: np.ndarray, src: Source, rng) -> np.ndarray:
    """The source's examples repeated or subsampled to its weight or sample count (seeded)."""
    target = src.samples if src.samples is not None else round(src.weight * len(idx)) if src.weight else len(idx)
    if target == len(idx) or not len(idx):
        return idx
    whole, rest = divmod(target, len(idx))
    return np.concatenate([np.tile(idx, whole), idx[np.sort(rng.choice(len(idx), rest, replace=False))]])


def _eval_prompts(pool, idx: np.ndarray) -> List[dict]:
    if not len(idx):
        return []
    prompts = []
    for text in pool.select_columns(["messages"]).with_format("arrow")[idx.tolist()]["messages"].to_pylist():
        messages = json.loads(text) if text else []
        if messages and messages[-1]["role"] == "assistant":
            prompts.append({"messages": messages[:-1], "answer": messages[-1]["content"]})
    return prompts


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _plain(data_cfg) -> dict:
    """The data config as a dict of plain values (Choice members as their str values); a plain dict
    without split_seed gets the schema's default."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(data_cfg):
        cfg = OmegaConf.to_container(data_cfg, resolve=True, enum_to_str=True)
    else:
        cfg = plain(dict(data_cfg) if isinstance(data_cfg, dict) else dict(vars(data_cfg)))
    cfg.setdefault("split_seed", DataConfig.split_seed)
    return cfg


def _check(cfg: dict) -> None:
    """The schema's checks again, for a plain dict that never went through Hydra (tests, scripts)."""
    from launcher.errors import ConfigError, problem

    problems = [problem(f"data.{k}", cfg.get(k), one_of(choice))
                for k, choice in choice_fields(DataConfig).items() if cfg.get(k) not in choice.values()]
    if not isinstance(cfg.get("seq_len"), int) or cfg["seq_len"] < MIN_SEQ_LEN:
        problems.append(problem("data.seq_len", cfg.get("seq_len"), f"must be an integer >= {MIN_SEQ_LEN}"))
    if not 0 <= (cfg.get("eval_fraction") or 0) < 1:
        problems.append(problem("data.eval_fraction", cfg.get("eval_fraction"), "must be in [0, 1)"))
    split_seed = cfg.get("split_seed")
    if not isinstance(split_seed, int) or isinstance(split_seed, bool) or split_seed < 0:
        problems.append(problem("data.split_seed", split_seed, "must be an integer >= 0"))
    if problems:
        raise ConfigError(problems)
