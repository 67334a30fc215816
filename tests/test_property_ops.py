"""Property-based comparison of the fast paths with the float64 oracle (hypothesis).

Shapes (odd, tiny to a few hundred vocabulary entries), dtypes (float32, bfloat16, float64),
bias, logit scale, softcap, temperature, requested outputs, ignored positions, and the loss
options (every loss type with a valid label smoothing, beta, weights, reference-free) are drawn
at random. Forward values and every gradient must match the oracle run on float64 copies: to
float32 accuracy for float32/float64 inputs, and for bfloat16 no worse than the naive bfloat16
PyTorch computation plus one bfloat16 rounding (the project's 16-bit rule). ``derandomize``
keeps CI deterministic.
"""
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import dpo_fast  # noqa: E402
from dpo_fast.options import EXTRA_OUTPUTS, LOSS_TYPES  # noqa: E402
from dpo_fast.reference import reference_dpo_loss, reference_linear_logprobs  # noqa: E402
from tests._helpers import assert_no_worse_than_naive, max_err  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


@st.composite
def linear_problems(draw):
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 7)))
    vocab, hidden = draw(st.integers(1, 300)), draw(st.integers(1, 40))
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    opts = dict(
        logit_scale=draw(st.floats(0.1, 3.0)),
        softcap=draw(st.one_of(st.none(), st.floats(0.5, 50.0))),
        temperature=draw(st.floats(0.3, 3.0)),
        outputs=("log_probs",) + tuple(o for o in EXTRA_OUTPUTS if o != "is_top1" and draw(st.booleans())),
    )
    return shape, vocab, hidden, dtype, draw(st.booleans()), draw(st.floats(0.0, 0.9)), draw(st.integers(0, 2**16)), opts


