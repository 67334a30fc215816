"""``log_softmax(logits / T).gather(labels)`` over materialised logits, in Triton.

Shapes: ``logits [N, V]`` contiguous, ``labels [N]`` int64 in ``[0, V)`` or
``opts.ignore_index`` (those rows give 0 and a zero gradient row).

Forward (``_logits_logprobs_fwd_kernel``, one program per BLOCK_N rows): sweep the row in
BLOCK_V tiles, each element read exactly once, folding into an online log-sum-exp (running
max and rescaled ``sum exp(z - m)``) and picking the label's logit from the tile that holds
it. Bytes: ``N * V * elt`` read, 8 bytes per row written (log-prob and lse).

Backward (``_logits_logprobs_bwd_kernel``): the same sweep recomputes ``p = exp(z - lse)``
from the saved lse and writes ``g * (onehot - p) / T`` straight into the gradient in the
logits dtype: ``N * V * elt`` read and ``N * V * elt`` written, no fp32 ``[N, V]`` buffer.
Both kernels are memory bound; the GPU configs favour long rows per program (BLOCK_V up
to 8192) so that each row is streamed with wide, coalesced loads. With an odd vocabulary
the rows are not 16-byte aligned: the sweep then starts each row at the preceding aligned
address (ODD, see ``_load_row_tile``) and only the first and last tile of a row are masked, so
the interior tiles keep 16-byte loads and stores (checked by tests/test_gpu_readiness.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import bucket, check_contiguous_2d, check_dtype, check_vector, configs_for, round_flag, to_output


def _cfg(num_warps=4, **blocks):
    return triton.Config(blocks, num_warps=num_warps, num_stages=2)


_GPU_CONFIGS = [
    _cfg(BLOCK_N=1, BLOCK_V=4096, num_warps=8),
    _cfg(BLOCK_N=1, BLOCK_V=8192, num_warps=16),
    _cfg(BLOCK_N=2, BLOCK_V=2048, num_warps=8),
    _cfg(BLOCK_N=4, BLOCK_V=1024, num_warps=4),
]
_INTERPRET_CONFIG = _cfg(BLOCK_N=64, BLOCK_V=256)

# The config used with opts.deterministic=True (never autotuned). Tests may patch it.
FIXED_CONFIGS = {"fwd": configs_for(_GPU_CONFIGS, _INTERPRET_CONFIG)[0],
                 "bwd": configs_for(_GPU_CONFIGS, _INTERPRET_CONFIG)[0]}


@triton.jit
def _load_row_tile(ptr, row, shift, v_start, arange_v, mask_n, full_rows, V, ALIGN: tl.constexpr, ODD: tl.constexpr):
    """One ``[BLOCK_N, BLOCK_V]`` tile of rows ``row`` (element offsets): its values, mask and
    vocab ids, and whether it is interior (every element in bounds: loaded unmasked).

    Odd row strides (an odd vocabulary): row starts are not 16-byte aligned, so loads and
    stores would be split into 2-byte accesses. ``row`` is then rounded down to a multiple of
    ALIGN elements (16 bytes; the tile covers vocab ids ``v_start - shift + arange``) so
    every tile address is 16-byte aligned, and interior tiles go unmasked, i.e. vectorised;
    only each row's first and last tile are masked.
    """
    ptrs = ptr + row[:, None] + (v_start + arange_v)[None, :]
    if ODD:
        cols = (v_start + arange_v)[None, :] - shift[:, None]
        mask = mask_n[:, None] & (cols >= 0) & (cols < V)
        interior = full_rows & (v_start >= ALIGN) & (v_start + arange_v.shape[0] <= V)
    else:
        cols = (v_start + arange_v)[None, :].to(tl.int64)
        mask = mask_n[:, None] & (cols < V)
        interior = full_rows & (v_start + arange_v.shape[0] <= V)
    if interior:
        z = tl.load(ptrs)
    else:
        z = tl.load(ptrs, mask=mask, other=0.0)
    return z, mask, cols, interior


@triton.jit
def _row_offsets(offs_n, stride, ALIGN: tl.constexpr, ODD: tl.constexpr):
    row = offs_n * stride
    if ODD:
        shift = row % ALIGN
        row = tl.multiple_of(row - shift, ALIGN)
    else:
        shift = row * 0
    return row, shift


@triton.jit
def _logits_logprobs_fwd_kernel(
    logits_ptr, labels_ptr, log_probs_ptr, lse_ptr,
    N, V, N_BUCKET, v_end, stride_ln, ignore_index, temperature,
    ALIGN: tl.constexpr, ODD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid_n = tl.program_id(0)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    full_rows = (pid_n + 1) * BLOCK_N <= N
    labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=ignore_index)
    valid = labels != ignore_index
    row, shift = _row_offsets(offs_n, stride_ln, ALIGN, ODD)
    arange_v = tl.arange(0, BLOCK_V)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    sum_e = tl.zeros((BLOCK_N,), tl.float32)
    label_z = tl.zeros((BLOCK_N,), tl.float32)
    for v_start in range(0, v_end, BLOCK_V):
        # Phase 1: one read of the tile (unmasked and vectorised when interior), upcast to fp32.
        z, mask, cols, interior = _load_row_tile(logits_ptr, row, shift, v_start, arange_v, mask_n, full_rows, V,
                                                 ALIGN, ODD)
        z = tl.where(mask, z.to(tl.float32) / temperature, float("-inf"))
        # Phase 2: online log-sum-exp (NaN reaches sum_e through exp even if max drops it)
        # and the label gather (ignored rows match no column).
        m_new = tl.maximum(m, tl.max(z, 1))
        sum_e = sum_e * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        label_z += tl.sum(tl.where((cols == labels[:, None]) & valid[:, None], z, 0.0), 1)
        m = m_new
    # Phase 3: 8 bytes per row.
    lse = m + tl.log(sum_e)
    tl.store(lse_ptr + offs_n, lse, mask=mask_n)
    tl.store(log_probs_ptr + offs_n, tl.where(valid, label_z - lse, 0.0), mask=mask_n)


@triton.jit
def _logits_logprobs_bwd_kernel(
    grad_ptr, logits_ptr, labels_ptr, lse_ptr, grad_logits_ptr,
    N, V, N_BUCKET, v_end, stride_ln, ignore_index, temperature,
    ALIGN: tl.constexpr, ODD: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """grad_logits has the logits' strides (``empty_like`` of a contiguous tensor): one set
    of row offsets serves the load and the store."""
    pid_n = tl.program_id(0)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    full_rows = (pid_n + 1) * BLOCK_N <= N
    labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=ignore_index)
    valid = labels != ignore_index
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    # dL/dz_j = g (onehot_j - p_j), and dz/dlogit = 1/T.
    g_over_t = tl.load(grad_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32) / temperature
    row, shift = _row_offsets(offs_n, stride_ln, ALIGN, ODD)
    arange_v = tl.arange(0, BLOCK_V)
    for v_start in range(0, v_end, BLOCK_V):
        z, mask, cols, interior = _load_row_tile(logits_ptr, row, shift, v_start, arange_v, mask_n, full_rows, V,
                                                 ALIGN, ODD)
        probs = tl.exp(z.to(tl.float32) / temperature - lse[:, None])
        onehot = tl.where(cols == labels[:, None], 1.0, 0.0)
        grad = (onehot - probs) * g_over_t[:, None]
        # Ignored rows are exactly 0 even when their logits are inf/NaN.
        grad = to_output(tl.where(valid[:, None], grad, 0.0), grad_logits_ptr.dtype.element_ty, ROUND_BF16)
        out = grad_logits_ptr + row[:, None] + (v_start + arange_v)[None, :]
        if interior:
            tl.store(out, grad)
        else:
            tl.store(out, grad, mask=mask)


_fwd_tuned = triton.autotune(configs=configs_for(_GPU_CONFIGS, _INTERPRET_CONFIG),
                             key=["N_BUCKET", "V"])(_logits_logprobs_fwd_kernel)
_bwd_tuned = triton.autotune(configs=configs_for(_GPU_CONFIGS, _INTERPRET_CONFIG),
                             key=["N_BUCKET", "V"])(_logits_logprobs_bwd_kernel)


def _launch(tuned, kernel, cfg, grid, deterministic, *args, **kwargs):
    if deterministic:
        kernel[grid](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        tuned[grid](*args, **kwargs)


def _check(logits, labels):
    check_dtype("logits", logits)
    check_contiguous_2d("logits", logits)
    if logits.shape[1] == 0:
        raise ValueError("dpo_fast Triton kernels: logits has an empty vocabulary dimension")
    if labels.dtype != torch.int64:
        raise TypeError(f"dpo_fast Triton kernels: labels must be int64, got {labels.dtype}")
    check_vector("labels", labels, logits.shape[0])
    if labels.device != logits.device:
        raise ValueError(f"dpo_fast Triton kernels: labels on {labels.device}, logits on {logits.device}")


def _align_flags(logits):
    """ALIGN: elements per 16 bytes; ODD: rows do not all start 16-byte aligned."""
    align = 16 // logits.element_size()
    return {"ALIGN": align, "ODD": logits.stride(0) % align != 0}


def _sweep(logits):
    """``(v_end, row stride)``: with ODD rows the sweep starts up to ALIGN - 1 ids early."""
    v, align = logits.shape[1], 16 // logits.element_size()
    return (v + align - 1 if logits.stride(0) % align else v), logits.stride(0)


def logits_logprobs_fwd(logits, labels, opts):
    """``(log_probs [N] fp32, lse [N] fp32)``; log_probs is 0 where labels == ignore_index."""
    _check(logits, labels)
    n, v = logits.shape
    log_probs = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return log_probs, lse
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _launch(_fwd_tuned, _logits_logprobs_fwd_kernel, FIXED_CONFIGS["fwd"], grid, opts.deterministic,
            logits, labels, log_probs, lse, n, v, bucket(n), *_sweep(logits), opts.ignore_index,
            float(opts.temperature), **_align_flags(logits))
    return log_probs, lse


def logits_logprobs_bwd(grad_log_probs, logits, labels, lse, opts):
    """``grad_logits [N, V]`` in logits.dtype: ``g (onehot - softmax(z)) / T``, 0 rows where ignored."""
    _check(logits, labels)
    n, v = logits.shape
    check_vector("grad_log_probs", grad_log_probs, n)
    check_vector("lse", lse, n, torch.float32)
    grad_logits = torch.empty_like(logits)
    if n == 0:
        return grad_logits
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    assert grad_logits.stride() == logits.stride()
    _launch(_bwd_tuned, _logits_logprobs_bwd_kernel, FIXED_CONFIGS["bwd"], grid, opts.deterministic,
            grad_log_probs, logits, labels, lse, grad_logits, n, v, bucket(n), *_sweep(logits),
            opts.ignore_index, float(opts.temperature), ROUND_BF16=round_flag(logits.dtype), **_align_flags(logits))
    return grad_logits
