"""Every preference loss: hand-computed values, gradients against the oracle, the fused loss."""
import math

import pytest
import torch

import dpo_fast.blockwise as blockwise
from dpo_fast import LOSS_TYPES, FusedLinearDPOLoss, dpo_loss, fused_linear_dpo_loss
from dpo_fast.reference import reference_dpo_loss
from tests._helpers import assert_no_worse_than_naive, max_err, oracle_dpo, pair_batch, truth_of

# Fixed inputs: 3 pairs.
PC = [-10.0, -22.0, -7.5]
PR = [-12.0, -20.0, -9.0]
RC = [-11.0, -21.0, -8.0]
RR = [-11.5, -21.5, -8.0]
LC = [4, 9, 3]
LR = [5, 7, 3]
BETA = 0.5


def _sig(x):
    return 1 / (1 + math.exp(-x))


def _ls(x):
    return math.log(_sig(x))


def _hand(kind, eps, gamma=0.5, tau=0.05):
    """Per-pair losses from the definitions in the issue, on Python floats."""
    out = []
    lrc = [a - b for a, b in zip(PC, RC)]
    lrr = [a - b for a, b in zip(PR, RR)]
    if kind in ("aot", "aot_unpaired"):
        if kind == "aot":
            d = [a - b for a, b in zip(sorted(p - q for p, q in zip(PC, PR)), sorted(p - q for p, q in zip(RC, RR)))]
        else:
            d = [a - b for a, b in zip(sorted(lrc), sorted(lrr))]
        return [-(1 - eps) * _ls(BETA * x) - eps * _ls(-BETA * x) for x in d]
    if kind == "sft":
        return [-sum(PC) / sum(LC)] * 3
    for c, r, pc, pr, lc, lr in zip(lrc, lrr, PC, PR, LC, LR):
        x = BETA * (c - r)
        if kind == "sigmoid":
            v = -(1 - eps) * _ls(x) - eps * _ls(-x)
        elif kind == "hinge":
            v = max(0.0, 1 - x)
        elif kind == "ipo":
            v = (c / lc - r / lr - 1 / (2 * BETA)) ** 2
        elif kind == "exo_pair":
            v = _sig(x) * (_ls(x) - math.log(1 - eps)) + _sig(-x) * (_ls(-x) - math.log(eps))
        elif kind == "nca_pair":
            v = -_ls(BETA * c) - 0.5 * _ls(-BETA * c) - 0.5 * _ls(-BETA * r)
        elif kind == "robust":
            v = (-(1 - eps) * _ls(x) + eps * _ls(-x)) / (1 - 2 * eps)
        elif kind == "bco_pair":
            v = -_ls(BETA * c) - _ls(-BETA * r)
        elif kind == "sppo_hard":
            v = (c - 1 / (2 * BETA)) ** 2 + (r + 1 / (2 * BETA)) ** 2
        elif kind == "apo_zero":
            v = 1 - _sig(BETA * c) + _sig(BETA * r)
        elif kind == "apo_down":
            v = _sig(BETA * c) + 1 - _sig(BETA * (c - r))
        elif kind == "discopop":
            m = _sig(x / tau)
            v = (1 - m) * -_ls(x) + m * math.exp(-x)
        elif kind == "sigmoid_norm":
            v = -_ls(BETA * (c / lc - r / lr))
        elif kind == "simpo":
            y = BETA * (pc / lc - pr / lr) - gamma
            v = -(1 - eps) * _ls(y) - eps * _ls(-y)
        else:
            raise AssertionError(kind)
        out.append(v)
    return out


EPS = {"sigmoid": 0.1, "exo_pair": 0.01, "robust": 0.2, "aot": 0.1, "aot_unpaired": 0.05, "simpo": 0.1}


def _tensors(dtype=torch.float64):
    t = lambda v: torch.tensor(v, dtype=dtype, requires_grad=True)  # noqa: E731
    return t(PC), t(PR), t(RC), t(RR), torch.tensor(LC), torch.tensor(LR)


CASES = [(k, 0.001 if k == "exo_pair" else 0.0) for k in sorted(LOSS_TYPES)] + sorted(EPS.items())


