"""``impl="torch"``: the fused log-prob ops in plain PyTorch, blockwise, on any device.

Never allocates ``[N, V]``. The work is cut into tiles of ``token_block x vocab_block``
logits (a few MiB each), so the peak extra memory is a handful of tiles whatever N and V are.

Forward (per token block, sweeping the vocabulary): logits tile ``s = h_blk @ W_tile.T + b``
computed in float32 (float64 for float64 inputs) from upcast operands, transformed to ``z``
(scale, tanh softcap, temperature), and folded into an online log-sum-exp: a running max
``m`` and a running ``sum exp(z - m)`` that is rescaled by ``exp(m_old - m_new)`` whenever
the max grows. The label's logit is picked from the tile that holds it. The optional outputs
ride on the same sweep (see :mod:`dpo_fast.options`). Only the log-sum-exp is saved.

Backward (vocabulary outer, token blocks inner): recompute the tile, form
``G = g * (onehot(label) - exp(z - lse)) * dz/ds``, and accumulate
``grad_h += G @ W_tile``, ``grad_W_tile += G.T @ h_blk``, ``grad_b_tile += G.sum(0)`` in fp32.
Each vocabulary tile of grad_W is owned by one outer iteration and written once, cast to
the weight dtype, so the result is deterministic.

These functions take compacted rows (every label in ``[0, V)``); the autograd wrappers in
:mod:`dpo_fast.ops` do the compaction and validation. The Triton launchers in
``dpo_fast.kernels`` have the same signatures.
"""
from __future__ import annotations

import torch

from .options import LogprobOptions
from .reference import compute_dtype

# Elements per logits tile: 2**19 float32 = 2 MiB, and a few tiles live at once. Measured on
# a 2-core CPU at N=4096, V=131072, H=64: 2 MiB tiles were both faster (cache-resident) and
# leaner (11 MiB peak extra forward) than 8 MiB or 16 MiB tiles.
TILE_ELEMENTS = 1 << 19
MAX_VOCAB_BLOCK = 8192
BWD_TOKEN_BLOCK = 512


