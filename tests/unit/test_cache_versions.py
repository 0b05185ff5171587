"""Guards for the cache versions: what the bundled generators and the data pipeline produce for a fixed
input is pinned next to the VERSION that names their caches. Changing the output without bumping
the VERSION fails here, so a cache written by older code (or a reference loss computed from it)
cannot silently stand in for the current code's output.

After a deliberate change: bump the VERSION, run this file with SFT_UPDATE_REFERENCE=1 (it pins
the new digests only for a bumped VERSION), and regenerate tests/integration/reference_losses.json.
"""

import hashlib
import json
import os
from pathlib import Path
from typing import Dict

import pytest
from safetensors.torch import load_file
from transformers import AutoTokenizer

from launcher import bundled
from launcher.bundled import resolve
from launcher.data import pipeline, prepare_data

PINS = Path(__file__).with_name("cache_versions.json")
ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "add 2 3"},
                  {"role": "assistant", "content": "5"}]},
    {"messages": [{"role": "user", "content": "reverse: a b c"}, {"role": "assistant", "content": "c b a"},
                  {"role": "user", "content": "km to m: 3"}, {"role": "assistant", "content": "3000"}]},
    {"messages": [{"role": "user", "content": "héllo 東京 🙂"}, {"role": "assistant", "content": "ok"}]},
    {"messages": [{"role": "user", "content": "cafe\u0301?"}, {"role": "assistant", "content": "cafe\u0301"}]},  # NFD
    *({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": str(2 * i)}]}
      for i in range(9)),
]
CONFIGS = [  # packed with a held-out split; padded, truncated, last turn only
    dict(seq_len=48, packing=True, train_on="assistant", truncation="truncate", eval_fraction=0.25),
    dict(seq_len=28, packing=False, train_on="last_assistant", truncation="truncate", eval_fraction=0.0),
]
UNSTABLE_STATS = {"cache_key", "cache_hit", "prepare_seconds"}


