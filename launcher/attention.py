"""Which attention kernel a run uses, the batch layout it needs, and the combinations that would be wrong.

auto picks, where the ranks train: flash_attention_2 on CUDA when the flash-attn package is
installed, else flex_attention (torch's own block-sparse attention, no compiled package); sdpa on CPU.
With sequence parallelism (trainer.sequence_parallel > 1) auto never picks flex_attention, which
Ulysses cannot keep packed rows apart in (SP_REFUSED): sdpa instead.
"""

from importlib.util import find_spec
from typing import List

from launcher.errors import problem

# Kernels fed one row per micro-batch with explicit sequence boundaries (launcher.data.collate).
ONE_ROW_KERNELS = ("flash_attention_2", "flex_attention")

# Kernels DeepSpeed's Ulysses cannot train correctly with sequence parallelism, and why.
SP_REFUSED = {
    "eager": "DeepSpeed's Ulysses refuses eager: it materialises a full (seq x seq) mask per layer; use sdpa or flash_attention_2",
    "flex_attention": "DeepSpeed rebuilds flex_attention's block mask as plain causal after the all-to-all, so packed "
                      "examples would attend to each other; use flash_attention_2 or sdpa",
}


def resolve_attn_implementation(name: str, device_type: str, precision: str = "bf16", sequence_parallel: int = 1) -> str:
    if name != "auto":
        return name
    if device_type == "cuda":
        # flash-attn computes in 16 bits only, on Ampere or newer (checked where the ranks run).
        flash = find_spec("flash_attn") and precision != "fp32" and cuda_capability() >= (8, 0)
        return "flash_attention_2" if flash else "flex_attention" if sequence_parallel == 1 else "sdpa"
    return "sdpa"


def cuda_capability() -> tuple:
    """The local GPU's compute capability; on a login node without one, assume the compute nodes' is recent."""
    import sys

    torch = sys.modules.get("torch")  # the login side never imports torch for this
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_capability()
    return (9, 0)


def attention_problems(name: str, device_type: str, precision: str, sequence_parallel: int = 1) -> List[str]:
    """Kernel choices that cannot train here, each with its reason and what would work."""
    kernel = resolve_attn_implementation(name, device_type, precision, sequence_parallel)
    key = "model.attn_implementation"
    shown = kernel if kernel == name else f"{name} (= {kernel})"
    if sequence_parallel > 1 and kernel in SP_REFUSED:
        return [problem(key, shown, f"with trainer.sequence_parallel={sequence_parallel}: {SP_REFUSED[kernel]}")]
    if kernel == "flash_attention_2" and device_type != "cuda":
        return [problem(key, shown, "flash-attn runs on CUDA GPUs only and these ranks train on the CPU; use sdpa or eager")]
    if kernel == "flash_attention_2" and precision == "fp32":
        return [problem(key, shown, "flash-attn computes in bf16 or fp16 only (trainer.precision=fp32); "
                        "use trainer.precision=bf16 or model.attn_implementation=sdpa")]
    if kernel == "flex_attention" and device_type != "cuda":
        return [problem(key, shown, "torch has no CPU backward for flex_attention and these ranks train on the CPU; "
                        "use sdpa or eager")]
    return []


def loss_problems(loss: str, device_type: str) -> List[str]:
    if loss != "liger":
        return []
    if device_type != "cuda":
        return [problem("trainer.loss", loss, "Liger's kernels are Triton, GPU only, and these ranks train on the CPU; "
                        "use chunked")]
    if find_spec("liger_kernel") is None:
        return [problem("trainer.loss", loss, "liger-kernel is not installed (pip install liger-kernel); use chunked")]
    return []
