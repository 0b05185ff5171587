"""What the plan needs to know about a model, read from its config.json without loading weights."""

import functools
import os
from dataclasses import dataclass
from typing import Optional

from launcher import bundled


@dataclass
class ModelFacts:
    path: str  # resolved: a local dir or a hub id
    params: Optional[int]  # parameter count (tied weights counted once)
    max_positions: Optional[int]
    source: str  # "config.json" | "recipe hints" | "unknown"
    error: Optional[str] = None  # why config.json could not be read


def looks_like_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/", "~")) and not os.path.exists(path)


def read_model_facts(model_cfg) -> ModelFacts:
    """Parameter count and max positions from config.json (local dir, or the local HF cache)."""
    return _read_model_facts(model_cfg.path, model_cfg.trust_remote_code, model_cfg.params_b, model_cfg.max_positions)


@functools.lru_cache(maxsize=16)  # a 100-point sweep reads the same model once
def _read_model_facts(model_path: str, trust_remote_code: bool, params_b, max_positions) -> ModelFacts:
    path = bundled.resolve(os.path.expanduser(model_path))
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        # Meta tensors: counts parameters of a 70B model in about a second, allocating nothing.
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        params = sum(p.numel() for p in model.parameters())
        return ModelFacts(path, params, getattr(config, "max_position_embeddings", None), "config.json")
    except Exception as exc:  # noqa: BLE001 - any failure means "not readable here"; say why
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if params_b is not None or max_positions is not None:
            params = int(params_b * 1e9) if params_b is not None else None
            return ModelFacts(path, params, max_positions, "recipe hints", error)
        return ModelFacts(path, None, None, "unknown", error)
