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
to 8192) so that each row is streamed with wide, coalesced loads.
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
def _logits_logprobs_fwd_kernel(
    logits_ptr, labels_ptr, log_probs_ptr, lse_ptr,
    N, V, N_BUCKET, stride_ln, ignore_index, temperature,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid_n = tl.program_id(0)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=ignore_index)
    valid = labels != ignore_index
    arange_v = tl.arange(0, BLOCK_V)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    sum_e = tl.zeros((BLOCK_N,), tl.float32)
    label_z = tl.zeros((BLOCK_N,), tl.float32)
    for v_start in range(0, V, BLOCK_V):
        # Phase 1: one read of the tile, upcast to fp32.
        offs_v = (v_start + arange_v).to(tl.int64)
        mask_v = offs_v < V
        mask = mask_n[:, None] & mask_v[None, :]
        z = tl.load(logits_ptr + offs_n[:, None] * stride_ln + offs_v[None, :], mask=mask, other=0.0)
        z = tl.where(mask_v[None, :], z.to(tl.float32) / temperature, float("-inf"))
        # Phase 2: online log-sum-exp (NaN reaches sum_e through exp even if max drops it)
        # and the label gather (ignored rows match no column).
        m_new = tl.maximum(m, tl.max(z, 1))
        sum_e = sum_e * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        label_z += tl.sum(tl.where((offs_v[None, :] == labels[:, None]) & valid[:, None], z, 0.0), 1)
        m = m_new
    # Phase 3: 8 bytes per row.
    lse = m + tl.log(sum_e)
    tl.store(lse_ptr + offs_n, lse, mask=mask_n)
    tl.store(log_probs_ptr + offs_n, tl.where(valid, label_z - lse, 0.0), mask=mask_n)


@triton.jit
def _logits_logprobs_bwd_kernel(
    grad_ptr, logits_ptr, labels_ptr, lse_ptr, grad_logits_ptr,
    N, V, N_BUCKET, stride_ln, stride_gn, ignore_index, temperature,
    ROUND_BF16: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid_n = tl.program_id(0)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=ignore_index)
    valid = labels != ignore_index
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    # dL/dz_j = g (onehot_j - p_j), and dz/dlogit = 1/T.
    g_over_t = tl.load(grad_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32) / temperature
    arange_v = tl.arange(0, BLOCK_V)
    for v_start in range(0, V, BLOCK_V):
        offs_v = (v_start + arange_v).to(tl.int64)
        mask = mask_n[:, None] & (offs_v < V)[None, :]
        z = tl.load(logits_ptr + offs_n[:, None] * stride_ln + offs_v[None, :], mask=mask, other=0.0)
        probs = tl.exp(z.to(tl.float32) / temperature - lse[:, None])
        onehot = tl.where(offs_v[None, :] == labels[:, None], 1.0, 0.0)
        grad = (onehot - probs) * g_over_t[:, None]
        # Ignored rows are exactly 0 even when their logits are inf/NaN.
        grad = tl.where(valid[:, None], grad, 0.0)
        tl.store(grad_logits_ptr + offs_n[:, None] * stride_gn + offs_v[None, :],
                 to_output(grad, grad_logits_ptr.dtype.element_ty, ROUND_BF16), mask=mask)


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
            logits, labels, log_probs, lse, n, v, bucket(n), logits.stride(0), opts.ignore_index,
            float(opts.temperature))
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
    _launch(_bwd_tuned, _logits_logprobs_bwd_kernel, FIXED_CONFIGS["bwd"], grid, opts.deterministic,
            grad_log_probs, logits, labels, lse, grad_logits, n, v, bucket(n), logits.stride(0),
            grad_logits.stride(0), opts.ignore_index, float(opts.temperature),
            ROUND_BF16=round_flag(logits.dtype))
    return grad_logits
