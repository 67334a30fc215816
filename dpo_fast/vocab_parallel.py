"""Vocabulary-parallel lm_head: the fused log-prob op for a head whose rows are split over ranks.

Tensor parallelism (Megatron's ColumnParallelLinear, transformers' ``tp_plan`` with the
lm_head "colwise", torchtitan) splits the ``[V, H]`` lm_head by vocabulary rows: rank r
holds rows ``[start_r, start_r + V_r)`` (uneven splits allowed, a rank may hold none),
every rank sees the SAME hidden states and the same GLOBAL label ids, and the loss computed
from the output is the same on every rank. Running :func:`dpo_fast.linear_logprobs` on the
local shard alone would normalise over ``V_r`` entries only; this module combines the shards
exactly, without any ``[N, V]`` or full-vocabulary tensor.

Forward, per rank (``N`` = valid tokens, identical on every rank):
  1. the existing backend (``impl="torch"``: :mod:`dpo_fast.blockwise`, ``"triton"``: the
     kernels) runs on the local shard with local labels (``label - start_r`` where this rank
     owns the label, -1 elsewhere: a label outside ``[0, V_r)`` contributes no label term
     in either backend) and gives the local log-sum-exp ``lse_r``, the local label
     log-prob and the local extras;
  2. all-reduce MAX of ``lse_r`` -> ``M`` (and of the local max logit when ``is_top1`` is
     asked for);
  3. one all-reduce SUM of a ``[k, N]`` float64 stack of per-rank partials (combining in
     float64 keeps the global lse within about one float32 rounding of a single-process one):
     ``S = sum_r exp(lse_r - M)`` so ``lse = M + log S``;
     the label logit ``z_label`` (only the owner contributes; ``log p = z_label - lse``);
     entropy: ``sum_j p_j z_j = sum_r exp(lse_r - M) * E_r[z] / S`` with the local mean
     ``E_r[z] = lse_r - entropy_r``, then ``entropy = lse - sum_j p_j z_j``;
     log_sum_sq_probs: ``logsumexp_j(2 z_j) = 2 M + log sum_r exp(lss_r + 2 (lse_r - M))``
     with the local ``lss_r = logsumexp_r(2 z) - 2 lse_r``, so the global value is
     ``log Q - 2 log S``;
     mean_logits: ``sum_r V_r * mean_r / V``;
  4. is_top1 (first maximum wins, across ranks too): each rank finds its local max logit
     and first argmax in one extra PyTorch tile pass over its shard (the backends do not
     return the max; this costs one more ``2 N H V_r`` matmul, only when is_top1 is asked
     for); the global first argmax is the smallest ``start_r + argmax_r`` among the ranks
     whose max equals the all-reduced max (an all-reduce MIN), and ``is_top1`` is
     ``global argmax == label``.
  Only the global lse ``[N]`` is saved for the backward.

Backward: every rank runs the backend's backward on its shard with the GLOBAL lse, so
``G = g * (onehot - softmax) * dz/ds`` is exact on its columns (the onehot only on the
owner): it yields this rank's ``grad_weight``/``grad_bias`` rows (no communication) and a
partial ``grad_hidden``, which is all-reduced (in float32 for 16-bit inputs) so that every
rank returns the complete gradient, as the replicated hidden states need. The upstream
gradient must be the same on every rank (the loss is computed identically everywhere, as
in any tensor-parallel model).

Collectives: validation does one all-gather of a small float64 vector (shard offsets and
sizes, shapes, options, a fingerprint of labels and hidden states; local input errors are
gathered too, so a bad input on one rank raises on every rank instead of hanging the
others); the forward 2 all-reduces (3 with is_top1), the backward 1 when the hidden states
need a gradient (none otherwise). The counts depend only on values validated equal across ranks, never on a
rank's data, and a batch with no valid token skips them on every rank alike.

DTensor weights: a weight that is a DTensor sharded on dim 0 (``Shard(0)``) over a 1-D
mesh is a vocabulary-parallel head when the hidden states are replicated. FSDP2 shards
its parameters the same way, but there each rank has different data, so a plain hidden
tensor alone cannot tell the two apart: :func:`dpo_fast.linear_logprobs` and
:func:`dpo_fast.fused_linear_dpo_loss` take this path on their own only when the hidden
states are a DTensor on the same mesh (replicated, or sharded on a non-feature dim, which
is gathered); with plain hidden states they raise an error that says what to do, and
:func:`vocab_parallel_linear_logprobs` (or ``vocab_parallel=True`` on the loss) states
the intent explicitly. The validation's hidden-state fingerprint catches data that differs
across ranks.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .blockwise import _blocks, _tile, _transform
from .ops import _backend, compact_rows, resolve_impl, scatter_outputs
from .options import EXTRA_OUTPUTS, LogprobOptions
from .reference import compute_dtype
from .validation import check_float, check_labels, check_same_device, check_same_dtype, is_dtensor

__all__ = [
    "VocabShard",
    "VocabParallelLinearLogprobsFunction",
    "vocab_parallel_linear_logprobs",
    "VocabParallelLinearLogprobs",
    "is_dtensor",
]


@dataclass(frozen=True)
class VocabShard:
    """This rank's place in a vocabulary-parallel head.

    Attributes:
        start: the global vocabulary id of this rank's first weight row.
        vocab_size: the total vocabulary size ``V`` (all ranks' rows together).
        group: the process group over which the rows are split (None: the default group).

    The number of local rows is the local weight's ``shape[0]``; the ranks' row ranges
    must tile ``[0, vocab_size)`` exactly (checked with one all-gather at each call).
    """

    start: int
    vocab_size: int
    group: object = None

    def __post_init__(self):
        for name in ("start", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")
        if not 0 <= self.start <= self.vocab_size:
            raise ValueError(f"vocab_start must be in [0, vocab_size={self.vocab_size}], got {self.start}")


def _is_row_sharded(t) -> bool:
    from torch.distributed.tensor import Shard

    return t.device_mesh.ndim == 1 and len(t.placements) == 1 and t.placements[0] == Shard(0)


_FSDP_HINT = ("run the head inside the FSDP module's forward, where the weight is unsharded (dpo_fast.integrations.hf "
              "does: it replaces the lm_head module's forward for the call; torch.distributed.fsdp."
              "register_fsdp_forward_method is another way); do not pass weight.full_tensor(), whose backward keeps "
              "each rank's un-reduced gradient")


def _fsdp_or_tp_hint(name):
    return (
        f"{name} is a DTensor sharded by rows (Shard(0)) but the hidden states are a plain tensor, so dpo_fast "
        "cannot tell a tensor-parallel (vocabulary-split) head from an FSDP2-sharded one. Tensor parallel (every "
        "rank has the same hidden states): call dpo_fast.vocab_parallel_linear_logprobs(hidden, weight, labels, ...) "
        "or pass vocab_parallel=True to fused_linear_dpo_loss / FusedLinearDPOLoss, or pass the hidden states as a "
        f"replicated DTensor on the weight's mesh. FSDP2 (each rank has its own data): {_FSDP_HINT}."
    )


def _local_hidden(name, hidden, mesh):
    """The replicated local tensor of a DTensor ``hidden`` on ``mesh`` (sharded ones are gathered:
    their backward slices the complete, replicated gradient back, which is exact here)."""
    from torch.distributed.tensor import Replicate, Shard

    if hidden.device_mesh != mesh:
        raise ValueError(f"{name} is a DTensor on {hidden.device_mesh}, not on the weight's mesh {mesh}")
    for p in hidden.placements:
        if isinstance(p, Shard) and p.dim % hidden.dim() == hidden.dim() - 1:
            raise ValueError(f"{name} is a DTensor sharded on its feature dimension ({p}); a vocabulary-parallel "
                             "head needs every rank to hold the full hidden vector: redistribute it to Replicate()")
        if not isinstance(p, (Shard, Replicate)):
            raise ValueError(f"{name} is a DTensor with placement {p}; pass it as Replicate() (or sharded on a "
                             "token dimension)")
    if any(not isinstance(p, Replicate) for p in hidden.placements):
        hidden = hidden.redistribute(placements=[Replicate()] * mesh.ndim)
    return hidden.to_local()


def dtensor_head(hiddens, weight, bias, *, explicit=False):
    """Resolve DTensor operands: ``(local hiddens, local weight, local bias, group)``.

    ``hiddens`` is a dict name -> hidden tensor. Accepts a weight that is a DTensor ``Shard(0)``
    over a 1-D mesh when the hidden states are DTensors on that mesh, or when the caller asked
    for the vocabulary-parallel path explicitly (``explicit``); raises a clear error for every
    other DTensor combination (see the module docstring). ``group`` is None when nothing is a
    DTensor.
    """
    if not (is_dtensor(weight) or is_dtensor(bias) or any(is_dtensor(h) for h in hiddens.values())):
        return hiddens, weight, bias, None
    if not is_dtensor(weight):
        names = [n for n, h in hiddens.items() if is_dtensor(h)] + (["bias"] if is_dtensor(bias) else [])
        raise ValueError(f"{', '.join(names)} are DTensors but the weight is not; pass plain local tensors, or the "
                         "weight as a DTensor sharded by rows (Shard(0)) for a vocabulary-parallel head")
    if not _is_row_sharded(weight):
        raise ValueError(
            f"weight is a DTensor with placements {tuple(weight.placements)} on a {weight.device_mesh.ndim}-D mesh; "
            "dpo_fast supports a DTensor weight only as a vocabulary-parallel head: Shard(0) over a 1-D mesh with "
            f"the same hidden states on every rank. For FSDP2: {_FSDP_HINT}."
        )
    mesh = weight.device_mesh
    plain = [n for n, h in hiddens.items() if not is_dtensor(h)]
    if plain and not explicit:
        raise ValueError(_fsdp_or_tp_hint("weight"))
    local = {n: (_local_hidden(n, h, mesh) if is_dtensor(h) else h) for n, h in hiddens.items()}
    if bias is not None:
        if not is_dtensor(bias) or bias.device_mesh != mesh or not _is_row_sharded(bias):
            raise ValueError("with a row-sharded DTensor weight the bias must be a DTensor sharded the same way "
                             f"(Shard(0) on {mesh}), got {type(bias).__name__}")
        bias = bias.to_local()
    return local, weight.to_local(), bias, mesh.get_group()


# ---------------------------------------------------------------------------------------------
# Validation: local checks, then one all-gather so that every rank agrees (or every rank raises).

_N_SAMPLES = 8
# Per (hidden, labels) pair: 4 label dims, hidden.requires_grad, valid-label count, label
# fingerprint (compared exactly), then hidden sum, abs-sum and samples (compared loosely).
_PAIR_EXACT = 7
_PAIR_WIDTH = _PAIR_EXACT + 2 + _N_SAMPLES


def _label_fingerprint(labels):
    """An exact int64 checksum of the ids and their positions (as a float64 0-d tensor, < 2**50)."""
    flat = labels.reshape(-1).long()
    idx = torch.arange(flat.numel(), device=flat.device) % 1021 + 1
    return ((((flat % 1000003) + 3) * idx).sum() % (1 << 50)).double()


def _hidden_fingerprint(hidden):
    """float64 sum, abs-sum and a few sampled values (reductions accumulate in float64 without a copy)."""
    flat = hidden.detach().reshape(-1)
    if flat.numel() == 0:
        return torch.zeros(2 + _N_SAMPLES, dtype=torch.float64, device=flat.device)
    pos = torch.linspace(0, flat.numel() - 1, _N_SAMPLES, device=flat.device).long()
    return torch.cat([flat.sum(dtype=torch.float64)[None],
                      torch.linalg.vector_norm(flat, 1, dtype=torch.float64)[None], flat[pos].double()])


def _meta(pairs, weight, bias, start, vocab_size, opts, impl):
    """The per-rank description every rank must agree on, as one float64 tensor on the weight's
    device (ints are exact; built without a host sync)."""
    f64 = lambda values: torch.tensor(values, dtype=torch.float64, device=weight.device)  # noqa: E731
    parts = [f64([0.0, -1 if start is None else start, weight.shape[0], vocab_size, weight.shape[1],
                  bias is not None, opts.logit_scale, opts.softcap or 0.0, opts.temperature, opts.ignore_index,
                  sum(1 << EXTRA_OUTPUTS.index(n) for n in opts.extras), ("torch", "triton").index(impl),
                  torch.is_grad_enabled(),
                  sum(1 << i for i, t in enumerate([weight, bias]) if t is not None and t.requires_grad)])]
    for _, hidden, _, labels in pairs:
        dims = list(labels.shape) + [-1] * (4 - labels.dim())
        parts += [f64(dims + [hidden.requires_grad]),
                  torch.stack([(labels != opts.ignore_index).sum().double(), _label_fingerprint(labels)]),
                  _hidden_fingerprint(hidden).to(weight.device)]
    return torch.cat(parts)


_COMMON = ("error flag", "vocab_start", "V_local", "vocab_size", "hidden size", "has bias", "logit_scale", "softcap",
           "temperature", "ignore_index", "outputs", "impl", "grad mode", "weight/bias requires_grad")


def _check_local(pairs, weight, bias, vocab_size, opts):
    check_float("weight", weight, dim=2)
    if bias is not None:
        check_float("bias", bias, dim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape [V_local] = [{weight.shape[0]}] like the weight shard, "
                             f"got {tuple(bias.shape)}")
    for hname, hidden, lname, labels in pairs:
        check_float(hname, hidden, min_dim=1)
        if hidden.shape[-1] != weight.shape[1]:
            raise ValueError(f"weight shard must have shape [V_local, H] with H = {hname}.shape[-1] = "
                             f"{hidden.shape[-1]}, got {tuple(weight.shape)}")
        if labels.dim() > 4:
            raise ValueError(f"{lname} may have at most 4 dimensions, got shape {tuple(labels.shape)}")
        check_same_device(**{hname: hidden, "weight": weight, "bias": bias, lname: labels})
        check_same_dtype(**{hname: hidden, "weight": weight, "bias": bias})
        check_labels(lname, labels, hidden.shape[:-1], vocab_size, opts.ignore_index)


def validate(pairs, weight, bias, start, vocab_size, group, opts, impl, error=None):
    """Check the inputs on every rank and across ranks; returns the resolved :class:`VocabShard`.

    ``pairs`` is a list of ``(hidden name, hidden, labels name, labels)``. ``start`` None means
    "from the ranks' shard sizes in group rank order" (a DTensor ``Shard(0)`` weight). ``error``:
    an input error this rank already found; it still joins the all-gather (so the other ranks
    do not wait forever) and then every rank raises.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    mine = None
    try:
        if error is not None:
            raise error
        for hname, hidden, lname, labels in pairs:
            for name, t in ((hname, hidden), (lname, labels)):
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        check_float("weight", weight, dim=2)
        if start is not None and start + weight.shape[0] > vocab_size:
            raise ValueError(f"the weight shard's rows [{start}, {start + weight.shape[0]}) exceed vocab_size={vocab_size}")
        _check_local(pairs, weight, bias, vocab_size, opts)
        mine = _meta(pairs, weight, bias, start, vocab_size, opts, impl)
    except (TypeError, ValueError, RuntimeError) as exc:
        error = exc
    if not (dist.is_available() and dist.is_initialized()):  # no group: nobody to wait for
        if error is not None:
            raise error
        raise RuntimeError("a vocabulary-parallel head needs torch.distributed to be initialised "
                           "(torch.distributed.init_process_group) on every rank of its group")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    width = len(_COMMON) + len(pairs) * _PAIR_WIDTH
    if mine is None:
        mine = torch.zeros(width, dtype=torch.float64, device=weight.device)
        mine[0] = 1.0
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu()
    if error is not None:
        raise error
    bad = (table[:, 0] != 0).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"vocabulary-parallel head: rank(s) {bad} of the group rejected their inputs (see the "
                         "error raised there); every rank stops before any compute")
    ref = table[0]
    for col in range(3, len(_COMMON)):
        if not bool((table[:, col] == ref[col]).all()):
            raise ValueError(f"vocabulary-parallel head: {_COMMON[col]} differs across ranks "
                             f"({table[:, col].tolist()}); every rank must call it with the same options")
    off = len(_COMMON)
    for hname, _, lname, _ in pairs:
        block = table[:, off:off + _PAIR_EXACT]
        if not bool((block == block[0]).all()):
            raise ValueError(
                f"vocabulary-parallel head: {lname} (shape, count or ids) or {hname}.requires_grad differ across "
                f"ranks; every rank must hold the same labels and hidden states (tensor parallel). If each rank has "
                f"its own data (FSDP2, data parallel), the head is not vocabulary-parallel: {_FSDP_HINT}")
        fp = table[:, off + _PAIR_EXACT:off + _PAIR_WIDTH]
        tol = 1e-3 * (1.0 + fp[:, 1:2].abs().max())
        diff_sum = (fp[:, 0] - fp[0, 0]).abs().max()
        tol_s = 1e-2 * (1.0 + fp[0, 2:].abs())
        if bool(diff_sum > tol) or bool(((fp[:, 2:] - fp[0, 2:]).abs() > tol_s).any()):
            raise ValueError(
                f"vocabulary-parallel head: {hname} differs across ranks; a vocabulary-parallel head needs the same "
                f"(replicated) hidden states on every rank. If each rank has its own data (FSDP2, data parallel): "
                f"{_FSDP_HINT}")
        off += _PAIR_WIDTH
    starts, sizes = table[:, 1].long().tolist(), table[:, 2].long().tolist()
    given = [s >= 0 for s in starts]
    if any(given) and not all(given):
        raise ValueError("vocabulary-parallel head: some ranks passed vocab_start and others a DTensor weight")
    if not all(given):
        starts = [sum(sizes[:r]) for r in range(world)]
    spans = sorted(zip(starts, sizes))
    end = 0
    for s, n in spans:
        if s != end:
            raise ValueError(f"vocabulary-parallel head: the ranks' rows (start, V_local) = {list(zip(starts, sizes))} "
                             f"do not tile [0, {vocab_size}) without gaps or overlaps (expected a shard at {end})")
        end = s + n
    if end != vocab_size:
        raise ValueError(f"vocabulary-parallel head: the ranks' shards cover {end} rows but vocab_size is {vocab_size}")
    return VocabShard(start=starts[rank], vocab_size=vocab_size, group=group)