def digest(parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def check_pin(kind: str, version: int, got: str, version_name: str, libs: Dict[str, str], pins_file: Path = PINS) -> None:
    """libs: the versions of the libraries that shape the output, as installed (the guard's own tests pass fakes)."""
    pins = json.loads(pins_file.read_text())
    pinned = pins[kind]
    if (version, got) == (pinned["version"], pinned["digest"]):
        return
    changed = {k: f"{pinned.get('libraries', {}).get(k)} -> {v}" for k, v in libs.items() if pinned.get("libraries", {}).get(k) != v}
    if version == pinned["version"] and not changed:
        pytest.fail(f"{kind}: the output for the fixed input changed (digest {got}, pinned {pinned['digest']}) but "
                    f"{version_name} is still {version}: bump it, so caches written by the old code are not reused, "
                    f"then pin the new digest (SFT_UPDATE_REFERENCE=1) and regenerate reference_losses.json")
    if os.environ.get("SFT_UPDATE_REFERENCE"):
        pins[kind] = {"version": version, "digest": got, "libraries": libs}
        pins_file.write_text(json.dumps(pins, indent=1) + "\n")
        return
    why = (f"library versions changed ({', '.join(f'{k} {v}' for k, v in changed.items())}; cache names carry "
           "them already)" if version == pinned["version"] else
           f"{version_name} is {version} but {pins_file.name} pins version {pinned['version']}")
    pytest.fail(f"{kind}: {why}: pin digest {got} (SFT_UPDATE_REFERENCE=1) and regenerate reference_losses.json")


def installed_versions(names) -> Dict[str, str]:
    from importlib import metadata

    return {name: metadata.version(name) for name in names}


def bundled_digest() -> str:
    model = Path(resolve("bundled://tiny-llama"))
    tasks = Path(resolve("bundled://tiny-tasks/train.jsonl")).parent
    config = json.loads((model / "config.json").read_text())
    config.pop("transformers_version", None)  # the library version is in the cache name already
    tensors = load_file(model / "model.safetensors")
    return digest({
        "tasks": [hashlib.sha256((tasks / f).read_bytes()).hexdigest() for f in ("train.jsonl", "eval.jsonl")],
        "tokenizer": hashlib.sha256((model / "tokenizer.json").read_bytes()).hexdigest(),
        "config": config,
        "weights": {k: hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest() for k, t in sorted(tensors.items())},
    })


def moe_digest() -> str:
    """The bundled tiny MoE: its config and weights (its tokenizer and tasks are the tiny Llama's)."""
    model = Path(resolve("bundled://tiny-moe"))
    config = json.loads((model / "config.json").read_text())
    config.pop("transformers_version", None)
    tensors = load_file(model / "model.safetensors")
    return digest({"config": config,
                   "weights": {k: hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest() for k, t in sorted(tensors.items())}})


def pipeline_digest(tmp_path: Path) -> str:
    tok = AutoTokenizer.from_pretrained(resolve("bundled://tiny-llama"))
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    out = []
    for i, extra in enumerate(CONFIGS):
        # split_seed=0: the seed these rows were pinned with (it was the training seed's argument then)
        cfg = dict(train_files=str(source), eval_files=None, format="auto", template=None, on_bad_row="error",
                   num_proc=1, prepare_timeout_min=1.0, split_seed=0, **extra)
        data = prepare_data(cfg, tok, cache_root=str(tmp_path / f"cache{i}"), log=lambda m: None)
        splits = {name: [ds[j] for j in range(len(ds))] for name, ds in (("train", data.train), ("eval", data.eval)) if ds is not None}
        out.append({"rows": splits, "prompts": data.eval_prompts,
                    "stats": {k: v for k, v in data.stats.items() if k not in UNSTABLE_STATS}})
    return digest(json.loads(json.dumps(out).replace(str(tmp_path), "<tmp>")))  # notes name the file


def test_bundled_artifacts_match_their_version():
    check_pin("bundled", bundled.VERSION, bundled_digest(), "launcher.bundled.VERSION",
              installed_versions(bundled.LIBRARIES))


def test_the_bundled_moe_matches_its_version():
    check_pin("bundled_moe", bundled.VERSION, moe_digest(), "launcher.bundled.VERSION",
              installed_versions(bundled.LIBRARIES))


def test_pipeline_rows_match_its_version(tmp_path):
    check_pin("data_pipeline", pipeline.VERSION, pipeline_digest(tmp_path), "launcher.data.pipeline.VERSION",
              installed_versions(pipeline.LIBRARIES))


# The guard's own tests: fake pins with fake library versions, so they hold whatever is installed.
FAKE_LIBS = {"transformers": "1.0.0", "datasets": "2.0.0"}


def fake_pins(tmp_path: Path) -> Path:
    path = tmp_path / "pins.json"
    path.write_text(json.dumps({"data_pipeline": {"version": 3, "digest": "a" * 16, "libraries": FAKE_LIBS}}))
    return path


def test_a_changed_output_without_a_bump_fails(monkeypatch, tmp_path):
    """Same version, same libraries, output changed -> the bump is asked for, and nothing is re-pinned."""
    monkeypatch.delenv("SFT_UPDATE_REFERENCE", raising=False)
    pins = fake_pins(tmp_path)
    before = pins.read_text()
    with pytest.raises(pytest.fail.Exception, match=r"digest bbbbbbbbbbbbbbbb, pinned aaaaaaaaaaaaaaaa.*VERSION is still 3: bump it"):
        check_pin("data_pipeline", 3, "b" * 16, "VERSION", dict(FAKE_LIBS), pins)
    monkeypatch.setenv("SFT_UPDATE_REFERENCE", "1")  # an unbumped change is never pinned
    with pytest.raises(pytest.fail.Exception, match="bump it"):
        check_pin("data_pipeline", 3, "b" * 16, "VERSION", dict(FAKE_LIBS), pins)
    assert pins.read_text() == before


def test_a_library_upgrade_asks_for_a_new_pin(monkeypatch, tmp_path):
    """Same version, a library moved, output changed -> re-pin (no bump: cache names carry library versions)."""
    monkeypatch.delenv("SFT_UPDATE_REFERENCE", raising=False)
    pins = fake_pins(tmp_path)
    upgraded = {**FAKE_LIBS, "transformers": "1.1.0"}
    with pytest.raises(pytest.fail.Exception, match=r"library versions changed \(transformers 1.0.0 -> 1.1.0; .*pin digest b{16}"):
        check_pin("data_pipeline", 3, "b" * 16, "VERSION", upgraded, pins)
    check_pin("data_pipeline", 3, "a" * 16, "VERSION", upgraded, pins)  # same output: nothing to do
    monkeypatch.setenv("SFT_UPDATE_REFERENCE", "1")
    check_pin("data_pipeline", 3, "b" * 16, "VERSION", upgraded, pins)
    assert json.loads(pins.read_text())["data_pipeline"] == {"version": 3, "digest": "b" * 16, "libraries": upgraded}


def test_a_bumped_version_asks_for_its_pin(monkeypatch, tmp_path):
    monkeypatch.delenv("SFT_UPDATE_REFERENCE", raising=False)
    with pytest.raises(pytest.fail.Exception, match="VERSION is 4 but pins.json pins version 3"):
        check_pin("data_pipeline", 4, "b" * 16, "VERSION", dict(FAKE_LIBS), fake_pins(tmp_path))
