"""What the plan needs to know about a model, read from its config.json without loading weights."""

import functools
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from launcher import bundled
from launcher.plan.shape import ModelShape, is_moe_config


@dataclass
class ModelFacts:
    path: str  # resolved: a local dir or a hub id
    params: Optional[int]  # parameter count (tied weights counted once)
    max_positions: Optional[int]
    source: str  # "config.json" | "recipe hints" | "unknown"
    error: Optional[str] = None  # why config.json could not be read
    shape: Optional[ModelShape] = None  # None: not a Llama-family or tested MoE model, or unknown
    heads: Optional[int] = None  # attention heads (num_attention_heads), any architecture: sequence parallelism splits them
    kv_heads: Optional[int] = None  # key/value heads (num_key_value_heads; = heads without grouped-query attention)
    model_type: Optional[str] = None  # config.json's model_type
    moe: bool = False  # a mixture of experts, of any family (launcher.plan.shape.is_moe_config)
    active_params: Optional[int] = None  # parameters a token runs through: = params when dense; None when unknown


def looks_like_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/", "~")) and not os.path.exists(path)


def read_model_facts(model_cfg) -> ModelFacts:
    """Parameter count, shape and max positions from config.json (local dir, or the local HF cache)."""
    hints = model_cfg.config_hints or {}
    # Plain containers: a hint may be a list (mlp_only_layers), which json cannot take as a ListConfig.
    hints = json.dumps(OmegaConf.to_container(hints) if isinstance(hints, DictConfig) else dict(hints), sort_keys=True)
    return _read_model_facts(model_cfg.path, model_cfg.trust_remote_code, hints)


def read_config_json(path: str) -> Dict[str, Any]:
    """config.json of a local model dir, or of a hub id already in the local Hugging Face cache."""
    if os.path.isdir(path):
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, "config.json")
    if not isinstance(cached, str):
        raise OSError(f"{path} is not a local directory and its config.json is not in the Hugging Face cache")
    with open(cached) as f:
        return json.load(f)


def count_params_on_meta(config: Dict[str, Any], trust_remote_code: bool) -> int:
    """Parameters of any architecture: build it on the meta device (about a second, allocates nothing)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(config)
    hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=16)  # a 100-point sweep reads the same model once
def _read_model_facts(model_path: str, trust_remote_code: bool, hints_json: str) -> ModelFacts:
    path = bundled.resolve(os.path.expanduser(model_path))
    hints = json.loads(hints_json)
    try:
        config, source, error = read_config_json(path), "config.json", None
    except Exception as exc:  # noqa: BLE001 - any failure means "not readable here"; say why
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        config, source = hints, "recipe hints" if hints else "unknown"
    if not config:
        return ModelFacts(path, None, None, source, error)
    shape = ModelShape.from_config(config)
    moe = shape.moe if shape is not None else is_moe_config(config)
    if shape is not None:
        params, active = shape.params, shape.active_params
    else:
        try:
            params = count_params_on_meta(config, trust_remote_code)
        except Exception:  # noqa: BLE001 - an architecture transformers cannot build here: no count
            params = None
        active = None if moe else params  # another family's experts are not told apart here
    heads, kv_heads = attention_heads(config)
    return ModelFacts(path, params, config.get("max_position_embeddings"), source, error, shape, heads, kv_heads,
                      config.get("model_type"), moe, active)


def attention_heads(config: Dict[str, Any]) -> Tuple[Optional[int], Optional[int]]:
    """(heads, KV heads) of a config.json; GPT-2-style configs name the heads n_head."""
    heads = config.get("num_attention_heads") or config.get("n_head")
    if not isinstance(heads, int):
        return None, None
    kv_heads = config.get("num_key_value_heads")
    return heads, kv_heads if isinstance(kv_heads, int) and kv_heads > 0 else heads
