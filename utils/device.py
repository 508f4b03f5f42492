"""Where and in what precision the work runs: the device, mixed-precision autocast, exact float32 for
decisions, and thread counts, each set for one block and restored after it."""
import contextlib
import os

import torch

from .config import UserError

AMP_DTYPES = ("auto", "float32", "bfloat16")  # float16 is refused: training has no gradient scaler (check_amp_dtype)
# CPU instructions that run bf16 matrix products natively: AMX (Intel Xeon from Sapphire Rapids) and AVX-512 BF16
# (AMD Zen 4 and later, Intel Cooper Lake). bf16 training steps ran 1.5-2.4x faster than float32 on both kinds of
# this project's machines (docs/experiments.md); elsewhere bf16 is emulated and slower.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cores():
    """CPU cores this process may run on: its affinity mask (what a container, Slurm or taskset allows), not the
    machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pick_device(name):
    """'auto' -> cuda when present, else cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("DEVICE=cuda but no CUDA device is available")
    return name


def check_amp_dtype(cfg):
    """AMP_DTYPE one of AMP_DTYPES, with the reason when it is float16."""
    if cfg.AMP_DTYPE == "float16":
        raise UserError("--AMP_DTYPE=float16 is refused: training has no gradient scaler, so float16 gradients "
                        "would underflow; use bfloat16 (same speed on GPUs from Ampere on) or float32")
    if cfg.AMP_DTYPE not in AMP_DTYPES:
        raise UserError(f"--AMP_DTYPE must be one of {', '.join(AMP_DTYPES)}, got {cfg.AMP_DTYPE!r}")


def cpu_flags():
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def resolve_amp_dtype(amp_dtype, device):
    """(dtype, why): AMP_DTYPE 'auto' is bfloat16 on a GPU that supports it and on a CPU with bf16 matrix
    instructions (BF16_CPU_FLAGS), else float32; any other value is kept."""
    if amp_dtype != "auto":
        return amp_dtype, "as asked"
    if torch.device(device).type == "cuda":  # asked of this rank's GPU (set before: utils.dist.join)
        return (("bfloat16", "this GPU runs it") if gpu_runs_bf16() else
                ("float32", "this GPU has no native bf16 (emulated bf16 is slower than float32)"))
    found = [flag for flag in BF16_CPU_FLAGS if flag in cpu_flags()]
    if found:
        return "bfloat16", f"this CPU has {' and '.join(found)}"
    return "float32", f"this CPU has neither {' nor '.join(BF16_CPU_FLAGS)}"


def gpu_runs_bf16():
    """Whether the current GPU runs bf16 natively (Ampere and later); emulated bf16 does not count."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch without the argument: it counted native support only
        return torch.cuda.is_bf16_supported()


def autocast(device, amp_dtype):
    """Mixed-precision autocast in `amp_dtype` on `device` (CPU too, so the bf16 path can be tested anywhere);
    plain float32 when amp_dtype is 'float32'."""
    if amp_dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=getattr(torch, amp_dtype))


def _precision_settings():
    """The backend objects whose float32 precision is set: the fp32_precision settings of torch 2.9 and later
    (mixing them with the older allow_tf32 switches is an error there), else the allow_tf32 switches."""
    conv, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision") and hasattr(getattr(conv, "conv", None), "fp32_precision"):
        return [(conv.conv, "fp32_precision", "ieee"), (matmul, "fp32_precision", "ieee")]
    return [(conv, "allow_tf32", False), (matmul, "allow_tf32", False)]


@contextlib.contextmanager
def exact_float32():
    """True float32 inside the block (no TF32 in cuDNN convolutions or matrix products), as the CPU computes it:
    the accuracies that decide (the budget floor, each candidate) are measured alike on every device."""
    settings = _precision_settings()
    before = [getattr(obj, name) for obj, name, _ in settings]
    for obj, name, exact in settings:
        setattr(obj, name, exact)
    try:
        yield
    finally:
        for (obj, name, _), value in zip(settings, before):
            setattr(obj, name, value)


@contextlib.contextmanager
def cudnn_autotune(device):
    """cuDNN's benchmark mode for the block when `device` is CUDA (every training shape is fixed, so the fastest
    convolution algorithms are picked once), then restored; nothing on the CPU."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = before or torch.device(device).type == "cuda"
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def reset_peak_gpu_memory(device):
    """Start counting peak GPU memory afresh (peak_gpu_mib); nothing on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gpu_mib(device):
    """Peak GPU memory allocated on `device` since reset_peak_gpu_memory (MiB), None on the CPU."""
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


@contextlib.contextmanager
def torch_threads(n):
    """PyTorch's intra-op thread count set to n for the block, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