def _blocks(n_tokens: int, n_vocab: int) -> tuple[int, int]:
    """Forward tiles: wide in the vocabulary (fewer online-softmax rescales per token)."""
    vocab_block = min(n_vocab, MAX_VOCAB_BLOCK)
    token_block = max(1, min(n_tokens, TILE_ELEMENTS // vocab_block))
    return token_block, vocab_block


def _bwd_blocks(n_tokens: int, n_vocab: int) -> tuple[int, int]:
    """Backward tiles: tall in tokens. ``grad_W_tile += G.T @ h_blk`` contracts over the token
    block and rewrites the fp32 ``[vocab_block, H]`` accumulator once per token block, so a
    taller token block means deeper matmuls and less accumulator traffic. The vocabulary block
    stays capped at MAX_VOCAB_BLOCK: ``grad_h`` then sums over the vocabulary in fp32 blocks,
    which keeps its rounding error below a single flat sum over V (measured at V=70001)."""
    token_block = max(1, min(n_tokens, BWD_TOKEN_BLOCK))
    vocab_block = max(1, min(n_vocab, MAX_VOCAB_BLOCK, TILE_ELEMENTS // token_block))
    return token_block, vocab_block


def _transform(s: torch.Tensor, opts: LogprobOptions):
    """``z`` from the raw tile ``s`` (modified in place), and ``dz/ds`` (a tensor with softcap, else a float)."""
    if opts.softcap is None:
        scale = opts.logit_scale / opts.temperature
        return (s.mul_(scale) if scale != 1.0 else s), scale
    t = s.mul_(opts.logit_scale / opts.softcap).tanh_()
    dz_ds = (1.0 - t * t).mul_(opts.logit_scale / opts.temperature)
    return t.mul_(opts.softcap / opts.temperature), dz_ds


def _tile(h_blk, weight, bias, v0, v1, cd):
    s = h_blk @ weight[v0:v1].to(cd).T
    if bias is not None:
        s += bias[v0:v1].to(cd)
    return s


def linear_logprobs_fwd(hidden, weight, labels, bias, opts: LogprobOptions):
    """Per-row log p(label), log-sum-exp and requested extras, without ``[N, V]`` logits.

    Args:
        hidden: ``[N, H]`` float tensor (compacted rows).
        weight: ``[V, H]``, same dtype and device.
        labels: ``[N]`` int64, every entry in ``[0, V)``.
        bias: ``[V]`` or None.
        opts: :class:`LogprobOptions`.
    Returns:
        ``(log_probs [N], lse [N], extras)`` with float32 outputs (float64 for float64
        inputs) and ``extras`` a dict name -> ``[N]`` tensor for ``opts.extras``.
    """
    n, v = hidden.shape[0], weight.shape[0]
    cd = compute_dtype(hidden.dtype)
    dev = hidden.device
    extras = opts.extras
    log_probs = torch.empty(n, dtype=cd, device=dev)
    lse = torch.empty(n, dtype=cd, device=dev)
    out = {name: torch.empty(n, dtype=torch.bool if name == "is_top1" else cd, device=dev) for name in extras}
    token_block, vocab_block = _blocks(n, v)
    for t0 in range(0, n, token_block):
        t1 = min(n, t0 + token_block)
        h_blk = hidden[t0:t1].to(cd)
        lab = labels[t0:t1]
        rows = torch.arange(t1 - t0, device=dev)
        m = torch.full((t1 - t0,), float("-inf"), dtype=cd, device=dev)
        sum_e = torch.zeros_like(m)     # sum exp(z - m)
        sum_ez = torch.zeros_like(m)    # sum exp(z - m) * z            (entropy)
        sum_e2 = torch.zeros_like(m)    # sum exp(2 (z - m))            (log sum p^2)
        sum_z = torch.zeros_like(m)     # sum z                          (mean logit)
        best = torch.full_like(m, float("-inf"))
        best_idx = torch.zeros(t1 - t0, dtype=torch.long, device=dev)
        label_z = torch.zeros_like(m)
        for v0 in range(0, v, vocab_block):
            v1 = min(v, v0 + vocab_block)
            z, _ = _transform(_tile(h_blk, weight, bias, v0, v1, cd), opts)
            tile_max, tile_arg = z.max(-1)
            m_new = torch.maximum(m, tile_max)
            alpha = torch.exp(m - m_new)
            e = (z - m_new[:, None]).exp_()
            sum_e = sum_e * alpha + e.sum(-1)
            if "entropy" in extras:
                sum_ez = sum_ez * alpha + (e * z).sum(-1)
            if "log_sum_sq_probs" in extras:
                sum_e2 = sum_e2 * alpha * alpha + (e * e).sum(-1)
            if "mean_logits" in extras:
                sum_z += z.sum(-1)
            if "is_top1" in extras:
                better = tile_max > best  # strict: an earlier tile keeps ties
                best = torch.where(better, tile_max, best)
                best_idx = torch.where(better, tile_arg + v0, best_idx)
            here = (lab >= v0) & (lab < v1)
            label_z = torch.where(here, z[rows, (lab - v0).clamp(0, v1 - v0 - 1)], label_z)
            m = m_new
        blk_lse = m + torch.log(sum_e)
        lse[t0:t1] = blk_lse
        log_probs[t0:t1] = label_z - blk_lse
        if "entropy" in extras:
            out["entropy"][t0:t1] = blk_lse - sum_ez / sum_e
        if "log_sum_sq_probs" in extras:
            out["log_sum_sq_probs"][t0:t1] = 2 * m + torch.log(sum_e2) - 2 * blk_lse
        if "mean_logits" in extras:
            out["mean_logits"][t0:t1] = sum_z / v
        if "is_top1" in extras:
            out["is_top1"][t0:t1] = best_idx == lab
    return log_probs, lse, out


def linear_logprobs_bwd(grad_log_probs, hidden, weight, labels, bias, lse, opts: LogprobOptions,
                        needs_input_grad=(True, True, True)):
    """Gradients of ``sum(grad_log_probs * log_probs)`` w.r.t. hidden, weight and bias.

    Returns ``(grad_hidden [N, H], grad_weight [V, H], grad_bias [V] or None)`` in the
    dtypes of the corresponding inputs; an entry is None when ``needs_input_grad`` says so.
    """
    need_h, need_w, need_b = needs_input_grad
    need_b = need_b and bias is not None
    n, v = hidden.shape[0], weight.shape[0]
    cd = compute_dtype(hidden.dtype)
    dev = hidden.device
    g = grad_log_probs.to(cd)
    grad_h = torch.zeros(n, hidden.shape[1], dtype=cd, device=dev) if need_h else None
    grad_w = torch.empty_like(weight) if need_w else None
    grad_b = torch.empty_like(bias) if need_b else None
    token_block, vocab_block = _bwd_blocks(n, v)
    for v0 in range(0, v, vocab_block):
        v1 = min(v, v0 + vocab_block)
        w_tile = weight[v0:v1].to(cd)
        acc_w = torch.zeros(v1 - v0, hidden.shape[1], dtype=cd, device=dev) if need_w else None
        acc_b = torch.zeros(v1 - v0, dtype=cd, device=dev) if need_b else None
        for t0 in range(0, n, token_block):
            t1 = min(n, t0 + token_block)
            h_blk = hidden[t0:t1].to(cd)
            z, dz_ds = _transform(_tile(h_blk, weight, bias, v0, v1, cd), opts)
            g_blk = g[t0:t1]
            grad_s = (z - lse[t0:t1, None]).exp_().mul_(-g_blk[:, None])
            lab = labels[t0:t1]
            here = ((lab >= v0) & (lab < v1)).nonzero().squeeze(1)
            grad_s[here, lab[here] - v0] += g_blk[here]
            grad_s *= dz_ds
            if need_h:
                grad_h[t0:t1] += grad_s @ w_tile
            if need_w:
                acc_w += grad_s.T @ h_blk
            if need_b:
                acc_b += grad_s.sum(0)
        if need_w:
            grad_w[v0:v1] = acc_w
        if need_b:
            grad_b[v0:v1] = acc_b
    return (grad_h.to(hidden.dtype) if need_h else None), grad_w, grad_b


def logits_logprobs_fwd(logits, labels, opts: LogprobOptions):
    """``log_softmax(logits / T).gather(labels)`` row block by row block; 0 where ignored.

    Args:
        logits: ``[N, V]`` float tensor (any float dtype; never copied whole).
        labels: ``[N]`` int64 in ``[0, V)`` or ``opts.ignore_index``.
    Returns:
        ``(log_probs [N], lse [N])`` in float32 (float64 for float64 logits).
    """
    n, v = logits.shape
    cd = compute_dtype(logits.dtype)
    log_probs = torch.empty(n, dtype=cd, device=logits.device)
    lse = torch.empty(n, dtype=cd, device=logits.device)
    row_block = max(1, TILE_ELEMENTS // max(v, 1))
    for r0 in range(0, n, row_block):
        r1 = min(n, r0 + row_block)
        z = logits[r0:r1].to(cd) / opts.temperature
        blk_lse = torch.logsumexp(z, -1)
        lab = labels[r0:r1]
        valid = lab != opts.ignore_index
        picked = z.gather(-1, lab.masked_fill(~valid, 0)[:, None]).squeeze(-1)
        lse[r0:r1] = blk_lse
        log_probs[r0:r1] = torch.where(valid, picked - blk_lse, torch.zeros_like(blk_lse))
    return log_probs, lse


def logits_logprobs_bwd(grad_log_probs, logits, labels, lse, opts: LogprobOptions):
    """``grad_logits = g * (onehot(label) - softmax(z)) / T`` written in the logits dtype.

    Rows whose label is ``ignore_index`` get zeros. Only row-block temporaries are float32.
    """
    n, v = logits.shape
    cd = compute_dtype(logits.dtype)
    grad = torch.empty_like(logits)
    row_block = max(1, TILE_ELEMENTS // max(v, 1))
    for r0 in range(0, n, row_block):
        r1 = min(n, r0 + row_block)
        lab = labels[r0:r1]
        valid = lab != opts.ignore_index
        g = torch.where(valid, grad_log_probs[r0:r1].to(cd), torch.zeros((), dtype=cd, device=logits.device))
        z = logits[r0:r1].to(cd) / opts.temperature
        grad_z = torch.exp(z - lse[r0:r1, None]).mul_(-g[:, None])
        grad_z.scatter_add_(1, lab.masked_fill(~valid, 0)[:, None], g[:, None])
        grad[r0:r1] = grad_z / opts.temperature
    return grad
