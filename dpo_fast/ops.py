"""Fused log-prob ops: autograd functions, functional API and modules.

The stack for each op is: Triton kernels (``dpo_fast.kernels``) or the blockwise PyTorch
path (:mod:`dpo_fast.blockwise`), both with the same ``*_fwd``/``*_bwd`` signatures ->
an ``autograd.Function`` here -> a functional entry point and a thin ``nn.Module``.
``impl="reference"`` bypasses all of that and runs the oracle in :mod:`dpo_fast.reference`.
"""
from __future__ import annotations

import os

import torch

from . import blockwise, reference
from .options import LogprobOptions
from .validation import check_float, check_labels, check_linear_inputs, is_dtensor

IMPLS = ("auto", "reference", "torch", "triton")


def triton_available() -> bool:
    """True when triton imports and can run here (a CUDA device, or TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def check_impl(impl) -> str:
    """``impl`` must be one of :data:`IMPLS`; returns it."""
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """Map ``impl`` to "reference", "torch" or "triton" for tensors on ``device``.

    "auto" picks triton for CUDA tensors of a dtype the kernels support when triton is
    installed, and the blockwise PyTorch path otherwise (CPU, float64, no triton).
    """
    check_impl(impl)
    if impl == "auto":
        if device.type == "cuda" and dtype != torch.float64 and triton_available():
            return "triton"
        return "torch"
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton' needs the triton package and a CUDA device (or TRITON_INTERPRET=1 for the CPU interpreter)")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got tensors on {device}")
    return impl


def _backend(impl: str):
    """The module holding ``linear_logprobs_fwd/bwd`` and ``logits_logprobs_fwd/bwd``."""
    if impl == "triton":
        from . import kernels

        return kernels
    return blockwise


class LinearLogprobsFunction(torch.autograd.Function):
    """Autograd over compacted rows: every label is a real token id in ``[0, V)``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opts: LogprobOptions, impl: str):
        if hidden.shape[0] == 0:
            cd = reference.compute_dtype(hidden.dtype)
            log_probs, lse = hidden.new_zeros(0, dtype=cd), hidden.new_zeros(0, dtype=cd)
            extras = {n: hidden.new_zeros(0, dtype=torch.bool if n == "is_top1" else cd) for n in opts.extras}
        else:
            log_probs, lse, extras = _backend(impl).linear_logprobs_fwd(hidden, weight, labels, bias, opts)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.opts, ctx.impl = opts, impl
        extra_values = tuple(extras[name] for name in opts.extras)
        ctx.mark_non_differentiable(*extra_values)
        return (log_probs,) + extra_values

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_log_probs, *_):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if hidden.shape[0] == 0:
            zeros = [torch.zeros_like(t) if (t is not None and need) else None for t, need in zip((hidden, weight, bias), needs)]
            return (*zeros, None, None, None)
        grad_h, grad_w, grad_b = _backend(ctx.impl).linear_logprobs_bwd(
            grad_log_probs.contiguous(), hidden, weight, labels, bias, lse, ctx.opts, needs
        )
        return grad_h, grad_w, grad_b, None, None, None


class LogitsLogprobsFunction(torch.autograd.Function):
    """Autograd for the logits path; rows whose label is ignore_index give 0 and no gradient."""

    @staticmethod
    def forward(ctx, logits, labels, opts: LogprobOptions, impl: str):
        log_probs, lse = _backend(impl).logits_logprobs_fwd(logits, labels, opts)
        ctx.save_for_backward(logits, labels, lse)
        ctx.opts, ctx.impl = opts, impl
        return log_probs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_log_probs):
        logits, labels, lse = ctx.saved_tensors
        grad = _backend(ctx.impl).logits_logprobs_bwd(grad_log_probs.contiguous(), logits, labels, lse, ctx.opts)
        return grad, None, None, None


