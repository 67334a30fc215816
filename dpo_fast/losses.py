"""Preference losses on sequence log-probs, and the fused linear DPO loss.

Every loss type follows TRL 1.16's definition (see the table in :func:`dpo_loss`); the loss
is the mean over pairs, summed over loss types with their weights. The formulas here use
numerically stable forms (``logsigmoid``, ``softplus``); the oracle in
:mod:`dpo_fast.reference` writes them the plain way, and the tests compare the two and
hand-computed values. Gradients come from autograd.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .ops import check_impl, compact_rows, fused_rows_logprobs, resolve_impl
from .options import LOSS_TYPES, LogprobOptions, check_loss_options  # noqa: F401 (LOSS_TYPES re-exported)
from .validation import check_float, check_linear_inputs, check_same_device, is_dtensor
from .vocab_parallel import VocabShard
from .vocab_parallel import prepare as _prepare_vocab_parallel
from .vocab_parallel import rows_logprobs as _vocab_parallel_rows

@dataclass
class DPOOutput:
    """What every DPO loss entry point returns.

    Attributes:
        loss: scalar, differentiable.
        losses: ``[B]`` per-pair loss (weighted sum over loss types), differentiable.
        chosen_rewards / rejected_rewards: ``[B]`` ``beta * (logp - ref_logp)`` (``beta * avg
            logp`` for simpo), detached.
        chosen_logps / rejected_logps: ``[B]`` policy sequence log-probs (differentiable).
        metrics: TRL's names -> detached 0-d tensors: ``rewards/chosen``, ``rewards/rejected``,
            ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``.
        chosen_lengths / rejected_lengths: ``[B]`` completion token counts when known.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    metrics: dict = field(default_factory=dict)
    chosen_lengths: torch.Tensor | None = None
    rejected_lengths: torch.Tensor | None = None


def _smoothed_logistic(x, eps):
    """``(1 - eps) * -logsigmoid(x) + eps * -logsigmoid(-x)``, i.e. softplus form."""
    loss = F.softplus(-x)
    return loss if eps == 0 else (1 - eps) * loss + eps * F.softplus(x)


def _per_pair_loss(kind, pc, pr, rc, rr, len_c, len_r, beta, eps, simpo_gamma, discopop_tau):
    lr_c, lr_r = pc - rc, pr - rr
    delta = lr_c - lr_r
    if kind == "sigmoid":
        return _smoothed_logistic(beta * delta, eps)
    if kind == "hinge":
        return torch.relu(1 - beta * delta)
    if kind == "ipo":
        return (lr_c / len_c - lr_r / len_r - 1 / (2 * beta)) ** 2
    if kind == "exo_pair":
        x = beta * delta
        # KL([q, 1 - q] || [1 - eps, eps]) with q = sigmoid(x), in log-space.
        return torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps)) + torch.sigmoid(-x) * (
            F.logsigmoid(-x) - math.log(eps))
    if kind == "nca_pair":
        return F.softplus(-beta * lr_c) + 0.5 * F.softplus(beta * lr_c) + 0.5 * F.softplus(beta * lr_r)
    if kind == "robust":
        x = beta * delta
        return ((1 - eps) * F.softplus(-x) - eps * F.softplus(x)) / (1 - 2 * eps)
    if kind == "bco_pair":
        return F.softplus(-beta * lr_c) + F.softplus(beta * lr_r)
    if kind == "sppo_hard":
        return (lr_c - 0.5 / beta) ** 2 + (lr_r + 0.5 / beta) ** 2
    if kind == "aot":
        d = torch.sort(pc - pr).values - torch.sort(rc - rr).values
        return _smoothed_logistic(beta * d, eps)
    if kind == "aot_unpaired":
        d = torch.sort(lr_c).values - torch.sort(lr_r).values
        return _smoothed_logistic(beta * d, eps)
    if kind == "apo_zero":
        return torch.sigmoid(-beta * lr_c) + torch.sigmoid(beta * lr_r)
    if kind == "apo_down":
        return torch.sigmoid(beta * lr_c) + torch.sigmoid(-beta * delta)
    if kind == "discopop":
        z = beta * delta
        m = torch.sigmoid(z / discopop_tau)
        return (1 - m) * F.softplus(-z) + m * torch.exp(-z)
    if kind == "sft":
        # Token-level mean over every chosen completion token of the batch, as TRL's
        # cross-entropy on the chosen half; the same value for each pair.
        return (-pc.sum() / len_c.sum()).expand(pc.shape)
    if kind == "sigmoid_norm":
        return F.softplus(-beta * (lr_c / len_c - lr_r / len_r))
    if kind == "simpo":
        return _smoothed_logistic(beta * (pc / len_c - pr / len_r) - simpo_gamma, eps)
    raise AssertionError(kind)


