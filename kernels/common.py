"""Small helpers shared by the kernel wrappers: launch sizing, dtype checks, device facts."""

from __future__ import annotations

import functools
import os

import torch
import triton

FLOAT_DTYPES = (torch.float32, torch.bfloat16)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def interpreting() -> bool:
    """True when kernels run through the Triton interpreter (CPU tensors, numpy semantics)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_dtype(dtype: torch.dtype):
    """Operand dtype of `tl.dot` for inputs of `dtype`: bf16 stays bf16 on a GPU; the interpreter multiplies
    bf16 operands as raw integers, so there everything is float32."""
    import triton.language as tl

    if dtype == torch.bfloat16 and not interpreting():
        return tl.bfloat16
    return tl.float32


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (a nominal 4 for the interpreter, to keep grids small)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def check_contiguous(**tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None:
            assert t.is_contiguous(), f"{name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()})"


def check_dtype(name: str, t: torch.Tensor, *dtypes: torch.dtype) -> None:
    assert t.dtype in dtypes, f"{name} has dtype {t.dtype}, expected one of {dtypes}"


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    devices = {t.device for t in tensors.values() if t is not None}
    assert len(devices) == 1, f"tensors on several devices: { {k: str(t.device) for k, t in tensors.items() if t is not None} }"
    return devices.pop()


def triton_version() -> tuple[int, int]:
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)
