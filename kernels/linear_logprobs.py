"""Fused ``lm_head -> log_softmax -> gather`` in Triton: forward and backward launchers.

Shapes: ``hidden [N, H]`` (compacted rows, every label in ``[0, V)``), ``weight [V, H]``,
``bias [V]`` or None. The transformed logit is ``z = c * tanh(s * scale / c) / T`` with
``s = h @ W.T + b`` (the tanh softcap ``c`` is optional), so ``dz/ds = scale * (1 - tanh^2) / T``
(``scale / T`` without softcap). No ``[N, V]`` tensor is ever allocated.

Forward (``_linear_logprobs_fwd_kernel``, one program per block of BLOCK_N tokens):
  phase 1, for each vocab tile of BLOCK_V rows of W: ``s = h_blk @ W_tile.T`` over H in
  BLOCK_K steps with fp32 accumulation (bf16/fp16 operands on the tensor cores), then
  bias, scale, softcap, temperature in fp32 registers;
  phase 2, same tile: fold into the online log-sum-exp (running max ``m``, running
  ``sum exp(z - m)`` rescaled by ``exp(m_old - m_new)``), gather the label's logit, and
  update the optional statistics (entropy, log sum p^2, sum z, first argmax);
  phase 3: write log p(label), lse and the extras, 4 bytes per token each.
  Bytes: W is read once per token block (``ceil(N / BLOCK_N) * V * H * elt``, served
  mostly from L2 when neighbouring programs sweep the same tiles), hidden once per vocab
  tile (from L2/SMEM); writes are O(N).
  Split vocabulary (:func:`fwd_split`): one program per token block gives only
  ``ceil(N / BLOCK_N)`` programs (16 at N=2048 with 128-token blocks, against 132 SMs on
  an H100), so when that is below FWD_WAVES (2) waves the grid becomes (token block,
  vocabulary slice) pairs; each program writes its slice's partial statistics instead of
  phase 3, and ``_linear_logprobs_merge_kernel`` folds the slices in a fixed order (same
  algebra as the tile fold, first maximum wins across slices) and runs phase 3. The split
  depends only on N, V and the SM count, so results are reproducible for a given device.

Backward, per vocabulary chunk of ``C`` columns (``C`` chosen so that the chunk's gradient
of the logits fits in ``SCRATCH_BYTES``):
  ``_linear_logprobs_bwd_kernel`` (grid token blocks x vocab tiles of the chunk) recomputes
  each logit tile exactly as the forward does, forms
  ``G = g * (onehot(label) - exp(z - lse)) * dz/ds`` in fp32 and writes it once, in the
  operand dtype, to a ``[N, C]`` scratch (plus fp32 per-token-block column sums for the
  bias gradient); then two tiled matmuls (``_grad_matmul_kernel``) consume it:
  ``grad_h[N, H] += G @ W_chunk`` into an fp32 accumulator (read-modify-write once per
  chunk; "Memory" below says where it lives) and ``grad_W_chunk[C, H] = G.T @ h`` with the
  reduction over all N tokens inside one program's fp32 registers, cast to the weight
  dtype once at the store.
  FLOPs: 2NHV (recompute) + 2NHV + 2NHV, the minimum for a recompute scheme; extra bytes:
  the scratch is written once and read twice (``3 * N * V * elt`` in total, e.g. ~13 GB
  against ~5e16 FLOPs at the headline shape), and the fp32 grad_h accumulator is read and
  written once per chunk.

Memory beyond inputs, outputs and gradients (issue 3 target: <= 256 MiB at the headline
shape N=16384 tokens, H=4096, V=128256, bf16):
  * the ``[N, C]`` scratch, at most SCRATCH_BYTES = 64 MiB (C = 2048 columns in bf16,
    1024 in fp32 at N=16384; 63 resp. 126 vocab chunks);
  * the grad_h running sum across vocab chunks must stay fp32 (rounding it to bf16 after
    each of the 63 chunks would add ~sqrt(63) ~ 8 bf16 roundings of error, an estimate,
    where the naive bf16 path rounds once). fp32 hidden:
    the output grad_hidden is that accumulator, 0 extra bytes. bf16/fp16 hidden: the fp32
    bit pattern is split in two 16-bit halves, the high half stored (as raw bits) in the
    grad_hidden output itself and the low half in one ``[N, H]`` 16-bit buffer; the last
    chunk reassembles the fp32 sum and rounds it once into grad_hidden. Reassembly is
    exact, so the result is bit-identical to a separate fp32 accumulator (tested), the
    read-modify-write traffic is the same 4 bytes per element per chunk, and the final
    fp32 -> bf16 conversion pass is gone. Extra: ``2 * N * H`` bytes = 128 MiB instead of
    the ``4 * N * H`` = 256 MiB of an fp32 buffer (GRAD_HIDDEN_SPLIT_ACC=False brings that
    buffer back). With a single chunk (V <= C) no low-half buffer is allocated;
  * fp32 bias partial sums, ``ceil(N / 64) * C * 4`` bytes (2 MiB at the headline shape),
    only with a bias.
  Headline bf16: 64 + 128 (+2 with bias) = 192-194 MiB (was 64 + 256 = 320 MiB with the
  separate fp32 accumulator).
  Headline fp32: 64 MiB (+1 with bias). The low-half buffer grows with N: bf16 stays under
  256 MiB while ``2 * N * H <= 190 MiB``, i.e. N <= ~24000 at H=4096. Two caveats, both
  arithmetic, not measured (no GPU when this was written): the first autotuning of the
  grad_h matmul for a shape bucket clones its restore_value arguments (grad_hidden and
  the low halves, another 256 MiB at the headline shape) once per process; and the public
  ops add their own copies outside this launcher (compacting the valid rows of a padded
  batch copies hidden, and its gradient is scattered back into a zero-filled padded one).

Why not fuse the two gradient matmuls into the recompute kernel: its program would have to
own a ``[BLOCK_N, H]`` slice of grad_h and a ``[BLOCK_V, H]`` slice of grad_W; at
H = 4096 that is 1-2 MiB of fp32 per program, far beyond registers/SMEM, so either the
accumulators go to global memory with atomics (``N * V * H * (1/BLOCK_N + 1/BLOCK_V)``
fp32 read-modify-writes, hundreds of GB at the headline shape, and non-deterministic), or
the logits are recomputed once per H slice. Writing G once and reading it twice costs a few
percent of the matmul time instead (an estimate from byte and FLOP counts, not a
measurement: no GPU was available when this was written).

Determinism: nothing here uses atomics and every reduction has a fixed order for a given
config, so the backward is already run-to-run reproducible with a fixed config. What can
change bits between runs is the autotuner picking a different config (a different BLOCK_K
changes the fp32 summation order) in another process. ``opts.deterministic=True`` therefore
launches every kernel with the fixed config in ``FIXED_CONFIGS`` and never autotunes; the
default autotunes (keyed on power-of-two shape buckets) and caches the choice per process.
The cost of determinism is only that of not tuning.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    bucket, check_contiguous_2d, check_dtype, check_labels, check_vector, config_class, configs_for, dot_flags,
    pick_config, round_flag, tanh, to_output,
)

# Bytes allowed for the [N, C] gradient-of-logits scratch of one backward vocab chunk.
SCRATCH_BYTES = 64 << 20
# Minimum chunk width (and granularity) in vocab entries.
CHUNK_ALIGN = 128
# bf16/fp16 grad_hidden: keep the fp32 running sum across vocab chunks split into 16-bit
# halves (high half in the output, low half in one [N, H] 16-bit buffer) instead of a
# separate fp32 [N, H] buffer. Bit-identical results; False restores the fp32 buffer
# (kept for the test that checks the two agree bit for bit).
GRAD_HIDDEN_SPLIT_ACC = True


def _cfg(num_warps=4, num_stages=3, **blocks):
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


# Hopper (H100) candidates, one list per config class (:func:`._common.config_class`):
# "16" bf16/fp16 operands on wgmma, "tf32" fp32 operands on wgmma (twice the bytes per
# K step, so half the BLOCK_K), "ieee" true fp32 products on the FMA units (no tensor
# cores: small tiles, the operands go through registers). Every entry compiles for sm_90
# within the 227 KiB shared-memory limit and without spills inside the MMA loop; the
# FIXED_CONFIGS entries compile without any spill (tests/test_gpu_readiness.py checks
# both, ``python -m dpo_fast.kernels.compile_check --full`` prints the whole table).
# Measured with the compile sweep (triton 3.9 and 3.6): the 128x256 tiles (128
# accumulator registers per thread at 8 warps plus same-shaped epilogue temporaries) spill
# hundreds of words in the epilogue with every flag set and were dropped; 128-token tiles
# get a 16-warp variant (64 accumulator registers per thread). The first entry of each
# list (FIXED_CONFIGS) has no spill at all with either triton, also with bias, softcap and
# every extra output (the forward's 64x256 tile is spill-free with 3.9 but spills ~40
# words in its epilogue with 3.6, hence 64x128 first).
_FWD_GPU_CONFIGS = {
    "16": [
        _cfg(BLOCK_N=64, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=4),
        _cfg(BLOCK_N=64, BLOCK_V=256, BLOCK_K=64, num_warps=8, num_stages=4),
        _cfg(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=4),
        _cfg(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, num_warps=16, num_stages=4),
    ],
    "tf32": [
        _cfg(BLOCK_N=64, BLOCK_V=128, BLOCK_K=32, num_warps=8, num_stages=4),
        _cfg(BLOCK_N=64, BLOCK_V=256, BLOCK_K=32, num_warps=8, num_stages=4),
        _cfg(BLOCK_N=128, BLOCK_V=128, BLOCK_K=32, num_warps=8, num_stages=4),
    ],
    "ieee": [
        _cfg(BLOCK_N=64, BLOCK_V=64, BLOCK_K=32, num_warps=4, num_stages=2),
        _cfg(BLOCK_N=64, BLOCK_V=128, BLOCK_K=32, num_warps=8, num_stages=2),
        _cfg(BLOCK_N=32, BLOCK_V=128, BLOCK_K=32, num_warps=4, num_stages=2),
    ],
}
_BWD_GPU_CONFIGS = {
    "16": [
        _cfg(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=4),
        _cfg(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, num_warps=16, num_stages=4),
        _cfg(BLOCK_N=64, BLOCK_V=256, BLOCK_K=64, num_warps=8, num_stages=4),
        _cfg(BLOCK_N=64, BLOCK_V=128, BLOCK_K=64, num_warps=4, num_stages=4),
    ],
    "tf32": _FWD_GPU_CONFIGS["tf32"],
    "ieee": _FWD_GPU_CONFIGS["ieee"],
}
# grad_h's epilogue also reads and writes the split fp32 accumulator (two 16-bit halves):
# its wide tiles need 16 warps; grad_W's plain epilogue fits 8.
_GRAD_HIDDEN_GPU_CONFIGS = {
    "16": [
        _cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
        _cfg(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=16, num_stages=3),
        _cfg(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=16, num_stages=3),
    ],
    "tf32": [
        _cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=4),
        _cfg(BLOCK_M=128, BLOCK_N=256, BLOCK_K=32, GROUP_M=8, num_warps=16, num_stages=3),
    ],
    "ieee": [
        _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2),
        _cfg(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=2),
        _cfg(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=2),
    ],
}
_GRAD_WEIGHT_GPU_CONFIGS = {
    "16": [
        _cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
        _cfg(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
        _cfg(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
        _cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=4),
    ],
    "tf32": _GRAD_HIDDEN_GPU_CONFIGS["tf32"],
    "ieee": _GRAD_HIDDEN_GPU_CONFIGS["ieee"],
}
# Interpreter: few, large blocks (its cost grows with the number of block operations),
# still small enough that the test shapes (V=507, H=123) cross several tiles and K steps.
_FWD_INTERPRET_CONFIG = _cfg(BLOCK_N=64, BLOCK_V=256, BLOCK_K=64)
_BWD_INTERPRET_CONFIG = _cfg(BLOCK_N=64, BLOCK_V=256, BLOCK_K=64)
_MATMUL_INTERPRET_CONFIG = _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=4)


def _fixed(gpu_configs, interpret_config):
    """The deterministic config per class (the first of each list), or the interpreter's."""
    return {cls: configs_for(lst, interpret_config)[0] for cls, lst in gpu_configs.items()}


