"""The loss epilogue: what runs after the per-token log-probs.

* ``dpo_loss`` on ``[B]`` sequence log-probs with cached reference log-probs (sigmoid loss),
  forward + backward to the policy log-probs;
* per-sequence segment sums of ``[2B, T]`` token log-probs under a completion mask,
  forward + backward.

Both are tiny next to the lm_head; they are timed to show they stay negligible (and to catch
a host sync or a Python loop creeping in). Float32 throughout, as the fused ops return.
"""
import itertools

import pytest
import torch

from dpo_fast import reference as R


def _pairs(harness, shape, gen):
    b = shape.tokens
    pc = (-50 - 20 * torch.rand(b, generator=gen)).to(harness.device).requires_grad_(True)
    pr = (-60 - 20 * torch.rand(b, generator=gen)).to(harness.device).requires_grad_(True)
    rc = (-55 - 20 * torch.rand(b, generator=gen)).to(harness.device)
    rr = (-55 - 20 * torch.rand(b, generator=gen)).to(harness.device)
    return pc, pr, rc, rr


@pytest.mark.bench("epilogue", "epilogue_loss")
def test_dpo_loss(benchmark, harness, provider, shape, request):
    harness.skip_if_unavailable(provider, shape, request)
    fn = provider.build(shape)
    gen = harness.generator(1)
    sets = [_pairs(harness, shape, gen) for _ in range(harness.rotation(16 * shape.tokens))]
    with torch.no_grad():
        pc, pr, rc, rr = (t.detach().double() for t in sets[0])
        want = R.reference_dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="sigmoid")[0]
        err = harness.check_error(float((fn(*sets[0]).double() - want).abs()))
    order = itertools.cycle(range(len(sets)))

    def setup():
        s = sets[next(order)]
        s[0].grad = s[1].grad = None
        return s

    def target(pc, pr, rc, rr):
        fn(pc, pr, rc, rr).backward()

    harness.run(benchmark, bench="epilogue.dpo_loss", provider=provider, shape=shape, target=target, setup=setup,
                check=lambda: err, extra={"what": "sigmoid DPO loss on [B] log-probs, forward + backward",
                                          "dtype": "float32", "tokens": shape.tokens, "pairs": shape.tokens})


@pytest.mark.bench("epilogue", "epilogue_segment")
def test_segment_sums(benchmark, harness, provider, shape, request, size_cfg):
    harness.skip_if_unavailable(provider, shape, request)
    fn = provider.build(shape)
    gen = harness.generator(2)
    rows, t = 2 * shape.tokens, size_cfg["epilogue_len"]

    def make():
        logps = (-3 * torch.rand(rows, t, generator=gen)).to(harness.device).requires_grad_(True)
        start = torch.randint(1, t // 2, (rows, 1), generator=gen)
        end = torch.randint(t // 2 + 1, t + 1, (rows, 1), generator=gen)
        pos = torch.arange(t)[None, :]
        return logps, ((pos >= start) & (pos < end)).to(harness.device)

    sets = [make() for _ in range(harness.rotation(5 * rows * t))]
    with torch.no_grad():
        want = R.reference_sequence_logps(sets[0][0].double(), sets[0][1])
        err = harness.check_error(float((fn(*sets[0]).double() - want).abs().max()))
    order = itertools.cycle(range(len(sets)))

    def setup():
        s = sets[next(order)]
        s[0].grad = None
        return s

    def target(logps, mask):
        fn(logps, mask).sum().backward()

    harness.run(benchmark, bench="epilogue.segment_sum", provider=provider, shape=shape, target=target, setup=setup,
                check=lambda: err, extra={"what": f"masked sums of [2B, T] = [{rows}, {t}] token log-probs, "
                                          "forward + backward", "dtype": "float32", "tokens": rows * t,
                                          "pairs": shape.tokens})
