"""The trainer, imported in a fresh process (torch, DeepSpeed), gets collate as a function."""


def test_the_trainer_gets_the_collate_function_not_its_module():
    """`launcher.data.collate` is both a module and the function the package exports; a lazy
    export once handed the trainer the module, and every padded run failed at its first batch."""
    import subprocess
    import sys

    check = "import launcher.trainer as t, launcher.data as d; assert callable(t.collate) and callable(d.collate)"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