@pytest.mark.parametrize("kind, eps", CASES)
def test_each_loss_matches_hand_computed_value_and_oracle_gradient(kind, eps):
    pc, pr, rc, rr, lc, lr = _tensors()
    refs = (None, None) if kind == "simpo" else (rc, rr)
    kw = dict(beta=BETA, loss_type=kind, label_smoothing=eps, chosen_lengths=lc, rejected_lengths=lr)
    out = dpo_loss(pc, pr, *refs, **kw)
    expected = _hand(kind, eps)
    assert out.losses.detach().tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert out.loss.item() == pytest.approx(sum(expected) / 3, rel=1e-12)
    ref_loss, ref_cr, ref_rr = reference_dpo_loss(pc, pr, *refs, **kw)
    inputs = [pc, pr] + ([] if kind == "simpo" else [rc, rr])
    g_fast = torch.autograd.grad(out.loss, inputs, allow_unused=True)
    g_ref = torch.autograd.grad(ref_loss, inputs, allow_unused=True)
    for a, b in zip(g_fast, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert torch.allclose(out.chosen_rewards, ref_cr) and torch.allclose(out.rejected_rewards, ref_rr)


def test_metrics_use_trl_names_and_values():
    pc, pr, rc, rr, lc, lr = _tensors()
    out = dpo_loss(pc, pr, rc, rr, beta=BETA)
    cr = [BETA * (a - b) for a, b in zip(PC, RC)]
    rj = [BETA * (a - b) for a, b in zip(PR, RR)]
    expected = {
        "rewards/chosen": sum(cr) / 3,
        "rewards/rejected": sum(rj) / 3,
        "rewards/accuracies": sum(a > b for a, b in zip(cr, rj)) / 3,
        "rewards/margins": sum(a - b for a, b in zip(cr, rj)) / 3,
        "logps/chosen": sum(PC) / 3,
        "logps/rejected": sum(PR) / 3,
    }
    assert set(out.metrics) == set(expected)
    for k, v in expected.items():
        assert out.metrics[k].item() == pytest.approx(v), k
        assert not out.metrics[k].requires_grad
    assert not out.chosen_rewards.requires_grad


def test_weighted_list_of_loss_types():
    pc, pr, rc, rr, lc, lr = _tensors()
    kw = dict(beta=BETA, chosen_lengths=lc, rejected_lengths=lr)
    mixed = dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], **kw)
    parts = [dpo_loss(pc, pr, rc, rr, loss_type=k, **kw).loss for k in ("sigmoid", "bco_pair", "sft")]
    assert mixed.loss.item() == pytest.approx(0.8 * parts[0].item() + 0.2 * parts[1].item() + parts[2].item())
    ref, _, _ = reference_dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "bco_pair", "sft"],
                                   loss_weights=[0.8, 0.2, 1.0], **kw)
    assert mixed.loss.item() == pytest.approx(ref.item(), rel=1e-12)


def test_reference_free_equals_zero_reference():
    pc, pr, _, _, _, _ = _tensors()
    zeros = torch.zeros(3, dtype=torch.float64)
    assert dpo_loss(pc, pr, beta=BETA).loss.item() == pytest.approx(dpo_loss(pc, pr, zeros, zeros, beta=BETA).loss.item())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(beta=0.0), "beta must be a finite number > 0"),
        (dict(beta=-1.0), "beta must be a finite number > 0"),
        (dict(loss_type="dpo"), "unknown loss_type 'dpo'"),
        (dict(label_smoothing=0.6), r"label_smoothing must be in \[0.0, 0.5\] for loss_type 'sigmoid'"),
        (dict(loss_type="robust", label_smoothing=0.5), r"label_smoothing must be in \[0.0, 0.5\) for loss_type 'robust'"),
        (dict(loss_type="exo_pair", label_smoothing=0.0), r"label_smoothing must be in \(0.0, 1.0\) for loss_type 'exo_pair'"),
        (dict(loss_type="ipo"), "loss_type 'ipo' needs chosen_lengths"),
        (dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0]), "one weight per loss type"),
        (dict(loss_type="simpo", chosen_lengths=torch.tensor([1, 2, 3]), rejected_lengths=torch.tensor([1, 2, 3])),
         "simpo' is reference-free"),
        (dict(loss_type="sft", chosen_lengths=torch.tensor([1, 0, 3]), rejected_lengths=torch.tensor([1, 2, 3])),
         r"chosen_lengths must be > 0 for every pair; pair\(s\) \[1\]"),
    ],
)
def test_bad_loss_options_raise_clear_errors(kwargs, match):
    pc, pr, rc, rr, _, _ = _tensors()
    with pytest.raises(ValueError, match=match):
        dpo_loss(pc, pr, rc, rr, **kwargs)


def test_bad_loss_tensors_raise_clear_errors():
    pc, pr, rc, rr, _, _ = _tensors()
    with pytest.raises(ValueError, match=r"policy_rejected_logps must have shape \[3\]"):
        dpo_loss(pc, pr[:2], rc, rr)
    with pytest.raises(ValueError, match="pass both ref_chosen_logps and ref_rejected_logps"):
        dpo_loss(pc, pr, rc, None)
    with pytest.raises(TypeError, match="policy_chosen_logps must be a floating tensor"):
        dpo_loss(torch.tensor([1, 2, 3]), pr)


