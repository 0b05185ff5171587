"""Tiny randomly initialised models saved with their tokenizer as HF model dirs: a Llama (~0.8M
parameters) and a Qwen3-MoE (~1.4M parameters, 8 experts, 2 per token) of the same width."""

from __future__ import annotations

import os

import torch
from transformers import (AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedConfig,
                          PreTrainedTokenizerFast, Qwen3MoeConfig)

SEED = 0


def tiny_llama_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # exercise GQA like real Llamas
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=None,  # the tokenizer adds no BOS
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def tiny_moe_config(tokenizer: PreTrainedTokenizerFast) -> Qwen3MoeConfig:
    """The tiny Llama's width and depth with every MLP a mixture of 8 experts, 2 per token."""
    return Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=344,  # dense layers' MLP: none here (every layer is sparse)
        moe_intermediate_size=96,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,  # as Qwen3-30B-A3B
        decoder_sparse_step=1,
        mlp_only_layers=[],
        router_aux_loss_coef=0.01,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


CONFIGS = {"llama": tiny_llama_config, "moe": tiny_moe_config}


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = SEED, kind: str = "llama"):
    """Randomly initialise a tiny model; fork_rng so the caller's RNG state is untouched."""
    config: PreTrainedConfig = CONFIGS[kind](tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config) if kind == "llama" else AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model


def save_model_dir(out_dir: str | os.PathLike, tokenizer: PreTrainedTokenizerFast,
                   seed: int = SEED, kind: str = "llama") -> None:
    """Write config, safetensors weights, generation_config and tokenizer files to out_dir."""
    build_model(tokenizer, seed, kind).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
