"""Which attention kernel and loss a run gets, and the combinations refused before launch with the reason."""

import pytest

from launcher import attention
from launcher.attention import resolve_attn_implementation
from launcher.errors import ConfigError
from launcher.validate import check_config
from tests.conftest import compose_config


def test_auto_picks_flash_where_installed_then_flex_on_gpus_and_sdpa_on_cpu(monkeypatch):
    installed = set()
    monkeypatch.setattr(attention, "find_spec", lambda name: object() if name in installed else None)
    assert resolve_attn_implementation("auto", "cuda") == "flex_attention"
    assert resolve_attn_implementation("auto", "cpu") == "sdpa"
    installed.add("flash_attn")
    assert resolve_attn_implementation("auto", "cuda") == "flash_attention_2"
    assert resolve_attn_implementation("auto", "cpu") == "sdpa"
    assert resolve_attn_implementation("eager", "cuda") == "eager"


def problems(overrides):
    with pytest.raises(ConfigError) as error:
        check_config(compose_config(["recipe=tiny_sft", *overrides]), dry_run=True)
    return error.value.problems


@pytest.mark.parametrize("overrides, expected", [
    (["model.attn_implementation=flex_attention"],
     "model.attn_implementation='flex_attention': torch has no CPU backward for flex_attention"),
    (["model.attn_implementation=flash_attention_2"],
     "model.attn_implementation='flash_attention_2': flash-attn runs on CUDA GPUs only"),
    (["cluster=slurm", "cluster.gpus_per_node=8", "model.attn_implementation=flash_attention_2", "trainer.precision=fp32"],
     "model.attn_implementation='flash_attention_2': flash-attn computes in bf16 or fp16 only (trainer.precision=fp32)"),
    (["trainer.loss=liger"], "trainer.loss='liger': Liger's kernels are Triton, GPU only"),
    (["trainer.loss_chunk_tokens=0"], "trainer.loss_chunk_tokens=0: must be >= 1"),
    (["trainer.dist_timeout_min=0"], "trainer.dist_timeout_min=0.0: must be > 0 minutes"),
])
def test_a_combination_that_cannot_train_is_refused_with_its_reason(overrides, expected):
    assert any(p.startswith(expected) for p in problems(overrides)), problems(overrides)


def test_chunked_loss_refuses_a_model_that_transforms_its_logits():
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from launcher.loss import install_loss_head

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0.*use trainer.loss=full"):
        install_loss_head(model, "chunked", 1024)
    assert install_loss_head(model, "full", 1024) is None  # full keeps the model's own logits


def test_the_chunked_loss_refuses_an_output_changed_after_lm_head():
    """A model that scales what lm_head returns, with no config key that says so, is caught at the first step."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from launcher.data import collate
    from launcher.loss import install_loss_head, token_loss_sum

    class Scaled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    batch = collate([{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "position_ids": [0, 1, 2]}], pad_id=0)
    plain = LlamaForCausalLM(config)
    assert token_loss_sum(plain, install_loss_head(plain, "chunked", 2), batch).dim() == 0
    scaled = Scaled(config)
    with pytest.raises(RuntimeError, match="changes what lm_head returns.*use trainer.loss=full"):
        token_loss_sum(scaled, install_loss_head(scaled, "chunked", 2), batch)