def test_nan_propagates_through_loss():
    pc, pr, rc, rr, _, _ = _tensors()
    pc = pc.detach().clone()
    pc[1] = float("nan")
    out = dpo_loss(pc, pr, rc, rr)
    assert torch.isnan(out.loss) and torch.isnan(out.losses[1]) and torch.isfinite(out.losses[[0, 2]]).all()


# ---------------------------------------------------------------- fused linear DPO loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", ["sigmoid", "sft"]])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_linear_dpo_loss_matches_truth(dtype, loss_type, bias, monkeypatch):
    monkeypatch.setattr(blockwise, "MAX_VOCAB_BLOCK", 128)
    kw = dict(softcap=4.0, logit_scale=1.2) if bias else {}
    hc, lc, hr, lr, w, b, ref_c, ref_r = pair_batch(dtype, bias=bias)
    out = fused_linear_dpo_loss(hc, lc, hr, lr, w, b, ref_c, ref_r, beta=0.1, loss_type=loss_type, impl="torch", **kw)
    naive = oracle_dpo(hc, lc, hr, lr, w, b, ref_c, ref_r, loss_type, **kw)
    truth, copies = truth_of(lambda *t: oracle_dpo(*t, ref_c, ref_r, loss_type, **kw), [hc, lc, hr, lr, w, b])
    assert out.chosen_lengths.tolist() == (lc != -100).sum(-1).tolist()
    assert_no_worse_than_naive("loss", out.loss, naive, truth, dtype)
    live = [t for t in (hc, hr, w, b) if t is not None]
    live64 = [t for i, t in enumerate(copies) if i in (0, 2, 4, 5) and t is not None]
    for name, gf, gn, gt in zip(["chosen_hidden", "rejected_hidden", "weight", "bias"],
                                torch.autograd.grad(out.loss, live), torch.autograd.grad(naive, live),
                                torch.autograd.grad(truth, live64)):
        assert gf.dtype == dtype
        assert_no_worse_than_naive(name, gf, gn, gt, dtype)
        if dtype == torch.float32:
            assert max_err(gf, gt) < 1e-5 * max(1.0, gt.abs().max().item())


def test_fused_module_and_reference_impl_agree():
    hc, lc, hr, lr, w, b, ref_c, ref_r = pair_batch(torch.float64, bias=True)
    module = FusedLinearDPOLoss(beta=0.2, loss_type="hinge", impl="torch")
    a = module(hc, lc, hr, lr, w, b, ref_c.double(), ref_r.double())
    r = fused_linear_dpo_loss(hc, lc, hr, lr, w, b, ref_c.double(), ref_r.double(), beta=0.2, loss_type="hinge",
                              impl="reference")
    assert max_err(a.loss, r.loss) < 1e-12
    assert max_err(a.chosen_logps, r.chosen_logps) < 1e-10 and max_err(a.rejected_logps, r.rejected_logps) < 1e-10


def test_fused_loss_bad_input():
    hc, lc, hr, lr, w, b, ref_c, ref_r = pair_batch(torch.float32)
    with pytest.raises(ValueError, match="same number of pairs: chosen_hidden has 3, rejected_hidden has 2"):
        fused_linear_dpo_loss(hc, lc, hr[:2], lr[:2], w, None, ref_c, ref_r)
    lc2 = lc.clone()
    lc2[2] = -100
    with pytest.raises(ValueError, match=r"chosen sequence\(s\) \[2\] have no completion token"):
        fused_linear_dpo_loss(hc, lc2, hr, lr, w, None, ref_c, ref_r)
    with pytest.raises(ValueError, match=r"ref_chosen_logps must have shape \[3\]"):
        fused_linear_dpo_loss(hc, lc, hr, lr, w, None, ref_c[:2], ref_r)
    with pytest.raises(ValueError, match=r"rejected_labels must hold token ids in \[0, 507\)"):
        bad = lr.clone()
        bad[0, 7] = 507
        fused_linear_dpo_loss(hc, lc, hr, bad, w, None, ref_c, ref_r)
    with pytest.raises(ValueError, match=r"chosen_hidden must have shape \[B, T, H\]"):
        fused_linear_dpo_loss(hc[0], lc[0], hr[0], lr[0], w, None, ref_c, ref_r)
    with pytest.raises(ValueError, match="unknown loss_type"):
        FusedLinearDPOLoss(loss_type="nope")