# ---------------------------------------------------------------------------------------------
# Compute.

def _local_max(hidden, weight, bias, opts):
    """Per-token max of z over the local shard and its first index, in PyTorch tiles."""
    n, v = hidden.shape[0], weight.shape[0]
    cd = compute_dtype(hidden.dtype)
    best = torch.full((n,), float("-inf"), dtype=cd, device=hidden.device)
    arg = torch.zeros(n, dtype=torch.long, device=hidden.device)
    token_block, vocab_block = _blocks(n, v)
    for t0 in range(0, n, token_block):
        t1 = min(n, t0 + token_block)
        h_blk = hidden[t0:t1].to(cd)
        for v0 in range(0, v, vocab_block):
            z, _ = _transform(_tile(h_blk, weight, bias, v0, min(v, v0 + vocab_block), cd), opts)
            tile_max, tile_arg = z.max(-1)
            better = tile_max > best[t0:t1]  # strict: an earlier tile keeps ties
            best[t0:t1] = torch.where(better, tile_max, best[t0:t1])
            arg[t0:t1] = torch.where(better, tile_arg + v0, arg[t0:t1])
    return best, arg


def _local_opts(opts):
    return dataclasses.replace(opts, outputs=("log_probs",) + tuple(e for e in opts.extras if e != "is_top1"))


