"""Where and in what precision the work runs: the device, mixed-precision autocast, exact float32 for
decisions, and thread counts, each set for one block and restored after it."""
import contextlib

import torch

from .config import UserError

AMP_DTYPES = ("float32", "bfloat16", "float16")


def pick_device(name):
    """'auto' -> cuda when present, else cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("DEVICE=cuda but no CUDA device is available")
    return name


def autocast(device, amp_dtype):
    """Mixed-precision autocast in `amp_dtype` on `device` (CPU too, so the bf16 path can be tested anywhere);
    plain float32 when amp_dtype is 'float32'."""
    if amp_dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=getattr(torch, amp_dtype))


@contextlib.contextmanager
def exact_float32():
    """True float32 inside the block (no TF32 in cuDNN convolutions or matrix products), as the CPU computes it:
    the accuracies that decide (the budget floor, each candidate) are measured alike on every device."""
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


@contextlib.contextmanager
def torch_threads(n):
    """PyTorch's intra-op thread count set to n for the block, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
