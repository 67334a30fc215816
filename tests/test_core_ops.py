"""linear_logprobs / logits_logprobs / sequence_logps (PyTorch paths) against a float64 truth."""
import pytest
import torch

import dpo_fast.blockwise as blockwise
from dpo_fast import linear_logprobs, logits_logprobs, sequence_logps
from dpo_fast.options import EXTRA_OUTPUTS
from dpo_fast.reference import reference_linear_logprobs, reference_logits_logprobs
from tests._helpers import assert_no_worse_than_naive, make_linear_inputs, max_err, truth_of

CONFIGS = {
    "plain": dict(),
    "bias": dict(bias=True),
    "softcap_scale_temp": dict(bias=True, softcap=2.5, logit_scale=1.7, temperature=0.8),
    "scale_temp": dict(logit_scale=0.5, temperature=1.3),
}


@pytest.fixture(params=["default_blocks", "tiny_blocks"])
def blocks(request, monkeypatch):
    """Tiny blocks force many vocabulary tiles: exercises the online log-sum-exp rescaling,
    labels in every tile and cross-tile argmax ties."""
    if request.param == "tiny_blocks":
        monkeypatch.setattr(blockwise, "MAX_VOCAB_BLOCK", 64)
        monkeypatch.setattr(blockwise, "TILE_ELEMENTS", 64 * 16)
    return request.param


