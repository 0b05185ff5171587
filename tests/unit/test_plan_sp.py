"""Sequence parallelism (trainer.sequence_parallel, DeepSpeed Ulysses) before launch: the batch over
data-parallel ranks, the combinations refused with their reason, the memory and all-to-all bytes the
plan predicts, the advice, and the long-context recipe's verdicts (the `sft` command on them:
tests/integration/test_sequence_parallel_cli.py)."""

import json

import pytest
from omegaconf import OmegaConf

from launcher import attention
from launcher.attention import resolve_attn_implementation
from launcher.errors import ConfigError
from launcher.facts import find
from launcher.plan import batch_math, deepspeed_config, make_plan
from launcher.plan.memory import GIB, Workload, activation_bytes, backward_transients, tiled_mlp_shards
from launcher.plan.shape import ModelShape
from launcher.validate import check_config
from tests.conftest import compose_config

TINY = ["recipe=tiny_sft"]  # bundled tiny Llama: 4 heads, 2 KV heads, head_dim 32, 4 layers; 2 CPU ranks, fp32
LONG = ["recipe=llama3_8b_long_sft"]


def planned(overrides):
    cfg = compose_config(overrides)
    return make_plan(cfg, check_config(cfg, dry_run=True).model, None, find(cfg))


def problems(overrides):
    with pytest.raises(ConfigError) as error:
        check_config(compose_config(overrides), dry_run=True)
    return error.value.problems


