"""The final Hugging Face model: weights gathered from the ZeRO-3 shards, saved as safetensors.

Gathering the 16-bit (here: training-dtype) weights through the engine works with tied
embeddings, where DeepSpeed's `zero_to_fp32.py --safe_serialization` fails. The model is written
into a temporary sibling and renamed into place: `export/` is there only complete (a rank killed
half-way through leaves no `export/` that would read as a finished run).
"""

import logging
from pathlib import Path
from typing import Optional

import torch

from launcher.atomic import replace_dir_atomic

log = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def export_dtype(name: Optional[str]) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return DTYPES[name]


def export_model(engine, tokenizer, out_dir: Path, dtype: torch.dtype, rank: int) -> Optional[Path]:
    """All ranks call this (the gather is collective); rank 0 writes out_dir."""
    if engine.zero_optimization_stage() == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    else:
        state_dict = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        return None
    model = engine.module
    state_dict = {k: v.detach().to("cpu", dtype) for k, v in state_dict.items()}
    model.config.dtype = dtype

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)

    replace_dir_atomic(Path(out_dir), write)
    log.info("exported %s (%s) to %s", type(model).__name__, dtype, out_dir)
    return out_dir
