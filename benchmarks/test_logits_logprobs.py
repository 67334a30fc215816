"""``logits_logprobs``: log-softmax + label gather on precomputed logits, forward + backward.

Inputs: logits ``[N, V]`` in the suite's dtype (as a model's lm_head returns them) and
labels ``[N]``; the gradient flows to the logits. No FLOP count: the op is memory bound,
so the table reports time and memory only.
"""
import itertools

import pytest
import torch

from dpo_fast import reference as R


@pytest.mark.bench("logits", "logits")
def test_logits_logprobs_fwd_bwd(benchmark, harness, provider, shape, request):
    harness.skip_if_unavailable(provider, shape, request)
    fn = provider.build(shape)
    gen = harness.generator(shape.vocab)
    el = torch.empty((), dtype=harness.dtype).element_size()
    sets = []
    for _ in range(harness.rotation(shape.tokens * shape.vocab * el)):
        z = harness.randn(shape.tokens, shape.vocab, gen=gen, scale=2.0).requires_grad_(True)
        sets.append((z, harness.labels(shape.tokens, shape.vocab, gen)))
    z0, y0 = sets[0]
    m = min(256, shape.tokens)
    with torch.no_grad():
        got = fn(z0[:m].detach().clone(), y0[:m]).double()
        want = R.reference_logits_logprobs(z0[:m].detach().double(), y0[:m])
    err = harness.check_error(float((got - want).abs().max()))
    order = itertools.cycle(range(len(sets)))

    def setup():
        z, y = sets[next(order)]
        z.grad = None
        return z, y

    def target(z, y):
        fn(z, y).sum().backward()

    harness.run(benchmark, bench="logits_logprobs.fwd_bwd", provider=provider, shape=shape, target=target,
                setup=setup, check=lambda: err,
                extra={"what": "forward + backward of sum(log_probs) to the logits", "hidden": None})