# The configs used with opts.deterministic=True (never autotuned): per config class, or one
# triton.Config for every class (tests patch them that way; see _common.pick_config).
FIXED_CONFIGS = {
    "fwd": _fixed(_FWD_GPU_CONFIGS, _FWD_INTERPRET_CONFIG),
    "bwd": _fixed(_BWD_GPU_CONFIGS, _BWD_INTERPRET_CONFIG),
    "matmul": _fixed(_GRAD_HIDDEN_GPU_CONFIGS, _MATMUL_INTERPRET_CONFIG),
}
# The split forward's second pass: one token per thread, 128 tokens per program.
MERGE_CONFIG = _cfg(BLOCK_N=128, num_warps=4, num_stages=1)

# Forward grid (see fwd_split): target waves of one program per SM, the SM count assumed
# off CUDA (H100 SXM), and the vocabulary slice granularity (a multiple of every BLOCK_V).
FWD_WAVES = 2
H100_SMS = 132
SPLIT_ALIGN = 256
# A tile that straddled a slice end would match a label in its masked (-inf) columns: every
# forward BLOCK_V must divide SPLIT_ALIGN, so a config added later cannot break it silently.
assert all(SPLIT_ALIGN % c.kwargs["BLOCK_V"] == 0
           for c in [_FWD_INTERPRET_CONFIG, *(c for cls in _FWD_GPU_CONFIGS.values() for c in cls)])


