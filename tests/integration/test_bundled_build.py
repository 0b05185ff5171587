"""launcher.bundled built by two processes at once (each imports torch and transformers): one intact model."""

import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

from launcher.bundled import MODEL_DIR, TASKS_DIR  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


# --- model + tokenizer -------------------------------------------------------------------------

def test_concurrent_resolve_builds_one_intact_model(tmp_path):
    code = "from launcher.bundled import resolve; print(resolve('bundled://tiny-llama'))"
    env = {**os.environ, "SFT_CACHE_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    paths = {out.strip().splitlines()[-1] for out, _ in outs}  # DeepSpeed may print on import
    assert paths == {str(tmp_path / MODEL_DIR)}
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == sorted(
        [MODEL_DIR, TASKS_DIR])

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(paths.pop())
    tok = AutoTokenizer.from_pretrained(tmp_path / MODEL_DIR)
    assert model.config.vocab_size == len(tok)
