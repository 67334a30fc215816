"""The correctness oracle: plain PyTorch that materialises the logits.

Everything fast in dpo_fast is compared with these functions, and these functions are
compared with themselves in float64 (call them on ``.double()`` inputs to get the truth).
They are written the obvious way on purpose: full ``[N, V]`` logits, ``log_softmax``,
``gather``, and each preference loss as its paper or TRL writes it. Do not optimise them.

The matmul runs in the input dtype (as a model's lm_head does); everything after it runs in
float32, or float64 when the inputs are float64.
"""
from __future__ import annotations

import torch

from .options import LogprobOptions, check_loss_options


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_logits(hidden, weight, bias=None, *, logit_scale=1.0, softcap=None, temperature=1.0):
    """The transformed logits ``z = c*tanh((h @ W.T + b) * scale / c) / T`` as a full tensor."""
    s = hidden @ weight.T
    if bias is not None:
        s = s + bias
    z = s.to(compute_dtype(s.dtype)) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def _outputs_from_logits(z, labels, ignore_index, outputs):
    valid = labels != ignore_index
    safe_labels = labels.masked_fill(~valid, 0)
    log_p = torch.log_softmax(z, dim=-1)
    result = {}
    for name in outputs:
        if name == "log_probs":
            value = log_p.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
        elif name == "entropy":
            value = -(log_p.exp() * log_p).sum(-1)
        elif name == "log_sum_sq_probs":
            value = torch.logsumexp(2.0 * log_p, dim=-1)
        elif name == "mean_logits":
            value = z.mean(-1)
        elif name == "is_top1":
            result[name] = (z.argmax(-1) == labels) & valid
            continue
        else:
            raise ValueError(f"unknown output {name!r}")
        if name != "log_probs":
            value = value.detach()
        result[name] = value.masked_fill(~valid, 0.0)
    return result["log_probs"] if tuple(outputs) == ("log_probs",) else result


def reference_linear_logprobs(
    hidden, weight, labels, bias=None, *, ignore_index=-100, logit_scale=1.0, softcap=None,
    temperature=1.0, outputs=("log_probs",),
):
    """``log_softmax(z, -1).gather(-1, labels)`` with z from :func:`reference_logits`; 0 where ignored.

    Returns a tensor of shape ``labels.shape`` when ``outputs == ("log_probs",)``, else a dict
    keyed by the requested output names (see :mod:`dpo_fast.options`).
    """
    opts = LogprobOptions(ignore_index=ignore_index, outputs=outputs)  # validates the names
    z = reference_logits(hidden, weight, bias, logit_scale=logit_scale, softcap=softcap, temperature=temperature)
    return _outputs_from_logits(z, labels, ignore_index, opts.outputs)


def reference_logits_logprobs(logits, labels, *, ignore_index=-100, temperature=1.0):
    """``log_softmax(logits.float() / T, -1).gather(-1, labels)``; 0 where ignored."""
    z = logits.to(compute_dtype(logits.dtype)) / temperature
    return _outputs_from_logits(z, labels, ignore_index, ("log_probs",))


def reference_sequence_logps(token_logps, mask, *, average=False):
    """``(token_logps * mask).sum(-1)``, divided by ``mask.sum(-1)`` when ``average``."""
    mask = mask.to(token_logps.dtype)
    total = (token_logps * mask).sum(-1)
    return total / mask.sum(-1) if average else total


def _sig(x):
    return 1.0 / (1.0 + torch.exp(-x))


def _logsig(x):
    return torch.log(_sig(x))