def compact_rows(hidden, labels, ignore_index):
    """Flatten to ``[N, H]``/``[N]`` and keep only rows whose label is not ignore_index.

    Returns ``(rows, hidden_rows, label_rows)``; ``rows`` indexes the flattened positions.
    Ignored positions then cost no vocabulary work at all.
    """
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    rows = (flat_labels != ignore_index).nonzero().squeeze(1)
    if rows.numel() == flat_labels.numel():
        return rows, flat_hidden.contiguous(), flat_labels.long().contiguous()
    return rows, flat_hidden.index_select(0, rows), flat_labels.index_select(0, rows).long()


def fused_rows_logprobs(hidden_rows, weight, label_rows, bias, opts: LogprobOptions, impl: str):
    """Run the resolved implementation on compacted rows; returns ``(log_probs, extras dict)``."""
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    log_probs, *extra_values = LinearLogprobsFunction.apply(hidden_rows, weight, bias, label_rows, opts, impl)
    return log_probs, dict(zip(opts.extras, extra_values))


def _scatter(rows, values, n, shape):
    if rows.numel() == n:
        return values.reshape(shape)
    return values.new_zeros(n).index_copy(0, rows, values).reshape(shape)


def linear_logprobs(hidden, weight, labels, bias=None, *, ignore_index=-100, logit_scale=1.0, softcap=None,
                    temperature=1.0, outputs=("log_probs",), impl="auto", deterministic=False):
    """Computes ``log_softmax(z, -1).gather(-1, labels[..., None])[..., 0]`` with
    ``z = c * tanh(((hidden @ weight.T + bias).float() * logit_scale) / c) / temperature``
    without allocating the ``[tokens, vocab]`` logits. 0.0 at ``ignore_index`` positions.

    Args:
        hidden: ``[..., H]`` float16/bfloat16/float32/float64 last hidden states.
        weight: ``[V, H]`` lm_head weight, same dtype and device as hidden. A DTensor
            weight sharded by rows (``Shard(0)``, tensor parallel) with DTensor hidden states
            on its mesh runs vocabulary-parallel (:mod:`dpo_fast.vocab_parallel`); any other
            DTensor input raises an error that says what to do (FSDP2: run the head inside the
            FSDP module's forward).
        labels: ``[...]`` integer token ids matching ``hidden.shape[:-1]``, each in
            ``[0, V)`` or equal to ``ignore_index``.
        bias: optional ``[V]`` lm_head bias.
        ignore_index: label value of positions to skip (they cost no vocabulary work).
        logit_scale: multiplies ``h @ W.T + b`` before the softcap.
        softcap: tanh softcap ``c`` (Gemma 2 uses 30.0); None disables it.
        temperature: divides the (capped) logits.
        outputs: names to return, from ``("log_probs", "entropy", "log_sum_sq_probs",
            "mean_logits", "is_top1")``; only ``log_probs`` carries a gradient.
        impl: ``"auto"``, ``"reference"``, ``"torch"`` or ``"triton"``.
        deterministic: Triton only: make grad_weight bitwise reproducible.
    Returns:
        A float32 tensor of shape ``labels.shape`` (float64 for float64 inputs) when
        ``outputs == ("log_probs",)``, else a dict of such tensors (``is_top1`` is bool).
        Gradients flow to hidden, weight and bias.
    """
    opts = LogprobOptions(ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap,
                          temperature=temperature, outputs=outputs, deterministic=deterministic)
    if is_dtensor(weight) or is_dtensor(hidden) or is_dtensor(bias):
        # A row-sharded DTensor head with DTensor hidden states is vocabulary-parallel; every
        # other DTensor combination is a clear error there (see dpo_fast.vocab_parallel).
        from .vocab_parallel import run

        return run(hidden, weight, labels, bias, opts, impl, explicit=False)
    check_linear_inputs(hidden, weight, labels, bias, ignore_index)
    impl = resolve_impl(impl, hidden.device, hidden.dtype)
    if impl == "reference":
        return reference.reference_linear_logprobs(hidden, weight, labels, bias, ignore_index=ignore_index,
                                                   logit_scale=logit_scale, softcap=softcap,
                                                   temperature=temperature, outputs=opts.outputs)
    rows, hidden_rows, label_rows = compact_rows(hidden, labels, ignore_index)
    log_probs, extras = fused_rows_logprobs(hidden_rows, weight, label_rows, bias, opts, impl)
    return scatter_outputs(rows, log_probs, extras, labels, opts)


