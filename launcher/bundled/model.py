"""Tiny randomly initialised Llama (~0.8M params) saved with its tokenizer as an HF model dir."""

from __future__ import annotations

import os

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = SEED) -> LlamaForCausalLM:
    """Randomly initialise the tiny Llama; fork_rng so the caller's RNG state is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(tokenizer))
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model


def save_model_dir(out_dir: str | os.PathLike, tokenizer: PreTrainedTokenizerFast,
                   seed: int = SEED) -> None:
    """Write config, safetensors weights, generation_config and tokenizer files to out_dir."""
    build_model(tokenizer, seed).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