def reference_dpo_loss(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
    beta=0.1, loss_type="sigmoid", loss_weights=None, label_smoothing=0.0, chosen_lengths=None,
    rejected_lengths=None, simpo_gamma=0.5, discopop_tau=0.05,
):
    """Every preference loss written out plainly. Returns ``(loss, chosen_rewards, rejected_rewards)``.

    ``loss`` is ``sum_k w_k * mean(loss_k)`` over the listed loss types. Rewards are
    ``beta * (logp - ref_logp)`` (``beta * avg logp`` for simpo), detached.
    The options are validated by the library's one check (:func:`dpo_fast.options.check_loss_options`,
    the same as every other impl), so a bad option cannot be silently dropped or truncated here.
    """
    types, weights = check_loss_options(loss_type, loss_weights, beta, label_smoothing, simpo_gamma, discopop_tau,
                                        has_reference=ref_chosen_logps is not None or ref_rejected_logps is not None)
    pc, pr = policy_chosen_logps, policy_rejected_logps
    rc = torch.zeros_like(pc) if ref_chosen_logps is None else ref_chosen_logps
    rr = torch.zeros_like(pr) if ref_rejected_logps is None else ref_rejected_logps
    eps = label_smoothing
    lr_c, lr_r = pc - rc, pr - rr
    delta = lr_c - lr_r
    total = 0.0
    for kind, w in zip(types, weights, strict=True):
        if kind == "sigmoid":
            losses = -(1 - eps) * _logsig(beta * delta) - eps * _logsig(-beta * delta)
        elif kind == "hinge":
            losses = torch.relu(1 - beta * delta)
        elif kind == "ipo":
            losses = (lr_c / chosen_lengths - lr_r / rejected_lengths - 1 / (2 * beta)) ** 2
        elif kind == "exo_pair":
            x = beta * delta
            losses = _sig(x) * (_logsig(x) - torch.log(torch.tensor(1 - eps, dtype=x.dtype))) + _sig(-x) * (
                _logsig(-x) - torch.log(torch.tensor(eps, dtype=x.dtype))
            )
        elif kind == "nca_pair":
            losses = -_logsig(beta * lr_c) - 0.5 * _logsig(-beta * lr_c) - 0.5 * _logsig(-beta * lr_r)
        elif kind == "robust":
            losses = (-(1 - eps) * _logsig(beta * delta) + eps * _logsig(-beta * delta)) / (1 - 2 * eps)
        elif kind == "bco_pair":
            losses = -_logsig(beta * lr_c) - _logsig(-beta * lr_r)
        elif kind == "sppo_hard":
            losses = (lr_c - 1 / (2 * beta)) ** 2 + (lr_r + 1 / (2 * beta)) ** 2
        elif kind in ("aot", "aot_unpaired"):
            if kind == "aot":
                d = torch.sort(pc - pr).values - torch.sort(rc - rr).values
            else:
                d = torch.sort(lr_c).values - torch.sort(lr_r).values
            losses = -(1 - eps) * _logsig(beta * d) - eps * _logsig(-beta * d)
        elif kind == "apo_zero":
            losses = 1 - _sig(beta * lr_c) + _sig(beta * lr_r)
        elif kind == "apo_down":
            losses = _sig(beta * lr_c) + 1 - _sig(beta * (lr_c - lr_r))
        elif kind == "discopop":
            z = beta * delta
            m = _sig(z / discopop_tau)
            losses = (1 - m) * (-_logsig(z)) + m * torch.exp(-z)
        elif kind == "sft":
            losses = (-pc.sum() / chosen_lengths.sum()).expand(pc.shape)
        elif kind == "sigmoid_norm":
            losses = -_logsig(beta * (lr_c / chosen_lengths - lr_r / rejected_lengths))
        elif kind == "simpo":
            x = beta * (pc / chosen_lengths - pr / rejected_lengths) - simpo_gamma
            losses = -(1 - eps) * _logsig(x) - eps * _logsig(-x)
        else:
            raise ValueError(f"unknown loss type {kind!r}")
        total = total + w * losses.mean()
    if types == ["simpo"]:
        chosen_rewards, rejected_rewards = beta * pc / chosen_lengths, beta * pr / rejected_lengths
    else:
        chosen_rewards, rejected_rewards = beta * lr_c, beta * lr_r
    return total, chosen_rewards.detach(), rejected_rewards.detach()