def _check_pair_tensor(name, t, batch, device):
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"{name} must have shape [{batch}] (one entry per pair), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def check_reference_logps(ref_chosen_logps, ref_rejected_logps, batch, device):
    """Both reference tensors or neither; each a floating ``[batch]`` tensor on ``device``."""
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither (reference-free)")
    for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if t is not None:
            check_float(name, t)
            _check_pair_tensor(name, t, batch, device)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
             beta=0.1, loss_type="sigmoid", loss_weights=None, label_smoothing=0.0, chosen_lengths=None,
             rejected_lengths=None, simpo_gamma=0.5, discopop_tau=0.05) -> DPOOutput:
    """Computes ``sum_k w_k * mean(loss_k(beta, logp_c - ref_c, logp_r - ref_r))`` over pairs.

    With ``lr = logp - ref_logp``, ``delta = lr_c - lr_r``, ``r = beta * lr``, ``eps =
    label_smoothing``: sigmoid ``-logsig(b*delta)`` (cDPO with eps), hinge, ipo (length
    normalised), exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero,
    apo_down, discopop (``discopop_tau``), sft (token-level mean NLL of the chosen
    completions), sigmoid_norm (length normalised sigmoid), and simpo
    (``-logsig(b*(avg_c - avg_r) - simpo_gamma)``, reference-free).

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` float sequence log-prob sums.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` reference sums, or both None for the
            reference-free form (treated as 0).
        beta: > 0. loss_type: a name or a list of names. loss_weights: one float per name.
        label_smoothing: eps; its valid range depends on the loss type.
        chosen_lengths, rejected_lengths: ``[B]`` completion token counts (> 0), required by
            ipo, sft, sigmoid_norm and simpo.
    Returns:
        :class:`DPOOutput`.
    """
    types, weights = check_loss_options(loss_type, loss_weights, beta, label_smoothing, simpo_gamma, discopop_tau,
                                        has_reference=ref_chosen_logps is not None or ref_rejected_logps is not None)
    check_float("policy_chosen_logps", policy_chosen_logps, dim=1)
    batch, device = policy_chosen_logps.shape[0], policy_chosen_logps.device
    if batch == 0:
        raise ValueError("policy_chosen_logps must hold at least one pair, got shape (0,)")
    check_float("policy_rejected_logps", policy_rejected_logps)
    _check_pair_tensor("policy_rejected_logps", policy_rejected_logps, batch, device)
    check_reference_logps(ref_chosen_logps, ref_rejected_logps, batch, device)
    needs_lengths = [k for k in types if LOSS_TYPES[k][0]]
    lengths = []
    for name, t in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if t is None:
            if needs_lengths:
                raise ValueError(f"loss_type {needs_lengths[0]!r} needs {name} (completion token counts, shape [{batch}])")
            lengths.append(None)
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor of shape [{batch}], got {type(t).__name__}")
        _check_pair_tensor(name, t, batch, device)
        if bool((t <= 0).any()):
            bad = (t <= 0).nonzero().flatten().tolist()
            raise ValueError(f"{name} must be > 0 for every pair; pair(s) {bad[:8]} have no completion token")
        lengths.append(t.to(policy_chosen_logps.dtype))
    len_c, len_r = lengths
    pc, pr = policy_chosen_logps, policy_rejected_logps
    zero = torch.zeros((), dtype=pc.dtype, device=device)
    rc = zero if ref_chosen_logps is None else ref_chosen_logps.to(pc.dtype)
    rr = zero if ref_rejected_logps is None else ref_rejected_logps.to(pc.dtype)

    losses = 0.0
    loss = 0.0
    for kind, w in zip(types, weights):
        per_pair = _per_pair_loss(kind, pc, pr, rc, rr, len_c, len_r, beta, label_smoothing, simpo_gamma, discopop_tau)
        losses = losses + w * per_pair
        loss = loss + w * per_pair.mean()
    with torch.no_grad():
        if types == ["simpo"]:
            chosen_rewards, rejected_rewards = beta * pc / len_c, beta * pr / len_r
        else:
            chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
        chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": pc.detach().mean(),
            "logps/rejected": pr.detach().mean(),
        }
    return DPOOutput(loss=loss, losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                     chosen_logps=pc, rejected_logps=pr, metrics=metrics, chosen_lengths=chosen_lengths,
                     rejected_lengths=rejected_lengths)