def _inputs(shape, vocab, hidden, dtype, bias, ignore_frac, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * (3.0 / hidden**0.5)  # logits of a few units: softmax not flat
    b = torch.randn(vocab, generator=g) if bias else None
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = -100
    cast = lambda t, d: None if t is None else t.to(d).requires_grad_()  # noqa: E731
    return [cast(t, dtype) for t in (h, w, b)], labels


def _run(fn, tensors, labels, opts, out_grads):
    result = fn(tensors[0], tensors[1], labels, tensors[2], **opts)
    result = result if isinstance(result, dict) else {"log_probs": result}
    (result["log_probs"].double() * out_grads).sum().backward()
    grads = [None if t is None else t.grad for t in tensors]
    return {k: v.detach() for k, v in result.items()}, grads


@given(linear_problems())
@SETTINGS
def test_linear_logprobs_matches_float64_oracle(problem):
    shape, vocab, hidden, dtype, bias, ignore_frac, seed, opts = problem
    tensors, labels = _inputs(shape, vocab, hidden, dtype, bias, ignore_frac, seed)
    out_grads = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    fast, fast_g = _run(lambda *a, **k: dpo_fast.linear_logprobs(*a, impl="torch", **k), tensors, labels, opts,
                        out_grads)
    truth_t = [None if t is None else t.detach().double().requires_grad_() for t in tensors]
    truth, truth_g = _run(reference_linear_logprobs, truth_t, labels, opts, out_grads)
    if dtype == torch.bfloat16:  # the 16-bit rule: no worse than the naive bf16 computation + one rounding
        naive_t = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
        naive, naive_g = _run(reference_linear_logprobs, naive_t, labels, opts, out_grads)
        for name in truth:
            assert_no_worse_than_naive(name, fast[name], naive[name], truth[name], dtype, abs_floor=1e-5)
        for name, f, n, t in zip(("hidden", "weight", "bias"), fast_g, naive_g, truth_g):
            if t is not None:
                assert_no_worse_than_naive(f"grad_{name}", f, n, t, dtype, abs_floor=1e-5)
        return
    for name in truth:
        scale = max(1.0, truth[name].abs().max().item()) if truth[name].numel() else 1.0
        assert max_err(fast[name], truth[name]) <= 2e-5 * scale, name
    for name, f, t in zip(("hidden", "weight", "bias"), fast_g, truth_g):
        if t is not None:
            scale = max(1.0, t.abs().max().item())
            assert max_err(f, t) <= 2e-5 * scale, f"grad_{name}"


@st.composite
def loss_options(draw):
    kind = draw(st.sampled_from(sorted(LOSS_TYPES)))
    low, high, low_open, high_open = LOSS_TYPES[kind][1] or (0.0, 0.5, False, False)
    eps = draw(st.floats(low, high, exclude_min=low_open, exclude_max=high_open))
    if kind == "robust":
        eps = min(eps, 0.45)  # (1 - 2 eps) divides: keep the loss well scaled
    types = [kind]
    if kind != "simpo" and draw(st.booleans()):
        extra = draw(st.sampled_from(["sft", "sigmoid", "hinge", "ipo"]))
        if LOSS_TYPES[extra][1] is None or LOSS_TYPES[extra][1][0] <= eps <= LOSS_TYPES[extra][1][1]:
            types.append(extra)
    weights = [draw(st.floats(0.0, 2.0)) for _ in types] if draw(st.booleans()) else None
    return dict(loss_type=types if len(types) > 1 else kind, loss_weights=weights if len(types) > 1 or weights is None
                else weights[:1], beta=draw(st.floats(0.01, 2.0)), label_smoothing=eps,
                simpo_gamma=draw(st.floats(-1.0, 2.0)), discopop_tau=draw(st.floats(0.01, 1.0)))


@given(loss_options(), st.integers(1, 4), st.integers(1, 9), st.integers(1, 120), st.integers(0, 2**16))
@settings(max_examples=60, deadline=None, derandomize=True, database=None)
def test_fused_dpo_loss_matches_float64_oracle(options, batch, length, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = 16
    hc, hr = torch.randn(batch, length, hidden, generator=g), torch.randn(batch, length + 2, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * 0.5
    lc, lr = torch.randint(0, vocab, (batch, length), generator=g), torch.randint(0, vocab, (batch, length + 2),
                                                                                   generator=g)
    lc[:, : length // 2] = -100  # prompt positions
    lr[:, :1] = -100
    reference_free = options["loss_type"] == "simpo"
    refs = (None, None) if reference_free else (torch.randn(batch, generator=g) * 3 - 20,
                                                torch.randn(batch, generator=g) * 3 - 20)
    leaves = [t.double().requires_grad_() for t in (hc, hr, w)]
    out = dpo_fast.fused_linear_dpo_loss(leaves[0], lc, leaves[1], lr, leaves[2], None,
                                         *(None if r is None else r.double() for r in refs), impl="torch", **options)
    out.loss.backward()
    truth_leaves = [t.double().requires_grad_() for t in (hc, hr, w)]
    pc = reference_linear_logprobs(truth_leaves[0], truth_leaves[2], lc).sum(-1)
    pr = reference_linear_logprobs(truth_leaves[1], truth_leaves[2], lr).sum(-1)
    loss, rc_, rr_ = reference_dpo_loss(pc, pr, *(None if r is None else r.double() for r in refs),
                                        chosen_lengths=(lc != -100).sum(-1).double(),
                                        rejected_lengths=(lr != -100).sum(-1).double(), **options)
    loss.backward()
    assert abs(out.loss.item() - loss.item()) <= 1e-9 * max(1.0, abs(loss.item())), options
    for name, a, b in zip(("chosen_hidden", "rejected_hidden", "weight"), leaves, truth_leaves):
        ga = torch.zeros_like(a) if a.grad is None else a.grad  # e.g. sft alone does not see the rejected side
        gb = torch.zeros_like(b) if b.grad is None else b.grad
        assert max_err(ga, gb) <= 1e-9 * max(1.0, gb.abs().max().item()), (name, options)
    assert torch.allclose(out.chosen_rewards, rc_, atol=1e-9) and torch.allclose(out.rejected_rewards, rr_, atol=1e-9)