def model_dir(tmp_path, heads, kv_heads):
    """A Llama config.json with these heads (all validation reads of a model)."""
    config = {"model_type": "llama", "hidden_size": 32 * heads, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": 500, "max_position_embeddings": 4096}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return f"model.path={tmp_path}"


# Batch math over data-parallel ranks

@pytest.mark.parametrize("mb, accum, gb, world, n, expected", [
    (1, None, 8, 8, 4, (4, 8)), (1, None, 8, 8, 1, (1, 8)), (2, 3, None, 8, 2, (3, 24)), (1, None, None, 8, 8, (1, 1)),
])
def test_the_global_batch_counts_data_parallel_ranks(mb, accum, gb, world, n, expected):
    trainer = OmegaConf.create({"micro_batch_size": mb, "grad_accum_steps": accum, "global_batch_size": gb, "sequence_parallel": n})
    assert batch_math(trainer, world) == (*expected, [])


def test_a_batch_that_the_data_parallel_ranks_cannot_divide_names_them():
    trainer = OmegaConf.create({"micro_batch_size": 2, "grad_accum_steps": None, "global_batch_size": 6, "sequence_parallel": 4})
    [message] = batch_math(trainer, 8)[2]
    assert message == ("trainer.global_batch_size=6: must be a positive multiple of micro_batch_size x data-parallel ranks "
                       "(world / trainer.sequence_parallel = 8 / 4) = 2 x 2 = 4 (e.g. 8)")
    trainer.grad_accum_steps = 2
    assert "must equal micro_batch_size x data-parallel ranks (world / trainer.sequence_parallel = 8 / 4) x grad_accum_steps " \
           "= 2 x 2 x 2 = 8" in batch_math(trainer, 8)[2][0]


def test_sp_2_on_4_ranks_plans_the_batch_of_sp_1_on_2_ranks():
    sp = planned([*TINY, "cluster.procs_per_node=4", "trainer.sequence_parallel=2"])
    plain = planned([*TINY, "cluster.procs_per_node=2"])
    for field in ("global_batch_size", "grad_accum_steps", "tokens_per_step", "steps_per_epoch", "total_steps", "data_parallel"):
        assert getattr(sp, field) == getattr(plain, field), field
    assert (sp.world_size, sp.sequence_parallel, sp.data_parallel) == (4, 2, 2)
    assert sp.tokens_per_step == 32 * 128  # each token once, not once per rank of a group


def test_the_deepspeed_json_divides_the_batch_by_data_parallel_ranks():
    cfg = compose_config([*TINY, "trainer.sequence_parallel=2"])
    plan = make_plan(cfg, check_config(cfg, dry_run=True).model, None, find(cfg))
    ds = deepspeed_config(cfg, plan)
    # DeepSpeed checks train_batch_size = micro x accumulation x (world / sequence_parallel_size).
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (8, 4, 32)
    assert ds["sequence_parallel_size"] == 2
    assert "sequence_parallel_size" not in deepspeed_config(compose_config(TINY), planned(TINY))


# Checks before launch

@pytest.mark.parametrize("overrides, expected", [
    (["trainer.sequence_parallel=0"], "trainer.sequence_parallel=0: must be >= 1 (1: no sequence parallelism)"),
    (["trainer.sequence_parallel=4"],
     "trainer.sequence_parallel=4: must divide the 2 ranks per node (cluster.procs_per_node, else cluster.gpus_per_node) "
     "so each group's all-to-all stays within a node; valid here: 1, 2"),
    (["trainer.sequence_parallel=2", "data.seq_len=127"],
     "data.seq_len=127: must be a multiple of trainer.sequence_parallel=2: each rank of a group holds seq_len / 2 tokens "
     "of every row (e.g. 128)"),
    (["cluster.procs_per_node=3", "trainer.sequence_parallel=3", "data.seq_len=129"],
     "trainer.sequence_parallel=3: must divide the model's 4 attention heads (num_attention_heads): Ulysses gives each rank "
     "of a group heads / N of them; valid here: 1"),
    (["trainer.sequence_parallel=2", "model.attn_implementation=eager"],
     "model.attn_implementation='eager': with trainer.sequence_parallel=2: DeepSpeed's Ulysses refuses eager: it materialises "
     "a full (seq x seq) mask per layer; use sdpa or flash_attention_2"),
    (["cluster=slurm", "cluster.gpus_per_node=2", "trainer.precision=bf16", "trainer.sequence_parallel=2",
      "model.attn_implementation=flex_attention"],
     "model.attn_implementation='flex_attention': with trainer.sequence_parallel=2: DeepSpeed rebuilds flex_attention's block "
     "mask as plain causal after the all-to-all, so packed examples would attend to each other; use flash_attention_2 or sdpa"),
    (["trainer.sequence_parallel=2", "+deepspeed.extra.zero_optimization={reduce_scatter: false}"],
     "deepspeed.extra.zero_optimization.reduce_scatter=False: must stay true with trainer.sequence_parallel=2 (without it "
     "ZeRO-3 averages gradients over the data-parallel ranks only, and the loss's scale would be off by N)"),
    (["trainer.sequence_parallel=2", "deepspeed=zero2"],
     "deepspeed.stage=2: must be 3 with trainer.sequence_parallel=2 (sequence parallelism is trained and tested with ZeRO-3 only)"),
])
def test_a_combination_sequence_parallelism_cannot_train_is_refused_with_its_reason(overrides, expected):
    found = problems([*TINY, *overrides])
    assert expected in found, found


def test_kv_heads_that_neither_divide_nor_are_divided_by_n_are_refused_naming_both(tmp_path):
    found = problems([*TINY, model_dir(tmp_path, heads=6, kv_heads=3), "trainer.sequence_parallel=2"])
    assert ("trainer.sequence_parallel=2: and the model's 3 KV heads (num_key_value_heads) must divide one another: DeepSpeed "
            "splits KV heads over the group, or replicates them when fewer than N, and 3 and 2 allow neither; valid here: 1") in found


@pytest.mark.parametrize("overrides", [
    ["trainer.sequence_parallel=2"],  # sdpa (auto on CPU), the bundled eval's generation
    ["trainer.sequence_parallel=2", "trainer.loss=full"],  # a shard's full loss holds 1/N of the row's logits
    ["trainer.tiled_mlp=true"],  # a memory option of its own
    ["cluster.procs_per_node=4", "trainer.sequence_parallel=4"],  # 2 KV heads replicated to 4
    ["cluster=slurm", "cluster.gpus_per_node=8", "trainer.precision=bf16", "trainer.sequence_parallel=4",
     "model.attn_implementation=flash_attention_2"],
])
def test_what_sequence_parallelism_can_train_passes(overrides):
    cfg = compose_config([*TINY, *overrides])
    assert cfg.eval.generate_samples > 0
    check_config(cfg, dry_run=True)


def test_auto_never_picks_flex_attention_for_sequence_parallelism(monkeypatch):
    installed = set()
    monkeypatch.setattr(attention, "find_spec", lambda name: object() if name in installed else None)
    assert resolve_attn_implementation("auto", "cuda", "bf16", sequence_parallel=1) == "flex_attention"
    assert resolve_attn_implementation("auto", "cuda", "bf16", sequence_parallel=2) == "sdpa"
    assert resolve_attn_implementation("auto", "cpu", "fp32", sequence_parallel=2) == "sdpa"
    installed.add("flash_attn")
    assert resolve_attn_implementation("auto", "cuda", "bf16", sequence_parallel=2) == "flash_attention_2"
    assert resolve_attn_implementation("auto", "cuda", "fp32", sequence_parallel=2) == "sdpa"


# Memory

SHAPE = ModelShape.from_config({"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                                "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 2000})


def work(n, attn="sdpa", packing=True, checkpointing=False, tiled=False):
    return Workload(2, 1024, "bf16", checkpointing, attn, packing, "chunked", 256, sequence_parallel=n, tiled_mlp=tiled)


MASKS = "attention masks (packed rows): sdpa's bf16 copy in each of 4 layers"


def test_activations_per_rank_halve_at_sp_2_and_the_packed_sdpa_mask_stays_whole():
    one, two = activation_bytes(SHAPE, work(1)), activation_bytes(SHAPE, work(2))
    assert two["4 layers"] == pytest.approx(one["4 layers"] / 2)  # 2 KV heads: nothing replicated at N=2
    assert two["final norm"] == pytest.approx(one["final norm"] / 2)
    assert two[MASKS] == one[MASKS] == 4 * 2 * 2 * 1024**2  # layers x bf16 x rows x seq x seq: whole rows
    assert not any("mask" in part for part in activation_bytes(SHAPE, work(2, "flash_attention_2")))
    checkpointed = [activation_bytes(SHAPE, work(n, checkpointing=True)) for n in (1, 2)]
    assert checkpointed[1]["4 layer inputs (checkpointed)"] == pytest.approx(checkpointed[0]["4 layer inputs (checkpointed)"] / 2)
    # transformers' one boolean mask is every checkpointed layer's input; with Ulysses each layer builds its own.
    assert checkpointed[0]["attention mask (packed rows)"] == 2 * 1024**2 and "attention mask (packed rows)" not in checkpointed[1]
    recomputed = [backward_transients(SHAPE, work(n, attn, checkpointing=True))["one layer recomputed"]
                  for n in (1, 2) for attn in ("flash_attention_2", "sdpa")]
    # Half the tokens, plus the exchange's buffers of one layer's backward (inputs and outputs of q, k, v, output).
    exchange = 2 * 2 * (2 * SHAPE.q_dim + 2 * 2 * SHAPE.head_dim) * 1024
    assert recomputed[2] == pytest.approx(recomputed[0] / 2 + exchange)
    assert recomputed[1] - recomputed[0] > 2 * 2 * 1024**2 and recomputed[3] - recomputed[2] > 3 * 2 * 1024**2


def test_sdpa_saves_a_copy_of_the_packed_mask_in_every_layer_as_the_plan_counts():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 100}
    model = LlamaForCausalLM(LlamaConfig(**config, attn_implementation="sdpa")).float().train()
    rows, seq = 2, 128
    positions = torch.cat([torch.arange(50), torch.arange(78)]).repeat(rows, 1)  # two packed examples per row
    masks = {}

    def keep(t):
        if t.dim() == 4 and t.shape[-2:] == (seq, seq):
            masks[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(input_ids=torch.randint(0, 100, (rows, seq)), position_ids=positions, use_cache=False)
    shape = ModelShape.from_config({**config, "model_type": "llama"})
    planned_masks = activation_bytes(shape, Workload(rows, seq, "fp32", False, "sdpa", True))
    assert sum(masks.values()) == planned_masks["attention masks (packed rows): sdpa's fp32 copy in each of 3 layers"]


def test_kv_heads_fewer_than_n_are_held_replicated_inside_attention():
    # flash_attention_2 keeps grouped heads: k and v per local token go from 2 KV heads to N = 4.
    e, tokens = 2, 2 * 1024 // 4
    replicated = activation_bytes(SHAPE, work(4, "flash_attention_2"))["4 layers"]
    unreplicated = activation_bytes(SHAPE, work(1, "flash_attention_2"))["4 layers"] / 4
    assert replicated - unreplicated == pytest.approx(4 * tokens * e * 2 * (4 - 2) * SHAPE.head_dim)


def test_tiled_mlp_keeps_one_slice_of_the_mlps_intermediates():
    mlp = 4 * 2 * SHAPE.intermediate  # gate, up, silu(gate), product per token, bf16
    untiled, tiled = work(1), work(1, tiled=True)
    assert tiled_mlp_shards(SHAPE, tiled) == 4  # ceil(1024 / 256), DeepSpeed's default
    assert activation_bytes(SHAPE, untiled)["4 layers"] - activation_bytes(SHAPE, tiled)["4 layers"] == pytest.approx(4 * mlp * 2048)
    assert backward_transients(SHAPE, tiled)["tiled MLP: one of 4 slices recomputed"] == pytest.approx(mlp * 2048 / 4)
    at_sp_2 = work(2, tiled=True, checkpointing=True)  # 512 local tokens per row: 2 slices
    recomputed = backward_transients(SHAPE, at_sp_2)["one layer recomputed"]
    assert recomputed == pytest.approx(backward_transients(SHAPE, work(2, checkpointing=True))["one layer recomputed"] - mlp * 1024 / 2)


def test_the_plan_at_sp_2_halves_the_8b_activations_and_names_the_mask():
    at = {n: planned([*LONG, "data.seq_len=16384", "model.attn_implementation=sdpa", f"trainer.sequence_parallel={n}"]).memory
          for n in (1, 2)}
    layers = "32 layer inputs (checkpointed)"
    assert at[2]["parts_gib"]["activations"][layers] == pytest.approx(at[1]["parts_gib"]["activations"][layers] / 2)
    assert at[1]["parts_gib"]["activations"]["attention mask (packed rows)"] == pytest.approx(16384**2 / GIB)
    assert "attention mask (packed rows)" not in at[2]["parts_gib"]["activations"]  # each layer builds its own
    assert at[2]["parts_gib"]["backward transient (the larger)"]["one layer recomputed"] > 3 * 16384**2 / GIB  # boolean + bf16 copy
    assert at[2]["parts_gib"]["model states"] == at[1]["parts_gib"]["model states"]  # ZeRO-3 shards over every rank


# Communication

def tiny_comm(overrides):
    return planned([*TINY, *overrides, "cluster.gpu_tflops=100", "cluster.gpu_mem_gib=80"]).comm


def test_all_to_all_bytes_equal_a_hand_count():
    # micro 8 x 128 / 2 = 512 local tokens; head_dim 32, fp32; q and the output at 4 heads, k and v at 2;
    # forward and backward; 4 layers; 4 micro-batches per step (1 data-parallel rank, global batch 32).
    per_layer = 512 * 32 * 4 * (4 + 2 + 2 + 4)
    comm = tiny_comm(["trainer.sequence_parallel=2"])
    assert comm["message_bytes"]["all_to_all_single"] == 4 * 4 * 2 * per_layer == 25_165_824
    assert comm["message_bytes"]["all_gather"] == 4 * 4 * 512 * 8  # int64 position ids, each forward
    recomputed = tiny_comm(["trainer.sequence_parallel=2", "trainer.activation_checkpointing=true"])
    assert recomputed["message_bytes"]["all_to_all_single"] == 4 * 4 * 3 * per_layer
    assert recomputed["message_bytes"]["all_gather"] == 2 * 4 * 4 * 512 * 8
    assert "all_to_all_single" not in tiny_comm([])["message_bytes"]


def test_kv_heads_go_replicated_through_the_all_to_all():
    # N = 4 on 4 ranks: 256 local tokens; k and v carry 4 heads (2 replicated 2x); 4 micro-batches per step.
    comm = tiny_comm(["cluster.procs_per_node=4", "trainer.sequence_parallel=4"])
    assert comm["message_bytes"]["all_to_all_single"] == 4 * 4 * 2 * (256 * 32 * 4 * (4 + 4 + 4 + 4))


def test_zero_collectives_span_every_rank_and_the_all_to_all_adds_to_the_step():
    sp, plain = tiny_comm(["trainer.sequence_parallel=2"]), tiny_comm([])
    # Twice the micro-batches per step (1 data-parallel rank, not 2): twice the gathers, over the same 2 ranks.
    assert sp["message_bytes"]["all_gather_into_tensor"] == pytest.approx(2 * plain["message_bytes"]["all_gather_into_tensor"])
    assert sp["sp_bytes_per_gpu"] == pytest.approx(25_165_824 / 2 + 65_536)
    assert sp["sp_comm_s"] == pytest.approx(sp["sp_bytes_per_gpu"] / (3600 / 8 * 1e9))
    assert sp["step_s"] == pytest.approx(max(sp["compute_s"], sp["comm_s"]) + sp["sp_comm_s"])
    assert sp["compute_s"] == pytest.approx(plain["compute_s"])  # each token computed once


# Advice and the recipe

def test_the_advice_lists_the_smallest_sequence_parallel_group_that_fits():
    advice = planned([*LONG, "trainer.sequence_parallel=1"]).memory["advice"]
    sp = [a for a in advice if a.startswith("trainer.sequence_parallel=")]
    assert len(sp) == 1 and sp[0].startswith("trainer.sequence_parallel=2 (predicted ")
    # A kernel Ulysses refuses is swapped in the advice, and said so.
    eager = planned([*LONG, "trainer.sequence_parallel=1", "model.attn_implementation=eager", "data.seq_len=32768"]).memory["advice"]
    assert any(a.startswith("trainer.sequence_parallel=") and "model.attn_implementation=sdpa" in a for a in eager), eager


def test_the_long_recipe_fits_with_sequence_parallelism_and_not_without():
    with_sp = planned(LONG)
    assert (with_sp.sequence_parallel, with_sp.data_parallel, with_sp.seq_len) == (8, 1, 131072)
    assert with_sp.attention.startswith("flash_attention_2")
    assert with_sp.memory["fits"] is True and with_sp.memory["peak_gib"] < 0.5 * with_sp.memory["gpu_mem_gib"]
    without = planned([*LONG, "trainer.sequence_parallel=1"]).memory
    assert without["fits"] is False and without["advice"][0].startswith("trainer.sequence_parallel=2 (predicted ")
    # The recipe names flash_attention_2: sdpa's whole-row masks alone would not fit at this length.
    assert planned([*LONG, "model.attn_implementation=sdpa"]).memory["fits"] is False
