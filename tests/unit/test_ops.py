"""launcher.ops: which DeepSpeed ops a run compiles, and what the plan says about them."""

from launcher import ops


def test_a_cpu_run_compiles_the_comm_op_and_the_optimizers_op():
    assert ops.needed("adamw", "cpu") == ["ShareMemCommBuilder"]
    assert ops.needed("cpu_adam", "cpu") == ["ShareMemCommBuilder", "CPUAdamBuilder"]
    assert ops.needed("fused_adam", "cuda") == ["FusedAdamBuilder"]
    assert ops.needed("adamw", "cuda") == []


def test_the_plan_says_whether_this_host_has_them_built(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert ops.plan("fused_adam", "cpu") == {
        "deepspeed_shm_comm": "compiled on first use, once per node, 20-40 s",
        "fused_adam": "compiled on first use, once per node, 20-40 s",
    }
    (tmp_path / "fused_adam").mkdir()
    (tmp_path / "fused_adam" / "fused_adam.so").write_bytes(b"")
    assert ops.plan("fused_adam", "cpu")["fused_adam"] == "built on this host"