@triton.jit
def _transformed_logits(hidden_ptr, weight_ptr, bias_ptr, offs_n, mask_n, offs_v, mask_v, H, stride_hn, stride_wv,
                        logit_scale, softcap, inv_temperature,
                        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST_DOT: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """The ``[BLOCK_N, BLOCK_V]`` tile of z, and the tile of tanh(s*scale/c) (or z itself
    without softcap) that the backward needs for dz/ds. fp32 accumulation over H."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    arange_k = tl.arange(0, BLOCK_K)
    for k_start in range(0, H, BLOCK_K):
        offs_k = k_start + arange_k
        mask_k = offs_k < H
        # h_blk [BLOCK_N, BLOCK_K] and W_tile^T [BLOCK_K, BLOCK_V] (loaded transposed by
        # pointer arithmetic; tl.make_block_ptr is gone in triton 3.9).
        h_blk = tl.load(hidden_ptr + offs_n[:, None] * stride_hn + offs_k[None, :],
                        mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        w_blk = tl.load(weight_ptr + offs_v[None, :] * stride_wv + offs_k[:, None],
                        mask=mask_k[:, None] & mask_v[None, :], other=0.0)
        if UPCAST_DOT:  # interpreter only: bf16 tl.dot is silently wrong there
            h_blk = h_blk.to(tl.float32)
            w_blk = w_blk.to(tl.float32)
        acc = tl.dot(h_blk, w_blk, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        acc += bias[None, :]
    scaled = acc * logit_scale
    if HAS_SOFTCAP:
        t = tanh(scaled / softcap)
        z = t * (softcap * inv_temperature)
    else:
        t = scaled
        z = scaled * inv_temperature
    return z, t


# Rows of the split-forward partials buffer [S, NUM_STATS, N] (fp32; the argmax index is
# stored as int32 bits).
# (tl.constexpr: @triton.jit code may only read constexpr globals.)
STAT_M, STAT_SUM_E, STAT_LABEL_Z, STAT_SUM_EZ, STAT_SUM_E2, STAT_SUM_Z, STAT_BEST = (tl.constexpr(i) for i in range(7))
NUM_STATS = tl.constexpr(7)


@triton.jit
def _finish(offs_n, mask_n, labels, V, m, sum_e, label_z, sum_ez, sum_e2, sum_z, best_idx,
            log_probs_ptr, lse_ptr, entropy_ptr, log_sum_sq_ptr, mean_logits_ptr, is_top1_ptr,
            WANT_ENTROPY: tl.constexpr, WANT_LOG_SUM_SQ: tl.constexpr, WANT_MEAN_LOGITS: tl.constexpr,
            WANT_IS_TOP1: tl.constexpr):
    """Phase 3: per-token outputs from the full-vocabulary statistics (4 bytes each; is_top1 1 byte)."""
    lse = m + tl.log(sum_e)
    tl.store(lse_ptr + offs_n, lse, mask=mask_n)
    tl.store(log_probs_ptr + offs_n, label_z - lse, mask=mask_n)
    if WANT_ENTROPY:
        tl.store(entropy_ptr + offs_n, lse - sum_ez / sum_e, mask=mask_n)
    if WANT_LOG_SUM_SQ:
        tl.store(log_sum_sq_ptr + offs_n, 2.0 * m + tl.log(sum_e2) - 2.0 * lse, mask=mask_n)
    if WANT_MEAN_LOGITS:
        tl.store(mean_logits_ptr + offs_n, sum_z / V, mask=mask_n)
    if WANT_IS_TOP1:
        tl.store(is_top1_ptr + offs_n, best_idx.to(tl.int64) == labels, mask=mask_n)


_WANT_HEURISTICS = {
    "WANT_ENTROPY": lambda args: args["entropy_ptr"] is not None,
    "WANT_LOG_SUM_SQ": lambda args: args["log_sum_sq_ptr"] is not None,
    "WANT_MEAN_LOGITS": lambda args: args["mean_logits_ptr"] is not None,
    "WANT_IS_TOP1": lambda args: args["is_top1_ptr"] is not None,
}


@triton.heuristics({**_WANT_HEURISTICS, "HAS_BIAS": lambda args: args["bias_ptr"] is not None,
                   "HAS_SOFTCAP": lambda args: args["softcap"] > 0,
                   "SPLIT": lambda args: args["partials_ptr"] is not None})
@triton.jit
def _linear_logprobs_fwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr,
    log_probs_ptr, lse_ptr, entropy_ptr, log_sum_sq_ptr, mean_logits_ptr, is_top1_ptr, partials_ptr,
    N, H, V, N_BUCKET, v_per_split, stride_hn, stride_wv,
    logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WANT_ENTROPY: tl.constexpr, WANT_LOG_SUM_SQ: tl.constexpr, WANT_MEAN_LOGITS: tl.constexpr,
    WANT_IS_TOP1: tl.constexpr, SPLIT: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (token block, vocabulary slice) pair: program (pid_n, pid_s) sweeps vocab ids
    ``[pid_s * v_per_split, min(V, (pid_s + 1) * v_per_split))`` (the whole vocabulary
    without SPLIT). Without SPLIT it writes the outputs; with SPLIT it writes its partial
    statistics (max, sum-exp relative to it, label logit, extras' sums, first argmax) to
    ``partials[pid_s, :, tokens]`` for :func:`_linear_logprobs_merge_kernel`."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=0)
    arange_v = tl.arange(0, BLOCK_V)
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(V, v_lo + v_per_split)

    # Running state per token, all fp32: max m, sum exp(z-m), label logit, and the extras'
    # sums (dead code on the GPU when their flag is off).
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    sum_e = tl.zeros((BLOCK_N,), tl.float32)
    label_z = tl.zeros((BLOCK_N,), tl.float32)
    sum_ez = tl.zeros((BLOCK_N,), tl.float32)   # sum exp(z - m) * z        (entropy)
    sum_e2 = tl.zeros((BLOCK_N,), tl.float32)   # sum exp(2 (z - m))        (log sum p^2)
    sum_z = tl.zeros((BLOCK_N,), tl.float32)    # sum z                      (mean logit)
    best_idx = tl.zeros((BLOCK_N,), tl.int32)   # first argmax of z          (is_top1)

    for v_start in range(v_lo, v_hi, BLOCK_V):
        # Phase 1: the logit tile, fp32.
        offs_v = v_start + arange_v  # int32: V < 2**31
        mask_v = offs_v < v_hi
        z, _t = _transformed_logits(hidden_ptr, weight_ptr, bias_ptr, offs_n, mask_n, offs_v.to(tl.int64), mask_v,
                                    H, stride_hn, stride_wv, logit_scale, softcap, inv_temperature,
                                    HAS_BIAS, HAS_SOFTCAP, UPCAST_DOT, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        z = tl.where(mask_v[None, :], z, float("-inf"))
        # Phase 2: online log-sum-exp. A NaN logit makes exp(z - m_new) NaN whether or not
        # the max reduction kept it, so NaN inputs reach sum_e and hence every output.
        # Tile-local column indices are int32 [BLOCK_V] vectors: the [BLOCK_N, BLOCK_V]
        # comparisons below then need one register per element instead of two (int64).
        tile_max = tl.max(z, 1)
        if WANT_IS_TOP1:
            # First index reaching the tile max; a later tile wins only if strictly larger.
            tile_arg = tl.min(tl.where(z == tile_max[:, None], arange_v[None, :], BLOCK_V), 1)
            best_idx = tl.where(tile_max > m, v_start + tile_arg, best_idx)
        m_new = tl.maximum(m, tile_max)
        alpha = tl.exp(m - m_new)  # 0 on the first tile (m = -inf)
        e = tl.exp(z - m_new[:, None])  # 0 in masked columns
        sum_e = sum_e * alpha + tl.sum(e, 1)
        if WANT_ENTROPY:
            # z is -inf in masked columns and 0 * -inf is NaN: weight the unmasked z instead.
            sum_ez = sum_ez * alpha + tl.sum(e * tl.where(mask_v[None, :], z, 0.0), 1)
        if WANT_LOG_SUM_SQ:
            sum_e2 = sum_e2 * (alpha * alpha) + tl.sum(e * e, 1)
        if WANT_MEAN_LOGITS:
            sum_z += tl.sum(tl.where(mask_v[None, :], z, 0.0), 1)
        label_col = (labels - v_start).to(tl.int32)  # in (-V, V): the label's column in this tile
        label_z += tl.sum(tl.where(arange_v[None, :] == label_col[:, None], z, 0.0), 1)
        m = m_new

    if SPLIT:
        # 4 bytes per token per statistic; the merge kernel reads them back in slice order.
        base = partials_ptr + pid_s.to(tl.int64) * NUM_STATS * N + offs_n
        tl.store(base + STAT_M * N, m, mask=mask_n)
        tl.store(base + STAT_SUM_E * N, sum_e, mask=mask_n)
        tl.store(base + STAT_LABEL_Z * N, label_z, mask=mask_n)
        if WANT_ENTROPY:
            tl.store(base + STAT_SUM_EZ * N, sum_ez, mask=mask_n)
        if WANT_LOG_SUM_SQ:
            tl.store(base + STAT_SUM_E2 * N, sum_e2, mask=mask_n)
        if WANT_MEAN_LOGITS:
            tl.store(base + STAT_SUM_Z * N, sum_z, mask=mask_n)
        if WANT_IS_TOP1:
            tl.store(base + STAT_BEST * N, best_idx.to(tl.float32, bitcast=True), mask=mask_n)
    else:
        _finish(offs_n, mask_n, labels, V, m, sum_e, label_z, sum_ez, sum_e2, sum_z, best_idx,
                log_probs_ptr, lse_ptr, entropy_ptr, log_sum_sq_ptr, mean_logits_ptr, is_top1_ptr,
                WANT_ENTROPY, WANT_LOG_SUM_SQ, WANT_MEAN_LOGITS, WANT_IS_TOP1)


@triton.heuristics(_WANT_HEURISTICS)
@triton.jit
def _linear_logprobs_merge_kernel(
    partials_ptr, labels_ptr, log_probs_ptr, lse_ptr, entropy_ptr, log_sum_sq_ptr, mean_logits_ptr, is_top1_ptr,
    N, V, num_splits,
    WANT_ENTROPY: tl.constexpr, WANT_LOG_SUM_SQ: tl.constexpr, WANT_MEAN_LOGITS: tl.constexpr,
    WANT_IS_TOP1: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Second pass of the split forward: fold the ``num_splits`` partial statistics of each
    token in slice order (a fixed order: deterministic), exactly as the one-pass kernel folds
    tiles: ``m = max m_s``, ``sum_e = sum sum_e_s * exp(m_s - m)`` (likewise the entropy sum;
    ``exp(2 (m_s - m))`` for the squared one), label logit and logit sums add, and the first
    slice reaching the maximum supplies the argmax (first maximum wins across slices).
    Reads ``num_splits * NUM_STATS * 4`` bytes per token at most."""
    pid = tl.program_id(0)
    offs_n = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=0)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    sum_e = tl.zeros((BLOCK_N,), tl.float32)
    label_z = tl.zeros((BLOCK_N,), tl.float32)
    sum_ez = tl.zeros((BLOCK_N,), tl.float32)
    sum_e2 = tl.zeros((BLOCK_N,), tl.float32)
    sum_z = tl.zeros((BLOCK_N,), tl.float32)
    best_idx = tl.zeros((BLOCK_N,), tl.int32)
    for s in range(0, num_splits):
        base = partials_ptr + s * NUM_STATS * N + offs_n
        m_s = tl.load(base + STAT_M * N, mask=mask_n, other=0.0)
        m_new = tl.maximum(m, m_s)
        alpha = tl.exp(m - m_new)   # 0 for the first slice (m = -inf)
        beta = tl.exp(m_s - m_new)
        sum_e = sum_e * alpha + tl.load(base + STAT_SUM_E * N, mask=mask_n, other=0.0) * beta
        label_z += tl.load(base + STAT_LABEL_Z * N, mask=mask_n, other=0.0)
        if WANT_ENTROPY:
            sum_ez = sum_ez * alpha + tl.load(base + STAT_SUM_EZ * N, mask=mask_n, other=0.0) * beta
        if WANT_LOG_SUM_SQ:
            sum_e2 = sum_e2 * (alpha * alpha) + tl.load(base + STAT_SUM_E2 * N, mask=mask_n, other=0.0) * (beta * beta)
        if WANT_MEAN_LOGITS:
            sum_z += tl.load(base + STAT_SUM_Z * N, mask=mask_n, other=0.0)
        if WANT_IS_TOP1:
            best_s = tl.load(base + STAT_BEST * N, mask=mask_n, other=0.0).to(tl.int32, bitcast=True)
            best_idx = tl.where(m_s > m, best_s, best_idx)
        m = m_new
    _finish(offs_n, mask_n, labels, V, m, sum_e, label_z, sum_ez, sum_e2, sum_z, best_idx,
            log_probs_ptr, lse_ptr, entropy_ptr, log_sum_sq_ptr, mean_logits_ptr, is_top1_ptr,
            WANT_ENTROPY, WANT_LOG_SUM_SQ, WANT_MEAN_LOGITS, WANT_IS_TOP1)


