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


def test_usr2_sent_to_every_process_of_a_build_does_not_kill_the_compilers(tmp_path):
    """What Slurm does to a job step while DeepSpeed compiles: USR2 to ninja, sh, the compiler and us."""
    import os
    import signal
    import subprocess
    import time

    from launcher.signals import StopFlag

    (tmp_path / "a.c").write_text("int main(void) { return 0; }\n")
    (tmp_path / "build.ninja").write_text("rule cc\n  command = sleep 1 && cc $in -o $out\nbuild a: cc a.c\n")
    flag = StopFlag()
    previous = signal.getsignal(signal.SIGUSR2), signal.getsignal(signal.SIGTERM)
    try:
        flag.install()
        with flag.blocked(), ops._ninja_ignores_usr2(tmp_path):
            build = subprocess.Popen(["ninja"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        sent = 0
        while build.poll() is None:
            for pid in [build.pid, *_descendants(build.pid)]:
                try:
                    os.kill(pid, signal.SIGUSR2)
                    sent += 1
                except ProcessLookupError:
                    pass
            time.sleep(0.01)
        out = build.stdout.read().decode()
    finally:
        signal.signal(signal.SIGUSR2, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
    assert build.returncode == 0, out
    assert (tmp_path / "a").is_file() and sent > 10
    assert "sft-bin" not in os.environ["PATH"]


def _descendants(pid: int) -> list:
    import subprocess

    kids = [int(k) for k in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]
    return kids + [d for k in kids for d in _descendants(k)]
