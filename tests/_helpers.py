"""Input factories and the comparison rules every fast-path test uses.

Truth is the oracle (:mod:`dpo_fast.reference`) on float64 copies of the inputs. For a
low-precision dtype the rule is: the fast path's error against the truth must be no larger
than the naive same-dtype PyTorch error (the oracle run in that dtype) plus one rounding of
the output to that dtype (``2**-8`` relative for bf16, ``2**-11`` for fp16, at the largest
magnitude). For float32 the same rule holds with a float32 rounding, and an absolute bound.
"""
from __future__ import annotations

import torch

from dpo_fast.reference import reference_dpo_loss, reference_linear_logprobs

ROUNDING = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-20, torch.float64: 2.0**-45}


def make_linear_inputs(shape, vocab, hidden_size, dtype, *, bias=False, ignore_frac=0.25, ignored_rows=(),
                       seed=0, weight_std=None):
    """hidden ``[*shape, H]``, weight ``[V, H]``, labels ``shape`` with some ignore_index, bias ``[V]``."""
    g = torch.Generator().manual_seed(seed)
    std = weight_std if weight_std is not None else 1.5 / hidden_size**0.5
    hidden = torch.randn(*shape, hidden_size, generator=g)
    weight = torch.randn(vocab, hidden_size, generator=g) * std
    b = torch.randn(vocab, generator=g) * 0.5 if bias else None
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = -100
    for row in ignored_rows:
        labels[row] = -100
    cast = lambda t: None if t is None else t.to(dtype).requires_grad_()  # noqa: E731
    return cast(hidden), cast(weight), labels, cast(b)


def max_err(value, truth):
    return (value.double() - truth.double()).abs().max().item() if value.numel() else 0.0


def truth_of(fn, tensors):
    """``fn`` on float64 detached copies of the float ``tensors`` (None and integer tensors kept)."""
    copies = [t if t is None or not t.dtype.is_floating_point else t.detach().double().requires_grad_(t.requires_grad)
              for t in tensors]
    return fn(*copies), copies


def assert_no_worse_than_naive(name, fast, naive, truth, dtype, *, abs_floor=0.0):
    """The bf16 rule (see module docstring), applied to one output or gradient."""
    scale = max(truth.double().abs().max().item(), 1e-30) if truth.numel() else 1.0
    eps = ROUNDING[dtype] * scale + abs_floor
    e_fast, e_naive = max_err(fast, truth), max_err(naive, truth)
    assert e_fast <= e_naive + eps, f"{name}: fast error {e_fast:.3g} > naive {dtype} error {e_naive:.3g} + eps {eps:.3g}"
    return e_fast, e_naive


def pair_batch(dtype, bias=False, seed=0):
    """A ragged DPO batch on the odd test shapes (V=507, H=123): 3 pairs, chosen ``[3, 11]``
    and rejected ``[3, 13]`` with prompt positions, random ignored positions and a label at
    the last vocab id. Returns ``(hc, lc, hr, lr, w, b, ref_c, ref_r)``; the reference
    sums are float32."""
    hc, w, lc, b = make_linear_inputs((3, 11), 507, 123, dtype, bias=bias, ignore_frac=0.2, seed=seed)
    hr, _, lr, _ = make_linear_inputs((3, 13), 507, 123, dtype, ignore_frac=0.2, seed=seed + 1)
    lc[:, :3] = -100  # prompt positions
    lr[:, :5] = -100
    lc[1, 5] = 506
    g = torch.Generator().manual_seed(seed + 2)
    ref_c, ref_r = torch.randn(3, generator=g) * 3 - 40, torch.randn(3, generator=g) * 3 - 40
    return hc, lc, hr, lr, w, b, ref_c, ref_r


def oracle_dpo(hc, lc, hr, lr, w, b, ref_c, ref_r, loss_type, **kw):
    """The DPO loss (beta=0.1) from the oracle, in the dtype of the inputs; ``kw`` goes to
    :func:`dpo_fast.reference.reference_linear_logprobs` (softcap, logit_scale, ...)."""
    pc = reference_linear_logprobs(hc, w, lc, b, **kw).sum(-1)
    pr = reference_linear_logprobs(hr, w, lr, b, **kw).sum(-1)
    lens = dict(chosen_lengths=(lc != -100).sum(-1), rejected_lengths=(lr != -100).sum(-1))
    return reference_dpo_loss(pc, pr, ref_c.to(pc.dtype), ref_r.to(pc.dtype), beta=0.1, loss_type=loss_type, **lens)[0]