def scatter_outputs(rows, log_probs, extras, labels, opts: LogprobOptions):
    """Per-row results back to ``labels.shape`` (0 at ignored positions): the tensor, or a dict."""
    n = labels.numel()
    result = {"log_probs": _scatter(rows, log_probs, n, labels.shape)}
    result.update({name: _scatter(rows, value, n, labels.shape) for name, value in extras.items()})
    if opts.outputs == ("log_probs",):
        return result["log_probs"]
    return {name: result[name] for name in opts.outputs}


def logits_logprobs(logits, labels, *, ignore_index=-100, temperature=1.0, impl="auto"):
    """Computes ``log_softmax(logits.float() / temperature, -1).gather(-1, labels[..., None])[..., 0]``
    in one pass over each row, 0.0 at ``ignore_index``; the backward writes the logits
    gradient directly in the logits dtype without a second full float32 buffer.

    Args:
        logits: ``[..., V]`` float logits (pass them contiguous to avoid a copy).
        labels: ``[...]`` integer ids in ``[0, V)`` or ``ignore_index``.
        temperature: divides the logits.
        impl: ``"auto"``, ``"reference"``, ``"torch"`` or ``"triton"``.
    Returns:
        float32 ``[...]`` log-probs (float64 for float64 logits); gradient to logits.
    """
    opts = LogprobOptions(ignore_index=ignore_index, temperature=temperature)
    check_float("logits", logits, min_dim=1)
    if isinstance(labels, torch.Tensor) and labels.device != logits.device:
        raise ValueError(f"labels must be on the logits' device {logits.device}, got {labels.device}")
    check_labels("labels", labels, logits.shape[:-1], logits.shape[-1], ignore_index)
    impl = resolve_impl(impl, logits.device, logits.dtype)
    if impl == "reference":
        return reference.reference_logits_logprobs(logits, labels, ignore_index=ignore_index, temperature=temperature)
    flat = logits.reshape(-1, logits.shape[-1]).contiguous()
    out = LogitsLogprobsFunction.apply(flat, labels.reshape(-1).long(), opts, impl)
    return out.reshape(labels.shape)


def sequence_logps(token_logps, mask, *, average=False):
    """Computes ``(token_logps * mask).sum(-1)``, divided by ``mask.sum(-1)`` when ``average``.

    Args:
        token_logps: ``[..., T]`` float per-token log-probs.
        mask: ``[..., T]`` bool or 0/1 tensor of completion positions.
        average: return the mean over completion tokens instead of the sum. A sequence with
            no completion token raises (its mean is undefined); its sum is 0.
    """
    check_float("token_logps", token_logps, min_dim=1)
    if not isinstance(average, bool):
        raise TypeError(f"average must be a bool, got {type(average).__name__}")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(token_logps.shape):
        raise ValueError(f"mask must be a tensor of shape {tuple(token_logps.shape)}, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    mask = mask.to(token_logps.dtype)
    total = (token_logps * mask).sum(-1)
    if not average:
        return total
    counts = mask.sum(-1)
    empty = (counts == 0).nonzero()
    if empty.numel():
        raise ValueError(f"sequence_logps(average=True): sequence(s) {empty.tolist()[:8]} have no completion token")
    return total / counts


class LinearLogprobs(torch.nn.Module):
    """Module form of :func:`linear_logprobs`; options fixed at construction."""

    def __init__(self, *, ignore_index=-100, logit_scale=1.0, softcap=None, temperature=1.0,
                 outputs=("log_probs",), impl="auto", deterministic=False):
        super().__init__()
        self.opts = LogprobOptions(ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap,
                                   temperature=temperature, outputs=outputs, deterministic=deterministic)
        check_impl(impl)
        self.impl = impl

    def forward(self, hidden, weight, labels, bias=None):
        o = self.opts
        return linear_logprobs(hidden, weight, labels, bias, ignore_index=o.ignore_index, logit_scale=o.logit_scale,
                               softcap=o.softcap, temperature=o.temperature, outputs=o.outputs, impl=self.impl,
                               deterministic=o.deterministic)
