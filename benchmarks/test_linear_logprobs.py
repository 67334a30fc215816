"""``linear_logprobs``: lm_head + log-softmax + label gather, forward, backward and both.

Inputs are completion rows only (``hidden [N, H]``, ``labels [N]``, every label valid); the
gradient flows to hidden and weight. FLOPs: 2·N·H·V forward (one matmul), 6·N·H·V backward
(the recomputed logits tile plus grad_hidden and grad_weight), 8·N·H·V both.
"""
import itertools

import pytest


def _round_robin(sets):
    return itertools.cycle(range(len(sets)))


def _prepare(harness, provider, shape, request):
    harness.skip_if_unavailable(provider, shape, request)
    fn = provider.build(shape)
    sets = harness.linear_sets(shape)
    err = harness.check_linear(fn, *sets[0], shape.softcap) if provider.checks_against_oracle else None
    return fn, sets, err


def _clear(h, w):
    h.grad = None
    w.grad = None


@pytest.mark.bench("linear_split", "linear")
def test_linear_logprobs_fwd(benchmark, harness, provider, shape, request):
    fn, sets, err = _prepare(harness, provider, shape, request)
    order = _round_robin(sets)

    def setup():
        h, w, y = sets[next(order)]
        return h, w, y

    n, hd, v = shape.tokens, shape.hidden, shape.vocab
    harness.run(benchmark, bench="linear_logprobs.fwd", provider=provider, shape=shape, target=fn, setup=setup,
                flops=2 * n * hd * v, check=lambda: err, matmul=(n, hd, v),
                extra={"what": "training forward (inputs require grad; what autograd saves counts in memory)"})


@pytest.mark.bench("linear_split", "linear")
def test_linear_logprobs_bwd(benchmark, harness, provider, shape, request):
    fn, sets, err = _prepare(harness, provider, shape, request)
    order = _round_robin(sets)

    def setup():
        h, w, y = sets[next(order)]
        _clear(h, w)
        return (fn(h, w, y).sum(),)

    def target(loss):
        loss.backward()

    n, hd, v = shape.tokens, shape.hidden, shape.vocab
    harness.run(benchmark, bench="linear_logprobs.bwd", provider=provider, shape=shape, target=target, setup=setup,
                flops=6 * n * hd * v, check=lambda: err, matmul=(n, hd, v),
                extra={"what": "backward of sum(log_probs) to hidden and weight; the forward runs in the untimed "
                               "setup"})


@pytest.mark.bench("linear_fwd_bwd", "linear")
def test_linear_logprobs_fwd_bwd(benchmark, harness, provider, shape, request):
    fn, sets, err = _prepare(harness, provider, shape, request)
    order = _round_robin(sets)

    def setup():
        h, w, y = sets[next(order)]
        _clear(h, w)
        return h, w, y

    def target(h, w, y):
        fn(h, w, y).sum().backward()

    n, hd, v = shape.tokens, shape.hidden, shape.vocab
    harness.run(benchmark, bench="linear_logprobs.fwd_bwd", provider=provider, shape=shape, target=target,
                setup=setup, flops=8 * n * hd * v, check=lambda: err, matmul=(n, hd, v),
                extra={"what": "forward + backward of sum(log_probs) to hidden and weight"})