def _grads(out, tensors, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    live = [t for t in tensors if t is not None]
    return torch.autograd.grad((out * g).sum(), live)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("shape", [(63,), (3, 21)])
def test_linear_logprobs_torch_matches_truth(blocks, dtype, config, shape):
    kw = dict(CONFIGS[config])
    has_bias = kw.pop("bias", False)
    hidden, weight, labels, bias = make_linear_inputs(shape, 507, 123, dtype, bias=has_bias, ignored_rows=[0])
    fast = linear_logprobs(hidden, weight, labels, bias, impl="torch", **kw)
    assert fast.shape == labels.shape and fast.dtype == torch.float32
    assert torch.all(fast[labels == -100] == 0)
    naive = reference_linear_logprobs(hidden, weight, labels, bias, **kw)
    truth, copies = truth_of(lambda h, w, b: reference_linear_logprobs(h, w, labels, b, **kw), [hidden, weight, bias])
    assert_no_worse_than_naive("log_probs", fast, naive, truth, dtype)
    if dtype == torch.float32:
        assert max_err(fast, truth) < 1e-4
    tensors = [hidden, weight, bias]
    for name, gf, gn, gt in zip(["hidden", "weight", "bias"], _grads(fast, tensors), _grads(naive, tensors),
                                _grads(truth, copies)):
        assert gf.dtype == dtype
        assert_no_worse_than_naive(f"grad_{name}", gf, gn, gt, dtype)
        if dtype == torch.float32:
            assert max_err(gf, gt) < 1e-4 * max(1.0, gt.abs().max().item())


@pytest.mark.parametrize("config", list(CONFIGS))
def test_extra_outputs_match_truth(blocks, config):
    kw = dict(CONFIGS[config])
    has_bias = kw.pop("bias", False)
    hidden, weight, labels, bias = make_linear_inputs((4, 17), 507, 123, torch.float32, bias=has_bias, ignored_rows=[2])
    outputs = ("log_probs",) + EXTRA_OUTPUTS
    fast = linear_logprobs(hidden, weight, labels, bias, impl="torch", outputs=outputs, **kw)
    truth, _ = truth_of(lambda h, w, b: reference_linear_logprobs(h, w, labels, b, outputs=outputs, **kw),
                        [hidden, weight, bias])
    assert list(fast) == list(outputs)
    for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        assert fast[name].dtype == torch.float32
        assert max_err(fast[name], truth[name]) < 2e-5, name
        assert not fast[name].requires_grad or name == "log_probs"
    assert fast["is_top1"].dtype == torch.bool
    assert torch.equal(fast["is_top1"], truth["is_top1"])
    assert torch.all(fast["entropy"][labels == -100] == 0)


def test_is_top1_first_maximum_wins_across_tiles(monkeypatch):
    monkeypatch.setattr(blockwise, "MAX_VOCAB_BLOCK", 64)
    monkeypatch.setattr(blockwise, "TILE_ELEMENTS", 64 * 4)
    hidden, weight, _, _ = make_linear_inputs((4,), 300, 16, torch.float64)
    hidden, weight = hidden.detach(), weight.detach().clone()
    # Entries 10 and 200 (different tiles) share one large row: tied maximal logits.
    weight[10] = weight[200] = hidden[0] * 3
    labels = torch.tensor([10, 200, 10, 5])
    out = linear_logprobs(hidden, weight, labels, impl="torch", outputs=("is_top1",))["is_top1"]
    ref = reference_linear_logprobs(hidden, weight, labels, outputs=("is_top1",))["is_top1"]
    assert out[0].item() is True and out[1].item() is False
    assert torch.equal(out, ref)


def test_vocab_above_65536():
    hidden, weight, labels, bias = make_linear_inputs((9,), 70001, 8, torch.float32, bias=True)
    labels[0], labels[1] = 70000, 65536
    fast = linear_logprobs(hidden, weight, labels, bias, impl="torch")
    truth, copies = truth_of(lambda h, w, b: reference_linear_logprobs(h, w, labels, b), [hidden, weight, bias])
    assert max_err(fast, truth) < 1e-4
    for gf, gt in zip(_grads(fast, [hidden, weight, bias]), _grads(truth, copies)):
        assert max_err(gf, gt) < 1e-5


def test_all_positions_ignored_gives_zeros_and_zero_grads():
    hidden, weight, labels, bias = make_linear_inputs((2, 5), 50, 8, torch.float32, bias=True, ignore_frac=1.0)
    out = linear_logprobs(hidden, weight, labels, bias, impl="torch", outputs=("log_probs", "entropy"))
    assert torch.all(out["log_probs"] == 0) and torch.all(out["entropy"] == 0)
    grads = torch.autograd.grad(out["log_probs"].sum(), [hidden, weight, bias])
    assert all(torch.all(g == 0) for g in grads)


def test_gradcheck_float64_torch_path(monkeypatch):
    monkeypatch.setattr(blockwise, "MAX_VOCAB_BLOCK", 8)
    monkeypatch.setattr(blockwise, "TILE_ELEMENTS", 8 * 3)
    hidden, weight, labels, bias = make_linear_inputs((7,), 19, 5, torch.float64, bias=True, ignored_rows=[3])
    fn = lambda h, w, b: linear_logprobs(h, w, labels, b, impl="torch", softcap=2.0, logit_scale=1.3,  # noqa: E731
                                         temperature=0.9)
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_nan_in_hidden_propagates():
    hidden, weight, labels, _ = make_linear_inputs((6,), 40, 8, torch.float32, ignore_frac=0.0)
    hidden = hidden.detach().clone()
    hidden[2, 3] = float("nan")
    out = linear_logprobs(hidden, weight, labels, impl="torch", outputs=("log_probs", "entropy"))
    assert torch.isnan(out["log_probs"][2]) and torch.isnan(out["entropy"][2])
    assert torch.isfinite(out["log_probs"][[0, 1, 3, 4, 5]]).all()
    weight = weight.detach().clone()
    weight[7, 0] = float("nan")
    assert torch.isnan(linear_logprobs(hidden, weight, labels, impl="torch")).all()


def test_module_form_equals_functional():
    from dpo_fast import LinearLogprobs

    hidden, weight, labels, bias = make_linear_inputs((10,), 30, 6, torch.float32, bias=True)
    mod = LinearLogprobs(softcap=3.0, impl="torch")
    assert torch.equal(mod(hidden, weight, labels, bias), linear_logprobs(hidden, weight, labels, bias, softcap=3.0,
                                                                          impl="torch"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logits_logprobs_matches_truth(dtype, temperature, monkeypatch):
    monkeypatch.setattr(blockwise, "TILE_ELEMENTS", 507 * 8)  # several row blocks
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(3, 21, 507, generator=g) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, 507, (3, 21), generator=g)
    labels[1] = -100
    labels[0, ::4] = -100
    fast = logits_logprobs(logits, labels, temperature=temperature, impl="torch")
    naive = reference_logits_logprobs(logits, labels, temperature=temperature)
    truth, (logits64,) = truth_of(lambda z: reference_logits_logprobs(z, labels, temperature=temperature), [logits])
    assert fast.dtype == torch.float32 and torch.all(fast[labels == -100] == 0)
    assert_no_worse_than_naive("log_probs", fast, naive, truth, dtype)
    (gf,), (gn,), (gt,) = _grads(fast, [logits]), _grads(naive, [logits]), _grads(truth, [logits64])
    assert gf.dtype == dtype and torch.all(gf[1] == 0)
    assert_no_worse_than_naive("grad_logits", gf, gn, gt, dtype)


def test_sequence_logps():
    token = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    assert torch.equal(sequence_logps(token, mask), torch.tensor([-5.0, -0.5]))
    assert torch.allclose(sequence_logps(token, mask.bool(), average=True), torch.tensor([-2.5, -0.5]))
    sequence_logps(token, mask).sum().backward()
    assert torch.equal(token.grad, mask.float())
    with pytest.raises(ValueError, match=r"sequence\(s\) \[\[1\]\] have no completion token"):
        sequence_logps(token, torch.tensor([[1, 0, 0], [0, 0, 0]]), average=True)
    assert torch.equal(sequence_logps(token, torch.tensor([[1, 0, 0], [0, 0, 0]])), torch.tensor([-1.0, 0.0]))
    with pytest.raises(ValueError, match="mask must be a tensor of shape"):
        sequence_logps(token, mask[:, :2])