def _sequence_rows(labels, ignore_index, side):
    """Completion-token counts per sequence of a ``[B, T]`` labels tensor; errors on an empty one."""
    counts = (labels != ignore_index).sum(-1)
    empty = (counts == 0).nonzero().flatten()
    if empty.numel():
        raise ValueError(
            f"{side} sequence(s) {empty.tolist()[:8]} have no completion token (every label is "
            f"ignore_index={ignore_index}); a pair needs at least one completion token on each side"
        )
    return counts


def fused_linear_dpo_loss(chosen_hidden, chosen_labels, rejected_hidden, rejected_labels, weight, bias=None,
                          ref_chosen_logps=None, ref_rejected_logps=None, *, beta=0.1, loss_type="sigmoid",
                          loss_weights=None, label_smoothing=0.0, simpo_gamma=0.5, discopop_tau=0.05,
                          ignore_index=-100, logit_scale=1.0, softcap=None, temperature=1.0, impl="auto",
                          deterministic=False, vocab_parallel=None) -> DPOOutput:
    """Computes ``dpo_loss(seq(logp_c), seq(logp_r), ref_c, ref_r)`` where ``logp = log_softmax(z, -1)
    .gather(-1, labels)`` and ``z`` the transformed ``hidden @ weight.T + bias`` (see
    :func:`dpo_fast.linear_logprobs`), without ever allocating the logits.

    Chosen and rejected completions are passed separately (their padded lengths may differ).
    Labels are already aligned with the hidden state that predicts them (shifted), with
    ``ignore_index`` at prompt and padding positions. The valid rows of both sides are run
    through one fused call; per-sequence sums are segment sums of the token log-probs.

    Args:
        chosen_hidden: ``[B, Tc, H]`` last hidden states of the chosen sequences.
        chosen_labels: ``[B, Tc]`` integer labels (``ignore_index`` outside the completion).
        rejected_hidden: ``[B, Tr, H]``; rejected_labels: ``[B, Tr]``.
        weight: ``[V, H]`` lm_head weight; bias: optional ``[V]``.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` precomputed reference sums, or None
            for the reference-free form.
        beta, loss_type, loss_weights, label_smoothing, simpo_gamma, discopop_tau: see
            :func:`dpo_loss`; completion lengths come from the labels.
        ignore_index, logit_scale, softcap, temperature, impl, deterministic: see
            :func:`dpo_fast.linear_logprobs`.
        vocab_parallel: a vocabulary-parallel (tensor-parallel) head, see
            :mod:`dpo_fast.vocab_parallel`: a :class:`~dpo_fast.vocab_parallel.VocabShard` when
            ``weight``/``bias`` are this rank's rows, or True when ``weight`` is a DTensor
            sharded on dim 0; the hidden states and labels are then the same on every rank
            and labels are global ids. None: a DTensor weight takes this path only with
            DTensor hidden states (else a clear error).
    Every sequence must have at least one completion token (else a ValueError names it).
    """
    check_loss_options(loss_type, loss_weights, beta, label_smoothing, simpo_gamma, discopop_tau,
                       has_reference=ref_chosen_logps is not None or ref_rejected_logps is not None)
    check_impl(impl)
    opts = LogprobOptions(ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap,
                          temperature=temperature, deterministic=deterministic)
    shard = None
    if vocab_parallel not in (None, False) or any(is_dtensor(t) for t in (chosen_hidden, rejected_hidden, weight, bias)):
        if not (vocab_parallel in (None, False, True) or isinstance(vocab_parallel, VocabShard)):
            raise TypeError(f"vocab_parallel must be None, True or a VocabShard, got {type(vocab_parallel).__name__}")
        placement = {} if not isinstance(vocab_parallel, VocabShard) else dict(
            vocab_start=vocab_parallel.start, vocab_size=vocab_parallel.vocab_size, group=vocab_parallel.group)
        pairs, weight, bias, shard, impl = _prepare_vocab_parallel(
            [("chosen_hidden", chosen_hidden, "chosen_labels", chosen_labels),
             ("rejected_hidden", rejected_hidden, "rejected_labels", rejected_labels)],
            weight, bias, opts=opts, impl=impl, explicit=vocab_parallel not in (None, False), **placement)
        chosen_hidden, rejected_hidden = pairs[0][1], pairs[1][1]
    else:
        check_linear_inputs(chosen_hidden, weight, chosen_labels, bias, ignore_index,
                            hidden_name="chosen_hidden", labels_name="chosen_labels")
        check_linear_inputs(rejected_hidden, weight, rejected_labels, bias, ignore_index,
                            hidden_name="rejected_hidden", labels_name="rejected_labels")
    for name, t in (("chosen_hidden", chosen_hidden), ("rejected_hidden", rejected_hidden)):
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape [B, T, H], got {tuple(t.shape)}")
    if chosen_hidden.shape[0] != rejected_hidden.shape[0]:
        raise ValueError(
            f"chosen and rejected must hold the same number of pairs: chosen_hidden has {chosen_hidden.shape[0]}, "
            f"rejected_hidden has {rejected_hidden.shape[0]}"
        )
    check_same_device(chosen_hidden=chosen_hidden, rejected_hidden=rejected_hidden)
    batch = chosen_hidden.shape[0]
    check_reference_logps(ref_chosen_logps, ref_rejected_logps, batch, chosen_hidden.device)
    len_c = _sequence_rows(chosen_labels, ignore_index, "chosen")
    len_r = _sequence_rows(rejected_labels, ignore_index, "rejected")
    impl = resolve_impl(impl, chosen_hidden.device, chosen_hidden.dtype)
    if impl == "reference":
        from .reference import reference_linear_logprobs

        kw = dict(ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap, temperature=temperature)
        pc = reference_linear_logprobs(chosen_hidden, weight, chosen_labels, bias, **kw).sum(-1)
        pr = reference_linear_logprobs(rejected_hidden, weight, rejected_labels, bias, **kw).sum(-1)
    else:
        rows_c, h_c, lab_c = compact_rows(chosen_hidden, chosen_labels, ignore_index)
        rows_r, h_r, lab_r = compact_rows(rejected_hidden, rejected_labels, ignore_index)
        h_rows, lab_rows = torch.cat([h_c, h_r]), torch.cat([lab_c, lab_r])
        if shard is None:
            token_logps, _ = fused_rows_logprobs(h_rows, weight, lab_rows, bias, opts, impl)
        else:
            token_logps, _ = _vocab_parallel_rows(h_rows, weight, lab_rows, bias, shard, opts, impl)
        seq = torch.cat([rows_c // chosen_labels.shape[1], batch + rows_r // rejected_labels.shape[1]])
        sums = token_logps.new_zeros(2 * batch).index_add(0, seq, token_logps)
        pc, pr = sums[:batch], sums[batch:]
    return dpo_loss(pc, pr, ref_chosen_logps, ref_rejected_logps, beta=beta, loss_type=loss_type,
                    loss_weights=loss_weights, label_smoothing=label_smoothing, chosen_lengths=len_c,
                    rejected_lengths=len_r, simpo_gamma=simpo_gamma, discopop_tau=discopop_tau)


class FusedLinearDPOLoss(torch.nn.Module):
    """Module form of :func:`fused_linear_dpo_loss` with the loss options fixed at construction.

    ``forward(chosen_hidden, chosen_labels, rejected_hidden, rejected_labels, weight, bias=None,
    ref_chosen_logps=None, ref_rejected_logps=None) -> DPOOutput``.
    """

    def __init__(self, beta=0.1, loss_type="sigmoid", *, loss_weights=None, label_smoothing=0.0, simpo_gamma=0.5,
                 discopop_tau=0.05, ignore_index=-100, logit_scale=1.0, softcap=None, temperature=1.0, impl="auto",
                 deterministic=False, vocab_parallel=None):
        super().__init__()
        self.kwargs = dict(beta=beta, loss_type=loss_type, loss_weights=loss_weights, label_smoothing=label_smoothing,
                           simpo_gamma=simpo_gamma, discopop_tau=discopop_tau, ignore_index=ignore_index,
                           logit_scale=logit_scale, softcap=softcap, temperature=temperature, impl=impl,
                           deterministic=deterministic, vocab_parallel=vocab_parallel)
        # Validate the options now rather than at the first step (forward validates again, before any work).
        check_loss_options(loss_type, loss_weights, beta, label_smoothing, simpo_gamma, discopop_tau)
        LogprobOptions(ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap, temperature=temperature,
                       deterministic=deterministic)
        check_impl(impl)
        if not (vocab_parallel in (None, False, True) or isinstance(vocab_parallel, VocabShard)):
            raise TypeError(f"vocab_parallel must be None, True or a VocabShard, got {type(vocab_parallel).__name__}")

    def forward(self, chosen_hidden, chosen_labels, rejected_hidden, rejected_labels, weight, bias=None,
                ref_chosen_logps=None, ref_rejected_logps=None) -> DPOOutput:
        return fused_linear_dpo_loss(chosen_hidden, chosen_labels, rejected_hidden, rejected_labels, weight, bias,
                                     ref_chosen_logps, ref_rejected_logps, **self.kwargs)