# WANT_BIAS_GRAD is passed explicitly rather than derived from ``bias_partial_ptr is None``:
# bias_partial_ptr is a reset_to_zero argument of the autotuner, and triton 3.6's autotuner
# calls ``.zero_()`` on it unconditionally, so it must always be a tensor (a dummy without bias).
@triton.heuristics({
    "HAS_BIAS": lambda args: args["bias_ptr"] is not None,
    "HAS_SOFTCAP": lambda args: args["softcap"] > 0,
})
@triton.jit
def _linear_logprobs_bwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, grad_ptr, lse_ptr,
    grad_logits_ptr, bias_partial_ptr,
    N, H, V, N_BUCKET, v_begin, chunk_width, chunk_pad, stride_hn, stride_wv, stride_gn, stride_bpn,
    logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WANT_BIAS_GRAD: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Gradient of the loss w.r.t. the raw logits s for one [BLOCK_N, BLOCK_V] tile of a
    vocab chunk: reads h_blk, W_tile (like the forward) and 12 bytes per token; writes the
    tile of G in the scratch dtype (zeros in the padding columns ``[chunk_width,
    chunk_pad)``) and, with a bias, BLOCK_V fp32 column sums."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    arange_v = tl.arange(0, BLOCK_V)
    c_start = pid_v * BLOCK_V
    offs_c = c_start + arange_v  # int32 column in the chunk
    mask_c = offs_c < chunk_width
    offs_v = v_begin + offs_c.to(tl.int64)  # vocab id
    mask_v = mask_c & (offs_v < V)

    # Phase 1: recompute the tile exactly as the forward did.
    z, t = _transformed_logits(hidden_ptr, weight_ptr, bias_ptr, offs_n, mask_n, offs_v, mask_v, H,
                               stride_hn, stride_wv, logit_scale, softcap, inv_temperature,
                               HAS_BIAS, HAS_SOFTCAP, UPCAST_DOT, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
    # Phase 2: G = g * (onehot - softmax) * dz/ds, fp32. The one-hot compares the int32
    # tile-local column with each label's column in this tile (one register per element).
    labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=0)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    g = tl.load(grad_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    label_col = (labels - v_begin - c_start).to(tl.int32)
    grad_s = tl.where(arange_v[None, :] == label_col[:, None], 1.0, 0.0) - tl.exp(z - lse[:, None])
    if HAS_SOFTCAP:
        grad_s = grad_s * (g[:, None] * ((1.0 - t * t) * (logit_scale * inv_temperature)))
    else:
        grad_s = grad_s * (g * (logit_scale * inv_temperature))[:, None]
    grad_s = tl.where(mask_n[:, None] & mask_v[None, :], grad_s, 0.0)  # padded rows/columns may hold exp overflow
    # Phase 3: one store of the tile, padding columns included; fp32 column sums for the bias gradient.
    rows = grad_logits_ptr + offs_n * stride_gn
    tl.store(rows[:, None] + offs_c[None, :], to_output(grad_s, grad_logits_ptr.dtype.element_ty, ROUND_BF16),
             mask=mask_n[:, None] & (offs_c < chunk_pad)[None, :])
    if WANT_BIAS_GRAD:
        tl.store(bias_partial_ptr + pid_n.to(tl.int64) * stride_bpn + offs_c, tl.sum(grad_s, 0), mask=mask_c)


@triton.heuristics({"ACCUMULATE": lambda args: args["accumulate"] != 0})
@triton.jit
def _grad_matmul_kernel(
    a_ptr, b_ptr, c_ptr, c_lo_ptr, M, N, K, M_A, K_A, M_BUCKET, N_BUCKET, K_BUCKET, accumulate,
    stride_am, stride_ak, stride_bk, stride_cm,
    ACCUMULATE: tl.constexpr, SPLIT_ACC: tl.constexpr, FINAL: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``C[M, N] (+)= A[M, K] @ B[K, N]`` with fp32 accumulation and one cast at the store.

    A is given by strides (G or G^T from the scratch), B and C are row-major with unit
    column stride (``c_lo_ptr`` too, with C's strides). A is read within ``[M_A, K_A]``
    (>= [M, K]: the scratch's zero padding), so its masks stay constant over 16-element
    groups along its contiguous dimension and its loads stay vectorised (cp.async) when
    M or K is odd; B's rows are masked at K. Programs are grouped GROUP_M tiles
    tall so that neighbours reuse B tiles in L2.

    The fp32 running sum across calls (ACCUMULATE reads it once before the single write):
    * ``SPLIT_ACC=False``: C itself is fp32 and holds it.
    * ``SPLIT_ACC=True`` (C is a 16-bit float tensor): the fp32 bit pattern is split in two
      16-bit halves, the high half in C (raw bits, not a value) and the low half in
      ``c_lo_ptr`` (same shape and dtype as C). Reassembling them is exact, so this is an
      fp32 accumulator bit for bit, with no fp32 buffer beyond C. With FINAL the sum is
      instead rounded to C's dtype once and stored as a value (``c_lo_ptr`` is not written).
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_am = offs_m < M_A
    arange_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        offs_k = (k_start + arange_k).to(tl.int64)
        mask_k = offs_k < K
        a_blk = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                        mask=mask_am[:, None] & (offs_k < K_A)[None, :], other=0.0)
        b_blk = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :],
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST_DOT:
            a_blk = a_blk.to(tl.float32)
            b_blk = b_blk.to(tl.float32)
        acc = tl.dot(a_blk, b_blk, acc, input_precision=DOT_PRECISION)
    offs_c = offs_m[:, None] * stride_cm + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if ACCUMULATE:
        if SPLIT_ACC:
            hi = tl.load(c_ptr + offs_c, mask=mask, other=0.0).to(tl.uint16, bitcast=True).to(tl.uint32)
            lo = tl.load(c_lo_ptr + offs_c, mask=mask, other=0.0).to(tl.uint16, bitcast=True).to(tl.uint32)
            acc += ((hi << 16) | lo).to(tl.float32, bitcast=True)
        else:
            acc += tl.load(c_ptr + offs_c, mask=mask, other=0.0)
    if SPLIT_ACC and not FINAL:
        bits = acc.to(tl.uint32, bitcast=True)
        tl.store(c_ptr + offs_c, (bits >> 16).to(tl.uint16).to(c_ptr.dtype.element_ty, bitcast=True), mask=mask)
        tl.store(c_lo_ptr + offs_c, (bits & 0xFFFF).to(tl.uint16).to(c_lo_ptr.dtype.element_ty, bitcast=True),
                 mask=mask)
    else:
        tl.store(c_ptr + offs_c, to_output(acc, c_ptr.dtype.element_ty, ROUND_BF16), mask=mask)


def _tuners(kernel, configs, interpret_config, **kw):
    """One autotuner per config class ("16", "tf32", "ieee"): configs chosen by element size
    and dot precision (see :func:`._common.config_class`)."""
    return {cls: triton.autotune(configs=configs_for(lst, interpret_config), **kw)(kernel)
            for cls, lst in configs.items()}


_fwd_tuned = _tuners(_linear_logprobs_fwd_kernel, _FWD_GPU_CONFIGS, _FWD_INTERPRET_CONFIG,
                     key=["N_BUCKET", "H", "V"])
# Configs with a smaller BLOCK_N write more rows of the bias partial sums while tuning:
# reset_to_zero clears them after tuning so that only the chosen config's rows are summed.
_bwd_tuned = _tuners(_linear_logprobs_bwd_kernel, _BWD_GPU_CONFIGS, _BWD_INTERPRET_CONFIG,
                     key=["N_BUCKET", "H", "V"], reset_to_zero=["bias_partial_ptr"])
# Two tuners over one kernel: grad_h (A = G row-major) and grad_W (A = G transposed) have
# different access patterns. grad_h read-modify-writes C, so tuning must restore it.
# (triton 3.6's autotuner clones every restore_value argument unconditionally, so c_lo_ptr
# is always a tensor there: a dummy when the accumulator is not split.)
_grad_hidden_tuned = _tuners(_grad_matmul_kernel, _GRAD_HIDDEN_GPU_CONFIGS, _MATMUL_INTERPRET_CONFIG,
                             key=["M_BUCKET", "N", "K_BUCKET", "accumulate"], restore_value=["c_ptr", "c_lo_ptr"])
_grad_weight_tuned = _tuners(_grad_matmul_kernel, _GRAD_WEIGHT_GPU_CONFIGS, _MATMUL_INTERPRET_CONFIG,
                             key=["M_BUCKET", "N", "K_BUCKET"])


def _launch(tuned, kernel, fixed_config, grid, deterministic, *args, **constexprs):
    """Autotuned launch, or the fixed config (no tuning, reproducible bits) when deterministic."""
    if deterministic:
        cfg = fixed_config
        kernel[grid](*args, **constexprs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        tuned[grid](*args, **constexprs)


def _scalars(opts):
    return float(opts.logit_scale), float(opts.softcap or 0.0), 1.0 / float(opts.temperature)


def _check_linear(hidden, weight, labels, bias):
    check_dtype("hidden", hidden)
    check_contiguous_2d("hidden", hidden)
    check_contiguous_2d("weight", weight)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"dpo_fast Triton kernels: weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"dpo_fast Triton kernels: weight must be [V, {hidden.shape[1]}], got {tuple(weight.shape)}")
    if weight.shape[0] == 0 or hidden.shape[1] == 0:
        raise ValueError(f"dpo_fast Triton kernels: empty vocab or hidden size (weight {tuple(weight.shape)})")
    check_labels(labels, hidden.shape[0])
    if bias is not None:
        check_vector("bias", bias, weight.shape[0], weight.dtype)
    devices = {t.device for t in (hidden, weight, labels, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"dpo_fast Triton kernels: all tensors must be on one device, got {devices}")


def _sm_count(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return H100_SMS


def fwd_split(n: int, v: int, num_sms: int, block_n: int) -> tuple[int, int]:
    """``(splits, v_per_split)`` of the forward grid ``(cdiv(n, BLOCK_N), splits)``.

    Token blocks alone give ``cdiv(n, block_n)`` programs; when that is below
    ``FWD_WAVES * num_sms`` (e.g. 16 programs at n=2048 with 128-token blocks on 132 SMs)
    each token block is paired with ``splits`` vocabulary slices of ``v_per_split`` ids
    (a multiple of SPLIT_ALIGN, hence of every BLOCK_V, so tiles never straddle slices) so
    that the grid reaches FWD_WAVES waves of one program per SM, as far as slices of at
    least SPLIT_ALIGN ids allow. ``block_n`` is the largest BLOCK_N a launch may use, so any
    config's grid is at least as large. Extra cost of splitting: the hidden block is read
    once per slice (``splits * n * H * elt`` bytes, against ``cdiv(n, block_n) * V * H * elt``
    for W) and ``splits * NUM_STATS * 4`` bytes per token of partials, written and read once.
    """
    blocks = triton.cdiv(n, block_n)
    target = FWD_WAVES * num_sms
    if blocks >= target or v <= SPLIT_ALIGN:
        return 1, v
    want = triton.cdiv(target, blocks)
    per = max(SPLIT_ALIGN, v // want // SPLIT_ALIGN * SPLIT_ALIGN)
    splits = triton.cdiv(v, per)
    return (splits, per) if splits > 1 else (1, v)


def _max_block_n(tuned, fixed):
    return max(c.kwargs["BLOCK_N"] for c in list(tuned.configs) + [fixed])


def linear_logprobs_fwd(hidden, weight, labels, bias, opts, *, num_sms=None):
    """Per-token ``log p(label)``, lse and ``opts.extras`` without ``[N, V]`` logits.

    Args:
        hidden: ``[N, H]`` contiguous float32/bfloat16/float16.
        weight: ``[V, H]`` contiguous, same dtype.
        labels: ``[N]`` int64, every entry in ``[0, V)`` (compacted rows).
        bias: ``[V]`` or None.
        opts: :class:`dpo_fast.options.LogprobOptions`.
        num_sms: streaming multiprocessors to fill (default: the device's; H100_SMS = 132
            off CUDA). Decides the vocabulary split of the grid (:func:`fwd_split`), hence
            the fp32 summation order: results are reproducible for a given value.
    Returns:
        ``(log_probs [N] fp32, lse [N] fp32, extras)``; extras maps each name of
        ``opts.extras`` to an ``[N]`` tensor (bool for is_top1, fp32 otherwise).
    """
    _check_linear(hidden, weight, labels, bias)
    n, h = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    log_probs = torch.empty(n, dtype=torch.float32, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    extras = {name: torch.empty(n, dtype=torch.bool if name == "is_top1" else torch.float32, device=dev)
              for name in opts.extras}
    if n == 0:
        return log_probs, lse, extras
    if num_sms is not None and (isinstance(num_sms, bool) or not isinstance(num_sms, int) or num_sms < 1):
        raise ValueError(f"dpo_fast Triton kernels: num_sms must be a positive int, got {num_sms!r}")
    cls = config_class(hidden.dtype)
    fixed = pick_config(FIXED_CONFIGS, "fwd", hidden.dtype)
    tuned = _fwd_tuned[cls]
    block_n = fixed.kwargs["BLOCK_N"] if opts.deterministic else _max_block_n(tuned, fixed)
    splits, per = fwd_split(n, v, num_sms or _sm_count(dev), block_n)
    partials = torch.empty(splits, NUM_STATS.value, n, dtype=torch.float32, device=dev) if splits > 1 else None
    outs = (log_probs, lse, extras.get("entropy"), extras.get("log_sum_sq_probs"), extras.get("mean_logits"),
            extras.get("is_top1"))
    scale, softcap, inv_t = _scalars(opts)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)  # noqa: E731
    _launch(tuned, _linear_logprobs_fwd_kernel, fixed, grid, opts.deterministic,
            hidden, weight, bias, labels, *outs, partials,
            n, h, v, bucket(n), per, hidden.stride(0), weight.stride(0), scale, softcap, inv_t,
            **dot_flags(hidden.dtype))
    if partials is not None:
        _launch(None, _linear_logprobs_merge_kernel, MERGE_CONFIG, (triton.cdiv(n, MERGE_CONFIG.kwargs["BLOCK_N"]),),
                True, partials, labels, *outs, n, v, splits)
    return log_probs, lse, extras


def _chunk_width(n: int, v: int, elt: int) -> int:
    width = SCRATCH_BYTES // max(1, n * elt)
    width = max(CHUNK_ALIGN, width // CHUNK_ALIGN * CHUNK_ALIGN)
    return min(v, width)


def linear_logprobs_bwd(grad_log_probs, hidden, weight, labels, bias, lse, opts, needs_input_grad=(True, True, True)):
    """Gradients of ``sum(grad_log_probs * log_probs)`` w.r.t. hidden, weight and bias.

    Returns ``(grad_hidden [N, H] in hidden.dtype, grad_weight [V, H] in weight.dtype,
    grad_bias [V] or None)``; an entry is None when ``needs_input_grad`` says so.
    Extra memory (see "Memory" in the module docstring): the ``[N, C]`` scratch
    (<= SCRATCH_BYTES), for bf16/fp16 with more than one vocab chunk the ``[N, H]`` low
    halves of the split fp32 grad_h accumulator (2 bytes per element; fp32 grad_h
    accumulates in the output itself), and fp32 bias partial sums.
    """
    _check_linear(hidden, weight, labels, bias)
    n, h = hidden.shape
    v = weight.shape[0]
    check_vector("grad_log_probs", grad_log_probs, n)
    check_vector("lse", lse, n, torch.float32)
    need_h, need_w, need_b = (bool(x) for x in needs_input_grad)
    need_b = need_b and bias is not None
    if n == 0 or not (need_h or need_w or need_b):
        return (torch.zeros_like(hidden) if need_h else None, torch.zeros_like(weight) if need_w else None,
                torch.zeros_like(bias) if need_b else None)
    dev, dtype = hidden.device, hidden.dtype
    flags = dot_flags(dtype)
    rnd = round_flag(dtype)
    scale, softcap, inv_t = _scalars(opts)
    det = opts.deterministic

    cls = config_class(dtype)
    fixed_bwd = pick_config(FIXED_CONFIGS, "bwd", dtype)
    fixed_mm = pick_config(FIXED_CONFIGS, "matmul", dtype)

    chunk = _chunk_width(n, v, weight.element_size())
    num_chunks = triton.cdiv(v, chunk)
    # Scratch rows padded to CHUNK_ALIGN elements: every row starts 16-byte aligned and the
    # recompute kernel writes zeros into the padding columns, so the matmuls read G with
    # masks on the padded width (a multiple of 16: vectorised cp.async loads) even when the
    # chunk (an odd vocabulary's tail) is not.
    chunk_pad = triton.cdiv(chunk, CHUNK_ALIGN) * CHUNK_ALIGN
    grad_logits = torch.empty(n, chunk_pad, dtype=dtype, device=dev)
    # grad_h accumulator: fp32 -> the output itself; bf16/fp16 -> the output holds the high
    # 16 bits of the fp32 running sum and grad_h_lo the low 16 bits until the last chunk
    # rounds it once into the output (GRAD_HIDDEN_SPLIT_ACC=False: a separate fp32 buffer).
    # Never None where the autotuner restores it (triton 3.6 clones it unconditionally).
    split = dtype != torch.float32 and GRAD_HIDDEN_SPLIT_ACC
    grad_h_acc = grad_h_lo = None
    if need_h:
        grad_h_acc = torch.empty(n, h, dtype=dtype if split else torch.float32, device=dev)
        grad_h_lo = torch.empty(n if split and num_chunks > 1 else 1, h if split and num_chunks > 1 else 1,
                                dtype=dtype, device=dev)
    grad_w = torch.empty_like(weight) if need_w else None
    grad_b = torch.empty_like(bias) if need_b else None
    # Room for the smallest BLOCK_N among the configs; unused rows stay 0. Always a tensor:
    # it is the bwd tuner's reset_to_zero argument (triton 3.6 zeroes it unconditionally).
    min_block_n = min(c.kwargs["BLOCK_N"] for c in list(_bwd_tuned[cls].configs) + [fixed_bwd])
    bias_partial = torch.zeros(triton.cdiv(n, min_block_n) if need_b else 1, chunk if need_b else 1,
                               dtype=torch.float32, device=dev)

    for v_begin in range(0, v, chunk):
        width = min(chunk, v - v_begin)
        width_pad = triton.cdiv(width, CHUNK_ALIGN) * CHUNK_ALIGN
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(width_pad, meta["BLOCK_V"]))  # noqa: E731
        _launch(_bwd_tuned[cls], _linear_logprobs_bwd_kernel, fixed_bwd, grid, det,
                hidden, weight, bias, labels, grad_log_probs, lse, grad_logits, bias_partial,
                n, h, v, bucket(n), v_begin, width, width_pad, hidden.stride(0), weight.stride(0),
                grad_logits.stride(0), bias_partial.stride(0), scale, softcap, inv_t,
                WANT_BIAS_GRAD=need_b, ROUND_BF16=rnd, **flags)
        w_chunk = weight[v_begin:v_begin + width]
        if need_h:
            # grad_h[N, H] (+)= G[N, width] @ W_chunk[width, H]; G read up to width_pad (zeros).
            mm_grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(h, meta["BLOCK_N"]),)  # noqa: E731
            _launch(_grad_hidden_tuned[cls], _grad_matmul_kernel, fixed_mm, mm_grid, det,
                    grad_logits, w_chunk, grad_h_acc, grad_h_lo, n, h, width, n, width_pad,
                    bucket(n), bucket(h), bucket(width),
                    int(v_begin > 0), grad_logits.stride(0), 1, w_chunk.stride(0), grad_h_acc.stride(0),
                    SPLIT_ACC=split, FINAL=v_begin + width >= v, ROUND_BF16=rnd and split, **flags)
        if need_w:
            # grad_W_chunk[width, H] = G[N, width]^T @ h[N, H], reduced over all N in registers.
            out = grad_w[v_begin:v_begin + width]
            mm_grid = lambda meta: (triton.cdiv(width, meta["BLOCK_M"]) * triton.cdiv(h, meta["BLOCK_N"]),)  # noqa: E731
            _launch(_grad_weight_tuned[cls], _grad_matmul_kernel, fixed_mm, mm_grid, det,
                    grad_logits, hidden, out, None, width, h, n, width_pad, n,
                    bucket(width), bucket(h), bucket(n),
                    0, 1, grad_logits.stride(0), hidden.stride(0), out.stride(0),
                    SPLIT_ACC=False, FINAL=True, ROUND_BF16=rnd, **flags)
        if need_b:
            grad_b[v_begin:v_begin + width] = bias_partial[:, :width].sum(0)
    grad_hidden = None
    if need_h:
        grad_hidden = grad_h_acc if grad_h_acc.dtype == dtype else grad_h_acc.to(dtype)
    return grad_hidden, grad_w, grad_b
