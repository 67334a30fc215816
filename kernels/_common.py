"""Helpers shared by the dpo_fast Triton kernels: interpreter detection, dtype checks and
small ``@triton.jit`` building blocks (tanh, round-to-nearest bf16 stores).

Workarounds for the Triton CPU interpreter (``TRITON_INTERPRET=1``, measured on triton 3.9)
live here so that every kernel applies them the same way:

* ``tl.dot`` on bf16 operands is silently wrong under the interpreter, so launchers pass
  ``UPCAST_DOT=True`` there and kernels upcast the loaded tiles to fp32 before the dot; on
  the GPU the operands stay bf16/fp16 and feed the tensor cores with fp32 accumulation.
* float32 -> bfloat16 casts truncate under the interpreter (round toward zero, up to one
  full ulp of error and a bias toward zero). Kernels that store bf16 pass
  ``ROUND_BF16=True`` there and round to nearest-even by hand on the fp32 bit pattern
  before the cast, so the interpreter rounds as the GPU does.
* ``libdevice`` fails under the interpreter, so tanh is built from ``tl.exp``.
* ``triton.autotune`` with more than one config fails under the interpreter, so the config
  lists are pruned to a single config there (:func:`configs_for`).

Versions: the kernels must run on triton 3.6 (GPU machines) and 3.9 (CPU CI). Two 3.6
differences matter here:

* triton 3.6's autotuner calls ``.zero_()`` / ``.clone()`` on every ``reset_to_zero`` /
  ``restore_value`` argument without a None check (3.9 skips None), and only while tuning
  several configs, i.e. on a GPU: launchers always pass tensors there (dummies if unused).
* triton 3.6's interpreter turns a scalar kernel argument used as a Python int (e.g.
  ``range(0, V, BLOCK_V)``) into one with ``int()`` on a 1-element array, which numpy >= 2.4
  rejects ("only 0-dimensional arrays can be converted to Python scalars"; 3.9 squeezes
  first). Run the interpreted tests under triton 3.6 with numpy < 2.4; compiled GPU runs
  do not go through the interpreter and are unaffected.

``INTERPRET`` is read once at import: like Triton itself, the decision is made when the
``@triton.jit`` functions are defined, so ``TRITON_INTERPRET`` must be set before import.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def configs_for(gpu_configs, interpret_config):
    """The autotune config list: the Hopper list on a GPU, one config under the interpreter."""
    return [interpret_config] if INTERPRET else list(gpu_configs)


def bucket(n: int) -> int:
    """Shape bucket used as an autotune key: the next power of two, at least 16.

    Token counts change every batch; keying the autotuner on the exact count would re-tune
    for every batch, keying on its power-of-two bucket tunes once per size class.
    """
    return max(16, triton.next_power_of_2(int(n)))


def fp32_dot_precision() -> str:
    """``tl.dot`` input precision for float32 operands, following PyTorch's setting.

    ``torch.get_float32_matmul_precision()`` (also set by
    ``torch.backends.cuda.matmul.allow_tf32``): "highest" (PyTorch's default) keeps true
    fp32 products ("ieee", FMA units, no tensor cores); "high" and "medium" allow TF32
    tensor cores ("tf32": 10-bit mantissa operands, fp32 accumulation), as they do for
    every PyTorch fp32 matmul. Read at each launch, so changing the setting takes effect
    on the next call.
    """
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def dot_flags(dtype: torch.dtype) -> dict:
    """Constexpr flags describing how ``tl.dot`` is fed for operands of ``dtype``."""
    return {
        "UPCAST_DOT": INTERPRET and dtype != torch.float32,
        # 16-bit operands: tensor cores (the precision flag is ignored for them).
        "DOT_PRECISION": fp32_dot_precision() if dtype == torch.float32 else "tf32",
    }


def config_class(dtype: torch.dtype) -> str:
    """Which config list a launch uses: "16" (bf16/fp16 tensor cores), "tf32", "ieee" (fp32 FMA)."""
    return "16" if dtype != torch.float32 else fp32_dot_precision()


def pick_config(table: dict, op: str, dtype: torch.dtype):
    """``table[op]``: one config for every dtype, or a dict keyed by :func:`config_class`."""
    entry = table[op]
    return entry[config_class(dtype)] if isinstance(entry, dict) else entry


def round_flag(dtype: torch.dtype) -> bool:
    """ROUND_BF16 for kernels storing ``dtype``: hand rounding under the interpreter only."""
    return INTERPRET and dtype == torch.bfloat16


def check_dtype(name: str, t: torch.Tensor):
    if t.dtype == torch.float64:
        raise TypeError(
            f"dpo_fast Triton kernels support float32, bfloat16 and float16; {name} is float64. "
            "Use impl='torch' or impl='reference' for float64 (impl='auto' does this)."
        )
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dpo_fast Triton kernels: {name} must be float32, bfloat16 or float16, got {t.dtype}")


def check_contiguous_2d(name: str, t: torch.Tensor):
    if t.dim() != 2:
        raise ValueError(f"dpo_fast Triton kernels: {name} must be 2-D, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"dpo_fast Triton kernels: {name} must be contiguous")


def check_labels(labels: torch.Tensor, n: int):
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"dpo_fast Triton kernels: labels must have shape [{n}], got {tuple(labels.shape)}")
    if labels.dtype != torch.int64:
        raise TypeError(f"dpo_fast Triton kernels: labels must be int64, got {labels.dtype}")
    if not labels.is_contiguous():
        raise ValueError("dpo_fast Triton kernels: labels must be contiguous")


def check_vector(name: str, t: torch.Tensor, n: int, dtype=None):
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"dpo_fast Triton kernels: {name} must have shape [{n}], got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"dpo_fast Triton kernels: {name} must be {dtype}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"dpo_fast Triton kernels: {name} must be contiguous")


@triton.jit
def tanh(x):
    """tanh from one exp (libdevice is unavailable under the interpreter).

    ``tanh(|x|) = (1 - e) / (1 + e)`` with ``e = exp(-2|x|)`` in (0, 1]: no overflow for
    any x, exact +-1 in the tails, NaN in -> NaN out. Absolute error ~1e-7 near 0.
    """
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def to_output(x, dtype: tl.constexpr, ROUND_BF16: tl.constexpr):
    """Cast fp32 ``x`` to the store dtype, rounding to nearest-even for bf16 under the interpreter.

    Round half to even on the bit pattern: add 0x7FFF plus the lowest kept bit, keep the
    high 16 bits and reinterpret them as bf16 (``dtype`` must then be bf16). NaN payloads
    could carry into the sign bit, so NaN is truncated with the quiet bit set (stays NaN).
    """
    if ROUND_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(x != x, (bits >> 16) | 0x40, rounded)  # NaN: keep sign, force quiet bit
        # Reinterpret the top 16 bits as bf16 (a plain cast there would also flush
        # subnormals to zero under the interpreter).
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)
