"""A full fused DPO loss step: chosen + rejected completions through the lm_head, token
log-probs, per-sequence sums, the sigmoid DPO loss against cached reference log-probs, and
the backward to both hidden states and the lm_head weight.

Inputs: ``B`` pairs of completions of ``T`` tokens each (prompt positions already dropped,
so every provider works on the same ``N = 2·B·T`` rows), ``[V, H]`` weight, ``[B]`` cached
reference log-probs. FLOPs: 8·N·H·V.
"""
import itertools

import pytest
import torch

from dpo_fast import reference as R


@pytest.mark.bench("dpo_step", "dpo_step")
def test_dpo_step_fwd_bwd(benchmark, harness, provider, shape, request, size_cfg):
    harness.skip_if_unavailable(provider, shape, request)
    fn = provider.build(shape)
    b, t = size_cfg["pairs"], size_cfg["completion"]
    assert shape.tokens == 2 * b * t
    gen = harness.generator(3)
    el = torch.empty((), dtype=harness.dtype).element_size()
    w_scale = 2.0 / shape.hidden ** 0.5
    w_bytes = shape.vocab * shape.hidden * el
    share_w = w_bytes > (128 << 20)
    n_sets = harness.rotation(shape.tokens * shape.hidden * el + (0 if share_w else w_bytes))
    shared = harness.randn(shape.vocab, shape.hidden, gen=gen, scale=w_scale).requires_grad_(True) if share_w else None
    sets = []
    for _ in range(n_sets):
        w = shared if share_w else harness.randn(shape.vocab, shape.hidden, gen=gen, scale=w_scale).requires_grad_()
        hc = harness.randn(b, t, shape.hidden, gen=gen).requires_grad_(True)
        hr = harness.randn(b, t, shape.hidden, gen=gen).requires_grad_(True)
        yc = harness.labels(0, shape.vocab, gen, (b, t))
        yr = harness.labels(0, shape.vocab, gen, (b, t))
        # cached reference log-probs near the policy's, so the loss is not saturated
        rc = torch.full((b,), -t * 7.0, device=harness.device) + torch.randn(b, generator=gen).to(harness.device)
        rr = torch.full((b,), -t * 7.0, device=harness.device) + torch.randn(b, generator=gen).to(harness.device)
        sets.append((hc, yc, hr, yr, w, rc, rr))

    err = None
    if provider.checks_against_oracle:
        hc, yc, hr, yr, w, rc, rr = sets[0]
        with torch.no_grad():
            got = fn(*(x.detach() for x in sets[0])).double()
            d = lambda x: x.detach().double()  # noqa: E731
            pc = R.reference_linear_logprobs(d(hc), d(w), yc, softcap=shape.softcap).sum(-1)
            pr = R.reference_linear_logprobs(d(hr), d(w), yr, softcap=shape.softcap).sum(-1)
            want = R.reference_dpo_loss(pc, pr, d(rc), d(rr), beta=0.1, loss_type="sigmoid")[0]
        err = harness.check_error(float((got - want).abs()))
    order = itertools.cycle(range(len(sets)))

    def setup():
        s = sets[next(order)]
        s[0].grad = s[2].grad = s[4].grad = None
        return s

    def target(*args):
        fn(*args).backward()

    n, hd, v = shape.tokens, shape.hidden, shape.vocab
    harness.run(benchmark, bench="dpo_step.fwd_bwd", provider=provider, shape=shape, target=target, setup=setup,
                flops=8 * n * hd * v, check=lambda: err, matmul=(n, hd, v),
                extra={"what": f"{b} pairs x {t} completion tokens per side, sigmoid loss, beta=0.1, forward + "
                               "backward to both hidden states and the weight", "pairs": b, "completion_tokens": t})