class VocabParallelLinearLogprobsFunction(torch.autograd.Function):
    """Autograd over compacted rows of a vocabulary-parallel head (see the module docstring).

    ``forward(hidden [N, H], weight_shard [V_r, H], bias_shard [V_r] or None, labels [N] global
    ids in [0, V), shard: VocabShard, opts, impl)`` returns ``(log_probs, *extras)``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, shard: VocabShard, opts: LogprobOptions, impl: str):
        n, v_local = hidden.shape[0], weight.shape[0]
        cd = compute_dtype(hidden.dtype)
        group = shard.group
        owned = (labels >= shard.start) & (labels < shard.start + v_local)
        local_labels = torch.where(owned, labels - shard.start, torch.full_like(labels, -1))
        extras = opts.extras
        zeros = lambda: hidden.new_zeros(n, dtype=cd)  # noqa: E731
        local = _local_opts(opts)
        if n == 0:  # the same on every rank (validated): no collective anywhere
            lse = zeros()
            out = {"log_probs": zeros()}
            out.update({e: hidden.new_zeros(0, dtype=torch.bool if e == "is_top1" else cd) for e in extras})
        else:
            if v_local == 0:
                lp_r, lse_r = zeros(), torch.full((n,), float("-inf"), dtype=cd, device=hidden.device)
                ex_r = {e: zeros() for e in local.extras}
            else:
                lp_r, lse_r, ex_r = _backend(impl).linear_logprobs_fwd(hidden, weight, local_labels, bias, local)
            # The combination runs in float64 on [k, N] vectors (negligible next to the matmuls):
            # each rank's float32 lse is already rounded once, and combining R of them in float32
            # would add several more roundings of an O(|lse|) quantity to every probability.
            f64 = lambda t: t.to(torch.float64)  # noqa: E731
            lse_r, lp_r, ex_r = f64(lse_r), f64(lp_r), {k: f64(t) for k, t in ex_r.items()}
            z64 = torch.zeros_like(lse_r)
            maxes = [lse_r]
            if "is_top1" in extras:
                if v_local == 0:
                    top_r = torch.full_like(lse_r, float("-inf"))
                    arg_r = torch.zeros(n, dtype=torch.long, device=hidden.device)
                else:
                    top_r, arg_r = _local_max(hidden, weight, bias, opts)
                maxes.append(f64(top_r))  # exact: comparisons below stay bitwise
            maxes = torch.stack(maxes)
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
            m = maxes[0]
            e_r = torch.exp(lse_r - m)  # 0 for an empty shard
            has = e_r > 0
            parts = [e_r, torch.where(owned, lp_r + lse_r, z64)]
            if "entropy" in extras:
                parts.append(torch.where(has, e_r * (lse_r - ex_r["entropy"]), z64))
            if "log_sum_sq_probs" in extras:
                parts.append(torch.where(has, torch.exp(ex_r["log_sum_sq_probs"] + 2 * (lse_r - m)), z64))
            if "mean_logits" in extras:
                parts.append(ex_r["mean_logits"] * v_local if v_local else z64)
            parts = torch.stack(parts)
            dist.all_reduce(parts, op=dist.ReduceOp.SUM, group=group)
            s = parts[0]
            lse64 = m + torch.log(s)
            out = {"log_probs": parts[1] - lse64}
            i = 2
            if "entropy" in extras:
                out["entropy"] = lse64 - parts[i] / s
                i += 1
            if "log_sum_sq_probs" in extras:
                out["log_sum_sq_probs"] = torch.log(parts[i]) - 2 * torch.log(s)
                i += 1
            if "mean_logits" in extras:
                out["mean_logits"] = parts[i] / shard.vocab_size
            out = {k: t.to(cd) for k, t in out.items()}
            lse = lse64.to(cd)
            if "is_top1" in extras:
                key = torch.where(f64(top_r) == maxes[1], arg_r + shard.start,
                                  torch.full_like(arg_r, shard.vocab_size))
                dist.all_reduce(key, op=dist.ReduceOp.MIN, group=group)
                out["is_top1"] = key == labels
        ctx.save_for_backward(hidden, weight, bias, local_labels, lse)
        ctx.shard, ctx.opts, ctx.impl = shard, local, impl
        extra_values = tuple(out[e] for e in extras)
        ctx.mark_non_differentiable(*extra_values)
        return (out["log_probs"],) + extra_values

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_log_probs, *_):
        hidden, weight, bias, local_labels, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        n, v_local = hidden.shape[0], weight.shape[0]
        if n == 0 or v_local == 0:
            grad_h = torch.zeros_like(hidden, dtype=compute_dtype(hidden.dtype)) if need_h else None
            grad_w = torch.zeros_like(weight) if need_w else None
            grad_b = torch.zeros_like(bias) if need_b else None
        else:
            grad_h, grad_w, grad_b = _backend(ctx.impl).linear_logprobs_bwd(
                grad_log_probs.contiguous(), hidden, weight, local_labels, bias, lse, ctx.opts, (need_h, need_w, need_b)
            )
        if need_h:
            if n:  # n is the same on every rank, and so is need_h (validated): same collectives everywhere
                grad_h = grad_h.to(compute_dtype(hidden.dtype))
                dist.all_reduce(grad_h, op=dist.ReduceOp.SUM, group=ctx.shard.group)
            grad_h = grad_h.to(hidden.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def _resolve(weight, vocab_start, vocab_size, group):
    """Local weight/bias and ``(start or None, vocab_size, group)`` from a DTensor or explicit arguments."""
    if is_dtensor(weight):
        if vocab_start is not None or group is not None:
            raise ValueError("weight is a DTensor: its mesh and sharding give the group and vocab offset; "
                             "do not pass vocab_start or group")
        total = weight.shape[0]
        if vocab_size is not None and vocab_size != total:
            raise ValueError(f"vocab_size={vocab_size} but the DTensor weight has {total} rows")
        return None, total
    if vocab_start is None or vocab_size is None:
        raise ValueError("a plain weight shard needs vocab_start (its first row's global id) and vocab_size "
                         "(the total vocabulary); or pass the weight as a DTensor sharded by rows (Shard(0))")
    shard = VocabShard(start=vocab_start, vocab_size=vocab_size, group=group)  # validates the ints
    return shard.start, shard.vocab_size


def _check_impl(impl, device, dtype):
    if impl == "reference":
        raise ValueError("impl='reference' is not available for a vocabulary-parallel head: the oracle is "
                         "dpo_fast.reference on the full weight in one process; use impl='torch' or 'triton'")
    return resolve_impl(impl, device, dtype)


def prepare(pairs, weight, bias, *, vocab_start=None, vocab_size=None, group=None, opts, impl, explicit=True):
    """Resolve DTensors, validate on every rank and across ranks.

    Returns ``(local pairs, local weight, local bias, VocabShard, resolved impl)``.
    """
    hiddens = {hname: h for hname, h, _, _ in pairs}
    local, weight_l, bias_l, dgroup = dtensor_head(hiddens, weight, bias, explicit=explicit)
    pairs = [(hname, local[hname], lname, labels) for hname, _, lname, labels in pairs]
    start = total = error = None
    try:
        start, total = _resolve(weight, vocab_start, vocab_size, group)
        first = pairs[0][1]
        if isinstance(first, torch.Tensor):
            impl = _check_impl(impl, first.device, first.dtype)
    except (TypeError, ValueError, RuntimeError) as exc:
        error = exc
    group = dgroup if dgroup is not None else group
    if hasattr(group, "get_group"):  # a 1-D DeviceMesh
        group = group.get_group()
    shard = validate(pairs, weight_l, bias_l, start, total, group, opts, impl, error)
    return pairs, weight_l, bias_l, shard, impl


def rows_logprobs(hidden_rows, weight, label_rows, bias, shard: VocabShard, opts: LogprobOptions, impl: str):
    """The autograd function on compacted, validated rows; returns ``(log_probs, extras dict)``."""
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    log_probs, *extra_values = VocabParallelLinearLogprobsFunction.apply(hidden_rows, weight, bias, label_rows, shard,
                                                                         opts, impl)
    return log_probs, dict(zip(opts.extras, extra_values))


def vocab_parallel_linear_logprobs(hidden, weight, labels, bias=None, *, vocab_start=None, vocab_size=None, group=None,
                                   ignore_index=-100, logit_scale=1.0, softcap=None, temperature=1.0,
                                   outputs=("log_probs",), impl="auto", deterministic=False):
    """Computes, on every rank, ``linear_logprobs(hidden, W_full, labels, b_full, ...)`` where
    ``W_full = torch.cat(all ranks' weight shards in vocabulary order)`` (likewise the bias),
    without gathering the weight and without any ``[tokens, vocab]`` or full-vocabulary tensor.

    Args:
        hidden: ``[..., H]`` float16/bfloat16/float32/float64 hidden states, THE SAME on every
            rank of the group (or a DTensor on the weight's mesh).
        weight: this rank's ``[V_local, H]`` rows of the lm_head (same dtype and device as
            hidden; ``V_local`` may differ between ranks and may be 0), or the whole head as a
            DTensor sharded on dim 0 (``Shard(0)``) over a 1-D mesh, e.g. a transformers
            ``tp_plan`` / torchtitan lm_head (then leave vocab_start/vocab_size/group unset).
        labels: ``[...]`` integer GLOBAL token ids in ``[0, vocab_size)`` or ``ignore_index``,
            the same on every rank.
        bias: optional ``[V_local]`` bias rows (a DTensor ``Shard(0)`` with a DTensor weight).
        vocab_start: global id of this rank's first weight row. vocab_size: total ``V``.
        group: the process group (or 1-D DeviceMesh) the rows are split over (None: the
            default group).
        ignore_index, logit_scale, softcap, temperature, outputs, deterministic: see
            :func:`dpo_fast.linear_logprobs`; every rank must pass the same values.
        impl: ``"auto"``, ``"torch"`` or ``"triton"`` (``"reference"`` is not available).
    Returns:
        Like :func:`dpo_fast.linear_logprobs`, the same on every rank. Gradients: the complete
        ``grad_hidden`` on every rank; the weight and bias shards get their own rows' gradient.
    Every rank must call this (collectives); the loss built on the output must be the same on
    every rank.
    """
    opts = LogprobOptions(ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap,
                          temperature=temperature, outputs=outputs, deterministic=deterministic)
    return run(hidden, weight, labels, bias, opts, impl, vocab_start=vocab_start, vocab_size=vocab_size, group=group)


def run(hidden, weight, labels, bias, opts, impl, *, explicit=True, **placement):
    """:func:`vocab_parallel_linear_logprobs` with options already built; ``explicit=False`` is the
    DTensor route of :func:`dpo_fast.linear_logprobs` (plain hidden states are then an error)."""
    pairs, weight, bias, shard, impl = prepare([("hidden", hidden, "labels", labels)], weight, bias, opts=opts,
                                               impl=impl, explicit=explicit, **placement)
    rows, hidden_rows, label_rows = compact_rows(pairs[0][1], labels, opts.ignore_index)
    log_probs, extras = rows_logprobs(hidden_rows, weight, label_rows, bias, shard, opts, impl)
    return scatter_outputs(rows, log_probs, extras, labels, opts)


class VocabParallelLinearLogprobs(torch.nn.Module):
    """Module form of :func:`vocab_parallel_linear_logprobs`; shard placement and options fixed at
    construction (leave vocab_start/vocab_size/group unset for a DTensor weight)."""

    def __init__(self, *, vocab_start=None, vocab_size=None, group=None, ignore_index=-100, logit_scale=1.0,
                 softcap=None, temperature=1.0, outputs=("log_probs",), impl="auto", deterministic=False):
        super().__init__()
        if vocab_start is not None or vocab_size is not None:
            VocabShard(start=vocab_start, vocab_size=vocab_size, group=group)  # validate now
        self.placement = dict(vocab_start=vocab_start, vocab_size=vocab_size, group=group)
        self.opts = LogprobOptions(ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap,
                                   temperature=temperature, outputs=outputs, deterministic=deterministic)
        self.impl = impl

    def forward(self, hidden, weight, labels, bias=None):
        o = self.opts
        return vocab_parallel_linear_logprobs(hidden, weight, labels, bias, **self.placement,
                                              ignore_index=o.ignore_index, logit_scale=o.logit_scale,
                                              softcap=o.softcap, temperature=o.temperature, outputs=o.outputs,
                                              impl=self.impl, deterministic=o.deterministic)
