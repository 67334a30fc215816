"""impl="triton": the Triton kernels against the oracle and a float64 truth.

Without CUDA every kernel runs under the Triton CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before dpo_fast.kernels is imported); with CUDA the same tests run
compiled on the GPU, plus the ``gpu``-marked headline shapes. Shapes are small and odd
(63 tokens, vocab 507, hidden 123) and the interpreter blocks large, so the file runs in
about a minute on two CPU cores.

Rules: float32 outputs/gradients must be within a float32-level bound of the float64
truth; bf16 ones must be no worse than the naive same-dtype oracle plus one bf16 rounding
(tests/_helpers.py). Tolerances are never widened to make a test pass.
"""
from __future__ import annotations

import os
import types

import pytest
import torch

triton = pytest.importorskip("triton")

import dpo_fast  # noqa: E402
from dpo_fast import blockwise, reference  # noqa: E402
from dpo_fast.options import EXTRA_OUTPUTS, LogprobOptions  # noqa: E402
from tests._helpers import (  # noqa: E402
    assert_no_worse_than_naive, make_linear_inputs, max_err, oracle_dpo, pair_batch, truth_of,
)

if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("impl='triton' needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py)", allow_module_level=True)

import dpo_fast.kernels as K  # noqa: E402
from dpo_fast.kernels import linear_logprobs as KL  # noqa: E402
from dpo_fast.kernels import logits_logprobs as KG  # noqa: E402
from dpo_fast.kernels import _common  # noqa: E402
from dpo_fast.kernels._common import to_output  # noqa: E402
import triton.language as tl  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ALL_OUTPUTS = ("log_probs",) + EXTRA_OUTPUTS
SHAPE, VOCAB, HIDDEN = (3, 21), 507, 123  # 63 token positions
CONFIGS = {
    "plain": dict(),
    "bias_softcap_scale_temp": dict(bias=True, softcap=2.5, logit_scale=1.7, temperature=0.8),
    "scale_temp": dict(logit_scale=0.5, temperature=1.3),
}
# float32: the kernels and the oracle both compute in fp32; differences come from the
# summation order of the H-long dot products and of the vocabulary sums, and from the tanh
# built from exp (abs error ~1e-7 of tanh, times the softcap). Relative to the largest
# magnitude of each quantity, 2**-16 (1.5e-5) is ~100 fp32 roundings.
FP32_REL = 2.0**-16


def _to(t):
    return None if t is None else t.detach().to(DEVICE).requires_grad_(t.requires_grad)


def _inputs(dtype, cfg, *, seed=0, shape=SHAPE, vocab=VOCAB, hidden=HIDDEN):
    h, w, labels, b = make_linear_inputs(shape, vocab, hidden, dtype, bias=cfg.get("bias", False),
                                         ignored_rows=(1,), seed=seed)  # row 1 fully ignored
    return _to(h), _to(w), labels.to(DEVICE), _to(b)


def _opts_kwargs(cfg):
    return {k: v for k, v in cfg.items() if k != "bias"}


def _check(name, dtype, fast, naive, truth, worst):
    fast, naive, truth = fast.detach().cpu(), naive.detach().cpu(), truth.detach().cpu()
    assert not torch.isnan(fast).any(), f"{name}: NaN in the output (an element was not written?)"
    if dtype == torch.float32:
        scale = max(truth.abs().max().item(), 1e-30)
        err = max_err(fast, truth)
        assert err <= FP32_REL * scale, f"{name}: fp32 error {err:.3g} > {FP32_REL * scale:.3g}"
    else:
        err, _ = assert_no_worse_than_naive(name, fast, naive, truth, dtype)
    key = (str(dtype).replace("torch.", ""), name)
    worst[key] = max(worst.get(key, 0.0), err)


WORST: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _report_worst():
    yield
    if WORST:
        lines = [f"  {d:9s} {n:18s} {e:.3g}" for (d, n), e in sorted(WORST.items())]
        print("\nworst error vs float64 truth (impl='triton'):\n" + "\n".join(lines))


def _run_linear(h, w, labels, b, outputs, cfg, impl, grad_seed=1, deterministic=False):
    kw = _opts_kwargs(cfg)
    if impl == "reference":
        out = reference.reference_linear_logprobs(h, w, labels, b, outputs=outputs, **kw)
    else:
        out = dpo_fast.linear_logprobs(h, w, labels, b, outputs=outputs, impl=impl, deterministic=deterministic, **kw)
    out = out if isinstance(out, dict) else {"log_probs": out}
    g = torch.randn(labels.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    params = [t for t in (h, w, b) if t is not None]
    grads = torch.autograd.grad((out["log_probs"] * g.to(out["log_probs"].device, out["log_probs"].dtype)).sum(),
                                params)
    names = ["grad_hidden", "grad_weight", "grad_bias"][:len(params)]
    return out, dict(zip(names, grads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_linear_matches_truth(dtype, cfg_name):
    cfg = CONFIGS[cfg_name]
    h, w, labels, b = _inputs(dtype, cfg)
    fast, fast_g = _run_linear(h, w, labels, b, ALL_OUTPUTS, cfg, "triton")
    naive, naive_g = _run_linear(h, w, labels, b, ALL_OUTPUTS, cfg, "reference")
    (truth, truth_g), _ = truth_of(lambda *t: _run_linear(*t, ALL_OUTPUTS, cfg, "reference"), (h, w, labels, b))
    ignored = (labels == -100).cpu()
    for name in ALL_OUTPUTS:
        assert fast[name].shape == labels.shape
        if name == "is_top1":
            assert fast[name].dtype == torch.bool
            # Same decision as the truth wherever the top-2 gap is not a rounding-level tie.
            z = reference.reference_logits(h.detach().double(), w.detach().double(),
                                           None if b is None else b.detach().double(), **_opts_kwargs(cfg))
            top2 = z.topk(2, dim=-1).values
            clear = (top2[..., 0] - top2[..., 1]).cpu() > 1e-2
            assert torch.equal(fast[name].cpu()[clear], truth[name].cpu()[clear])
            assert not fast[name].cpu()[ignored].any()
            continue
        assert fast[name].dtype == torch.float32
        assert (fast[name].cpu()[ignored] == 0).all(), f"{name}: ignored positions must hold 0"
        _check(name, dtype, fast[name], naive[name], truth[name], WORST)
    for name, grad in fast_g.items():
        assert grad.dtype == dtype
        _check(name, dtype, grad, naive_g[name], truth_g[name], WORST)
    assert (fast_g["grad_hidden"].cpu()[ignored] == 0).all()


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Small fixed blocks (used by deterministic=True) and a small backward scratch: many
    token blocks, vocab tiles, K steps and backward vocab chunks (grad_h accumulation)."""
    monkeypatch.setitem(KL.FIXED_CONFIGS, "fwd", triton.Config({"BLOCK_N": 16, "BLOCK_V": 128, "BLOCK_K": 32}))
    monkeypatch.setitem(KL.FIXED_CONFIGS, "bwd", triton.Config({"BLOCK_N": 16, "BLOCK_V": 64, "BLOCK_K": 32}))
    monkeypatch.setitem(KL.FIXED_CONFIGS, "matmul",
                        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 2}))
    monkeypatch.setattr(KL, "SCRATCH_BYTES", 1)  # CHUNK_ALIGN (128)-wide chunks: 4 for V=507, any dtype
    monkeypatch.setitem(KG.FIXED_CONFIGS, "fwd", triton.Config({"BLOCK_N": 16, "BLOCK_V": 128}))
    monkeypatch.setitem(KG.FIXED_CONFIGS, "bwd", triton.Config({"BLOCK_N": 16, "BLOCK_V": 128}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_tiny_blocks_many_chunks(dtype, tiny_blocks):
    cfg = CONFIGS["bias_softcap_scale_temp"]
    h, w, labels, b = _inputs(dtype, cfg, seed=3)
    fast, fast_g = _run_linear(h, w, labels, b, ALL_OUTPUTS, cfg, "triton", deterministic=True)
    naive, naive_g = _run_linear(h, w, labels, b, ALL_OUTPUTS, cfg, "reference")
    (truth, truth_g), _ = truth_of(lambda *t: _run_linear(*t, ALL_OUTPUTS, cfg, "reference"), (h, w, labels, b))
    for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        _check(name, dtype, fast[name], naive[name], truth[name], WORST)
    for name, grad in fast_g.items():
        _check(name, dtype, grad, naive_g[name], truth_g[name], WORST)


def test_is_top1_first_maximum_wins_across_tiles(tiny_blocks):
    """Duplicate weight rows give exact ties; the first index wins, also across vocab tiles."""
    h, w, labels, _ = _inputs(torch.float32, {}, seed=4)
    w = w.detach().clone()
    top = reference.reference_logits(h.detach(), w).argmax(-1).flatten()
    valid_rows = (labels.flatten() != -100).nonzero().squeeze(1)
    row = valid_rows[0]
    first = int(top[row])
    w[VOCAB - 1] = w[first]  # an exact tie in the last tile
    lab = labels.clone().flatten()
    lab[valid_rows[0]] = first
    lab[valid_rows[1]] = VOCAB - 1
    h2 = h.detach().reshape(-1, HIDDEN).clone()
    h2[valid_rows[1]] = h2[row]
    for det in (True, False):
        out = dpo_fast.linear_logprobs(h2, w, lab, outputs=("is_top1",), impl="triton", deterministic=det)
        assert out["is_top1"][valid_rows[0]] and not out["is_top1"][valid_rows[1]]


def test_raw_launchers_match_blockwise():
    """The launchers on compacted rows against the blockwise PyTorch path (same contract)."""
    h, w, labels, b = _inputs(torch.float32, {"bias": True}, seed=5)
    rows = labels.flatten() != -100
    hr, lab = h.detach().reshape(-1, HIDDEN)[rows].contiguous(), labels.flatten()[rows].contiguous()
    w, b = w.detach(), b.detach()
    opts = LogprobOptions(softcap=4.0, logit_scale=1.1, temperature=0.9, outputs=ALL_OUTPUTS)
    lp, lse, extras = K.linear_logprobs_fwd(hr, w, lab, b, opts)
    lp_ref, lse_ref, extras_ref = blockwise.linear_logprobs_fwd(hr, w, lab, b, opts)
    assert lp.dtype == lse.dtype == torch.float32 and set(extras) == set(opts.extras)
    for x, y in [(lp, lp_ref), (lse, lse_ref)] + [(extras[k], extras_ref[k]) for k in opts.extras if k != "is_top1"]:
        assert max_err(x, y) <= FP32_REL * y.abs().max().item()
    assert torch.equal(extras["is_top1"], extras_ref["is_top1"])
    g = torch.randn(lab.shape[0], generator=torch.Generator().manual_seed(0)).to(DEVICE)
    ref = blockwise.linear_logprobs_bwd(g, hr, w, lab, b, lse_ref, opts, (True, True, True))
    for needs in [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]:
        got = K.linear_logprobs_bwd(g, hr, w, lab, b, lse, opts, needs)
        for need, x, y in zip(needs, got, ref):
            if not need:
                assert x is None
            else:
                assert x.shape == y.shape and x.dtype == y.dtype
                assert max_err(x, y) <= FP32_REL * y.abs().max().item()
    # No bias: grad_bias is None even when asked for.
    assert K.linear_logprobs_bwd(g, hr, w, lab, None, lse, LogprobOptions(), (True, True, True))[2] is None


# --- split-vocabulary forward ---------------------------------------------------------

H100 = 132
GPU_FWD_BLOCK_N = max(c.kwargs["BLOCK_N"] for lst in KL._FWD_GPU_CONFIGS.values() for c in lst)


@pytest.mark.parametrize("vocab", [32000, 50257, 128256, 152064, 256000])
def test_forward_grid_fills_an_h100(vocab):
    """Token blocks x vocabulary slices: at least two waves of one program per SM on 132
    SMs for every N >= 1024 (the largest GPU BLOCK_N: any config's grid is at least as
    large); slices are whole SPLIT_ALIGN multiples covering the vocabulary exactly once."""
    assert GPU_FWD_BLOCK_N == 128
    for n in [512, 1000, 1024, 1500, 2048, 3000, 4096, 8192, 12345, 16384, 65536]:
        splits, per = KL.fwd_split(n, vocab, H100, GPU_FWD_BLOCK_N)
        programs = triton.cdiv(n, GPU_FWD_BLOCK_N) * splits
        assert (splits - 1) * per < vocab <= splits * per
        assert splits == 1 or per % KL.SPLIT_ALIGN == 0
        if n >= 1024:
            assert programs >= KL.FWD_WAVES * H100, (n, vocab, splits, programs)
        if triton.cdiv(n, GPU_FWD_BLOCK_N) >= KL.FWD_WAVES * H100:
            assert splits == 1  # enough token blocks: no second pass
        # Never more slices than the target needs, beyond rounding slices down to whole SPLIT_ALIGN.
        assert splits <= 2 * triton.cdiv(KL.FWD_WAVES * H100, triton.cdiv(n, GPU_FWD_BLOCK_N)) + 1
    # Small vocabularies cannot be split below SPLIT_ALIGN ids per slice.
    assert KL.fwd_split(16, KL.SPLIT_ALIGN, H100, 128) == (1, KL.SPLIT_ALIGN)
    assert KL.fwd_split(16, 1000, H100, 128) == (4, 256)


def _compact(dtype, cfg, seed):
    h, w, labels, b = _inputs(dtype, cfg, seed=seed)
    rows = labels.flatten() != -100
    hr = h.detach().reshape(-1, HIDDEN)[rows].contiguous()
    return hr, w.detach(), labels.flatten()[rows].contiguous(), None if b is None else b.detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_split_forward_matches_truth(dtype, tiny_blocks, monkeypatch):
    """The launcher with 1 slice (one pass) and with 4 slices (128-id slices, merged by the
    second pass) against the float64 oracle: log-probs, lse and every extra, with bias,
    softcap, scale and temperature (bf16: no worse than the naive bf16 oracle)."""
    monkeypatch.setattr(KL, "SPLIT_ALIGN", 128)
    cfg = CONFIGS["bias_softcap_scale_temp"]
    hr, w, lab, b = _compact(dtype, cfg, seed=15)
    opts = LogprobOptions(outputs=ALL_OUTPUTS, deterministic=True, **_opts_kwargs(cfg))
    n = lab.shape[0]
    assert KL.fwd_split(n, VOCAB, 1, 16) == (1, VOCAB)
    assert KL.fwd_split(n, VOCAB, H100, 16) == (4, 128)

    def oracle(*t):
        return reference.reference_linear_logprobs(t[0], t[1], t[2], t[3], outputs=ALL_OUTPUTS, **_opts_kwargs(cfg))
    naive = oracle(hr, w, lab, b)
    truth, _ = truth_of(oracle, (hr, w, lab, b))
    z = reference.reference_logits(hr.double(), w.double(), b.double(), **_opts_kwargs(cfg))
    top2 = z.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-2
    results = {}
    for sms in (1, H100):
        lp, lse, extras = K.linear_logprobs_fwd(hr, w, lab, b, opts, num_sms=sms)
        results[sms] = (lp, extras)
        _check(f"split{sms} log_probs", dtype, lp, naive["log_probs"], truth["log_probs"], WORST)
        for name in ("entropy", "log_sum_sq_probs", "mean_logits"):
            _check(f"split{sms} {name}", dtype, extras[name], naive[name], truth[name], WORST)
        assert torch.equal(extras["is_top1"][clear], truth["is_top1"][clear])
    # Same per-token statistics, only the fp32 summation order differs between the two.
    assert max_err(results[1][0], results[H100][0]) <= FP32_REL * results[1][0].abs().max().item()


@pytest.mark.parametrize("split_align,sms,expect", [(256, 1, 1), (256, H100, 2), (128, H100, 4)],
                         ids=["1slice", "2slices", "4slices"])
def test_is_top1_first_maximum_wins_across_slices(tiny_blocks, monkeypatch, split_align, sms, expect):
    """Exact ties (duplicate weight rows) between vocab ids in different slices: the
    merge keeps the first slice reaching the maximum, as the one-pass kernel does."""
    monkeypatch.setattr(KL, "SPLIT_ALIGN", split_align)
    hr, w, lab, _ = _compact(torch.float32, {}, seed=16)
    w = w.clone()
    n = lab.shape[0]
    splits, per = KL.fwd_split(n, VOCAB, sms, 16)
    assert splits == expect
    top = reference.reference_logits(hr, w).argmax(-1)
    # Row 0's argmax duplicated into the last vocab id (the last slice); row 1 copies row 0.
    first = int(top[0])
    if splits > 1:
        assert first // per != (VOCAB - 1) // per or first == VOCAB - 1
    w[VOCAB - 1] = w[first]
    hr = hr.clone()
    hr[1] = hr[0]
    lab = lab.clone()
    lab[0], lab[1] = first, VOCAB - 1
    opts = LogprobOptions(outputs=("log_probs", "is_top1"), deterministic=True)
    _, _, extras = K.linear_logprobs_fwd(hr, w, lab, None, opts, num_sms=sms)
    assert bool(extras["is_top1"][0]) and not bool(extras["is_top1"][1])


def test_split_forward_num_sms_is_validated():
    hr, w, lab, _ = _compact(torch.float32, {}, seed=17)
    for bad in (0, -3, 1.5, True, "132"):
        with pytest.raises(ValueError, match="num_sms"):
            K.linear_logprobs_fwd(hr, w, lab, None, LogprobOptions(), num_sms=bad)


# --- TF32: fp32 follows torch.get_float32_matmul_precision() -----------------------------

@pytest.fixture
def matmul_precision():
    prev = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(prev)


def test_fp32_dot_precision_follows_torch(matmul_precision, monkeypatch):
    """"highest" (the default): IEEE fp32 products; "high"/"medium": TF32 tensor cores, with
    the TF32 config lists. (The interpreter computes every dot in fp32, so only the choice
    is visible here; test_gpu_tf32_accuracy checks the numbers on a GPU.)"""
    seen = []
    orig = KL._launch

    def spy(tuned, kernel, fixed, grid, det, *args, **kw):
        seen.append((tuned, kw.get("DOT_PRECISION")))
        return orig(tuned, kernel, fixed, grid, det, *args, **kw)

    monkeypatch.setattr(KL, "_launch", spy)
    hr, w, lab, _ = _compact(torch.float32, {}, seed=18)
    for precision, expect in (("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")):
        matmul_precision(precision)
        assert _common.dot_flags(torch.float32)["DOT_PRECISION"] == expect == _common.config_class(torch.float32)
        assert _common.dot_flags(torch.bfloat16)["DOT_PRECISION"] == "tf32"
        assert _common.config_class(torch.bfloat16) == "16"
        seen.clear()
        lp, lse, _ = K.linear_logprobs_fwd(hr, w, lab, None, LogprobOptions())
        K.linear_logprobs_bwd(torch.ones_like(lp), hr, w, lab, None, lse, LogprobOptions())
        assert seen and all(p == expect for t, p in seen if p is not None)
        assert seen[0][0] is KL._fwd_tuned[expect]
        ref = reference.reference_linear_logprobs(hr, w, lab)
        assert max_err(lp, ref) <= FP32_REL * ref.abs().max().item()


class _NaNFactory(types.SimpleNamespace):
    """Stands in for ``torch`` inside a launcher module: every empty buffer starts as NaN
    (True for bool), so an element the kernels forget to write shows up."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _poison(t):
        return t.fill_(True) if t.dtype == torch.bool else t.fill_(float("nan"))

    def empty(self, *args, **kwargs):
        return self._poison(torch.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._poison(torch.empty_like(*args, **kwargs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_poisoned_buffers_are_fully_written(dtype, monkeypatch):
    monkeypatch.setattr(KL, "torch", _NaNFactory())
    monkeypatch.setattr(KG, "torch", _NaNFactory())
    monkeypatch.setattr(KL, "SCRATCH_BYTES", 1)  # 128-wide backward chunks: 4 for V=507 (split grad_h in bf16)
    cfg = CONFIGS["bias_softcap_scale_temp"]
    h, w, labels, b = _inputs(dtype, cfg, seed=6)
    fast, fast_g = _run_linear(h, w, labels, b, ALL_OUTPUTS, cfg, "triton")
    (truth, truth_g), _ = truth_of(lambda *t: _run_linear(*t, ALL_OUTPUTS, cfg, "reference"), (h, w, labels, b))
    for name in ALL_OUTPUTS:
        assert not fast[name].isnan().any() if name != "is_top1" else True
    z = reference.reference_logits(h.detach().double(), w.detach().double(), b.detach().double(), **_opts_kwargs(cfg))
    top2 = z.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-2
    assert torch.equal(fast["is_top1"][clear], truth["is_top1"][clear])
    for name, grad in fast_g.items():
        assert not grad.isnan().any(), name
    logits = torch.randn(7, 300, generator=torch.Generator().manual_seed(0)).to(DEVICE, dtype).requires_grad_()
    lab = torch.tensor([0, 5, -100, 299, 17, -100, 3], device=DEVICE)
    out = dpo_fast.logits_logprobs(logits, lab, impl="triton")
    (grad,) = torch.autograd.grad(out.sum(), logits)
    assert not out.isnan().any() and not grad.isnan().any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_split_grad_hidden_accumulator_is_fp32_bit_for_bit(dtype, tiny_blocks, monkeypatch):
    """bf16/fp16 grad_hidden keeps its fp32 running sum across the 4 vocab chunks as two
    16-bit halves (output + low-half buffer): the result must equal, bit for bit, the one
    from a separate fp32 [N, H] accumulator, also when every new buffer starts as NaN."""
    h, w, labels, b = _inputs(dtype, {"bias": True}, seed=12)
    rows = labels.flatten() != -100
    hr, lab = h.detach().reshape(-1, HIDDEN)[rows].contiguous(), labels.flatten()[rows].contiguous()
    w, b = w.detach(), b.detach()
    opts = LogprobOptions(softcap=3.0, logit_scale=1.1, temperature=0.9, deterministic=True)
    _, lse, _ = K.linear_logprobs_fwd(hr, w, lab, b, opts)
    g = torch.randn(lab.shape[0], generator=torch.Generator().manual_seed(0)).to(DEVICE)
    assert triton.cdiv(VOCAB, KL._chunk_width(lab.shape[0], VOCAB, w.element_size())) == 4
    monkeypatch.setattr(KL, "GRAD_HIDDEN_SPLIT_ACC", False)
    expect = K.linear_logprobs_bwd(g, hr, w, lab, b, lse, opts)
    monkeypatch.setattr(KL, "GRAD_HIDDEN_SPLIT_ACC", True)
    monkeypatch.setattr(KL, "torch", _NaNFactory())
    got = K.linear_logprobs_bwd(g, hr, w, lab, b, lse, opts)
    for name, x, y in zip(("grad_hidden", "grad_weight", "grad_bias"), got, expect):
        assert x.dtype == y.dtype == dtype and torch.equal(x.view(torch.int16), y.view(torch.int16)), name
    # Only grad_hidden asked for (the grad_W/bias launches skipped) gives the same bits.
    only_h = K.linear_logprobs_bwd(g, hr, w, lab, b, lse, opts, (True, False, False))
    assert torch.equal(only_h[0].view(torch.int16), expect[0].view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_linear_dpo_loss_matches_truth(dtype, monkeypatch):
    """The whole DPO path with impl="triton": ragged chosen/rejected batches of different
    lengths, bias, softcap, logit scale and temperature, 4 backward vocab chunks; loss and
    every gradient against the float64 oracle (bf16: no worse than the naive bf16 oracle)."""
    monkeypatch.setattr(KL, "SCRATCH_BYTES", 1)  # 128-wide backward chunks: 4 for V=507
    kw = dict(softcap=4.0, logit_scale=1.2, temperature=0.9)
    hc, lc, hr, lr, w, b, ref_c, ref_r = pair_batch(dtype, bias=True, seed=13)
    hc, hr, w, b = _to(hc), _to(hr), _to(w), _to(b)
    lc, lr, ref_c, ref_r = lc.to(DEVICE), lr.to(DEVICE), ref_c.to(DEVICE), ref_r.to(DEVICE)
    out = dpo_fast.fused_linear_dpo_loss(hc, lc, hr, lr, w, b, ref_c, ref_r, beta=0.1, loss_type="sigmoid",
                                         impl="triton", **kw)
    naive = oracle_dpo(hc, lc, hr, lr, w, b, ref_c, ref_r, "sigmoid", **kw)
    truth, copies = truth_of(lambda *t: oracle_dpo(*t, ref_c, ref_r, "sigmoid", **kw), [hc, lc, hr, lr, w, b])
    assert out.chosen_lengths.tolist() == (lc != -100).sum(-1).tolist()
    _check("dpo loss", dtype, out.loss, naive, truth, WORST)
    live, live64 = [hc, hr, w, b], [copies[0], copies[2], copies[4], copies[5]]
    fast_g = torch.autograd.grad(out.loss, live)
    for name, gf, gn, gt in zip(["dpo grad_chosen_h", "dpo grad_rejected_h", "dpo grad_weight", "dpo grad_bias"],
                                fast_g, torch.autograd.grad(naive, live), torch.autograd.grad(truth, live64)):
        assert gf.dtype == dtype and gf.shape == gt.shape
        _check(name, dtype, gf, gn, gt, WORST)
    assert (fast_g[0][lc == -100] == 0).all() and (fast_g[1][lr == -100] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_autotuner_hook_arguments_are_tensors(dtype, monkeypatch):
    """triton 3.6's autotuner zeroes every reset_to_zero and clones every restore_value
    argument without a None check (only while tuning several configs, i.e. on a GPU): the
    launchers must pass tensors there in every case, here without bias."""
    seen = []
    for tuner in [*KL._bwd_tuned.values(), *KL._grad_hidden_tuned.values()]:
        def run(*args, _orig=tuner.run, _tuner=tuner, **kwargs):
            nargs = dict(zip(_tuner.arg_names, args))
            for name in list(_tuner.reset_to_zero) + list(_tuner.restore_value):
                assert isinstance(nargs[name], torch.Tensor), name
                seen.append(name)
            return _orig(*args, **kwargs)
        monkeypatch.setattr(tuner, "run", run)
    h, w, labels, _ = _inputs(dtype, {}, seed=14)
    rows = labels.flatten() != -100
    hr, lab = h.detach().reshape(-1, HIDDEN)[rows].contiguous(), labels.flatten()[rows].contiguous()
    opts = LogprobOptions()
    _, lse, _ = K.linear_logprobs_fwd(hr, w.detach(), lab, None, opts)
    g = torch.ones(lab.shape[0], device=DEVICE)
    K.linear_logprobs_bwd(g, hr, w.detach(), lab, None, lse, opts)
    assert set(seen) == {"bias_partial_ptr", "c_ptr", "c_lo_ptr"}


def test_deterministic_identical_bits():
    cfg = CONFIGS["bias_softcap_scale_temp"]
    runs = []
    for _ in range(2):
        h, w, labels, b = _inputs(torch.bfloat16, cfg, seed=7)
        out, grads = _run_linear(h, w, labels, b, ALL_OUTPUTS, cfg, "triton", deterministic=True)
        runs.append((out, grads))
    (o1, g1), (o2, g2) = runs
    for name in ALL_OUTPUTS:
        assert torch.equal(o1[name], o2[name]), name
    for name in g1:
        assert torch.equal(g1[name].view(torch.int16), g2[name].view(torch.int16)), name


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter warns on NaN
def test_nan_propagates():
    h, w, labels, b = _inputs(torch.float32, {"bias": True}, seed=8)
    h = h.detach().clone()
    labels = labels.clone()
    labels[0, :] = torch.arange(21, device=DEVICE)  # row 0 fully valid
    h[0, 3, 5] = float("nan")
    h.requires_grad_()
    out = dpo_fast.linear_logprobs(h, w, labels, b, impl="triton", outputs=("log_probs", "entropy"))
    assert torch.isnan(out["log_probs"][0, 3]) and torch.isnan(out["entropy"][0, 3])
    finite = torch.ones_like(labels, dtype=torch.bool)
    finite[0, 3] = False
    assert torch.isfinite(out["log_probs"][finite]).all()
    ref = reference.reference_linear_logprobs(h.detach(), w.detach(), labels, b.detach())
    assert max_err(out["log_probs"][finite], ref[finite]) <= FP32_REL * ref[finite].abs().max().item()
    gh, gw = torch.autograd.grad(out["log_probs"].sum(), (h, w))
    assert torch.isnan(gh[0, 3]).all() and torch.isfinite(gh[finite]).all()
    assert torch.isnan(gw).any()
    logits = torch.randn(4, 300, device=DEVICE)
    logits[2, 7] = float("nan")
    logits.requires_grad_()
    lp = dpo_fast.logits_logprobs(logits, torch.tensor([1, 2, 3, 4], device=DEVICE), impl="triton")
    assert torch.isnan(lp[2]) and torch.isfinite(lp[[0, 1, 3]]).all()


def test_clear_errors():
    opts = LogprobOptions()
    h, w = torch.randn(5, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64)
    lab = torch.zeros(5, dtype=torch.long)
    with pytest.raises(TypeError, match="float64"):
        K.linear_logprobs_fwd(h, w, lab, None, opts)
    with pytest.raises(TypeError, match="float64"):
        dpo_fast.linear_logprobs(h, w, lab, impl="triton")
    with pytest.raises(TypeError, match="float64"):
        K.logits_logprobs_fwd(torch.randn(5, 11, dtype=torch.float64), lab, opts)
    h, w = h.float(), w.float()
    with pytest.raises(ValueError, match="weight must be"):
        K.linear_logprobs_fwd(h, torch.randn(11, 9), lab, None, opts)
    with pytest.raises(ValueError, match="contiguous"):
        K.linear_logprobs_fwd(torch.randn(8, 5).T, w, lab, None, opts)
    with pytest.raises(ValueError, match="labels must have shape"):
        K.linear_logprobs_fwd(h, w, lab[:3], None, opts)
    with pytest.raises(TypeError, match="int64"):
        K.linear_logprobs_fwd(h, w, lab.int(), None, opts)
    with pytest.raises(ValueError, match="bias must have shape"):
        K.linear_logprobs_fwd(h, w, lab, torch.randn(10), opts)
    with pytest.raises(TypeError, match="must match"):
        K.linear_logprobs_fwd(h, w.bfloat16(), lab, None, opts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logits_path_matches_truth(dtype, temperature):
    g = torch.Generator().manual_seed(9)
    logits = (torch.randn(3, 21, VOCAB, generator=g) * 3).to(dtype).to(DEVICE).requires_grad_()
    labels = torch.randint(0, VOCAB, (3, 21), generator=g)
    labels[torch.rand(3, 21, generator=g) < 0.25] = -100
    labels[1] = -100
    labels = labels.to(DEVICE)
    gout = torch.randn(3, 21, generator=g, dtype=torch.float64)

    def run(x, impl):
        if impl == "reference":
            out = reference.reference_logits_logprobs(x, labels, temperature=temperature)
        else:
            out = dpo_fast.logits_logprobs(x, labels, temperature=temperature, impl=impl)
        (grad,) = torch.autograd.grad((out * gout.to(out.device, out.dtype)).sum(), x)
        return out, grad

    fast, fast_grad = run(logits, "triton")
    naive, naive_grad = run(logits, "reference")
    (truth, truth_grad), _ = truth_of(lambda x: run(x, "reference"), (logits,))
    assert fast.dtype == torch.float32 and fast_grad.dtype == dtype
    ignored = labels == -100
    assert (fast[ignored] == 0).all() and (fast_grad[ignored] == 0).all()
    _check("logits log_probs", dtype, fast, naive, truth, WORST)
    _check("grad_logits", dtype, fast_grad, naive_grad, truth_grad, WORST)


def test_logits_raw_launchers_tiny_blocks(tiny_blocks):
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(63, VOCAB, generator=g).to(DEVICE) * 2
    labels = torch.randint(0, VOCAB, (63,), generator=g).to(DEVICE)
    labels[::4] = 7  # a non-default ignore_index inside [0, V)
    opts = LogprobOptions(ignore_index=7, temperature=1.2, deterministic=True)
    lp, lse = K.logits_logprobs_fwd(logits, labels, opts)
    lp_ref, lse_ref = blockwise.logits_logprobs_fwd(logits, labels, opts)
    assert max_err(lp, lp_ref) <= FP32_REL * lp_ref.abs().max().item()
    assert max_err(lse, lse_ref) <= FP32_REL * lse_ref.abs().max().item()
    grad = torch.randn(63, generator=g).to(DEVICE)
    gl = K.logits_logprobs_bwd(grad, logits, labels, lse, opts)
    gl_ref = blockwise.logits_logprobs_bwd(grad, logits, labels, lse_ref, opts)
    assert max_err(gl, gl_ref) <= FP32_REL * gl_ref.abs().max().item()
    assert (gl[labels == 7] == 0).all()


@triton.jit
def _store_kernel(x_ptr, y_ptr, n, ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, to_output(x, y_ptr.dtype.element_ty, ROUND_BF16), mask=offs < n)


def test_bf16_store_rounds_to_nearest_even():
    """The kernels' bf16 stores round like torch (the interpreter's own cast truncates)."""
    g = torch.Generator().manual_seed(11)
    x = torch.cat([torch.randn(900, generator=g) * 10.0 ** torch.randint(-30, 30, (900,), generator=g),
                   torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3.4e38, -3.4e38,
                                 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1e-40]),
                   torch.tensor([0x7F800001, -0x00000001], dtype=torch.int32).view(torch.float32)]).to(DEVICE)
    y = torch.empty_like(x, dtype=torch.bfloat16)
    _store_kernel[(1,)](x, y, x.numel(), ROUND_BF16=_common.round_flag(torch.bfloat16), BLOCK=1024)
    expect = x.bfloat16()
    same = (y.view(torch.int16) == expect.view(torch.int16)) | (y.isnan() & expect.isnan())
    assert same.all(), x[~same][:5]


def test_interpreter_flags_follow_the_environment():
    assert _common.INTERPRET == (os.environ.get("TRITON_INTERPRET") == "1")
    assert _common.dot_flags(torch.bfloat16)["UPCAST_DOT"] == _common.INTERPRET
    assert not _common.dot_flags(torch.float32)["UPCAST_DOT"]
    if _common.INTERPRET:  # one config under the interpreter, several on a GPU
        for tuners in (KL._fwd_tuned, KL._bwd_tuned, KL._grad_hidden_tuned, KL._grad_weight_tuned):
            assert set(tuners) == {"16", "tf32", "ieee"} and all(len(t.configs) == 1 for t in tuners.values())
        assert len(KG._fwd_tuned.configs) == 1


# --- GPU only: headline shapes, compiled ------------------------------------------------

HEADLINE = [
    pytest.param(4096, 128256, None, id="H4096-V128256"),
    pytest.param(2304, 256000, 30.0, id="H2304-V256000-softcap"),
    pytest.param(3584, 152064, None, id="H3584-V152064"),
    pytest.param(4096, 32768, None, id="H4096-V32768"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("hidden_size,vocab,softcap", HEADLINE)
def test_gpu_headline_shapes(hidden_size, vocab, softcap):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    n = 2048
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(n, hidden_size, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(vocab, hidden_size, device="cuda", generator=g) / hidden_size**0.5).bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    gout = torch.randn(n, device="cuda", generator=g)
    results = {}
    for impl in ("triton", "reference"):
        out = (dpo_fast.linear_logprobs(h, w, labels, softcap=softcap, impl=impl) if impl == "triton" else
               reference.reference_linear_logprobs(h, w, labels, softcap=softcap))
        results[impl] = (out, *torch.autograd.grad((out * gout).sum(), (h, w)))
    torch.cuda.synchronize()
    (lp, gh, gw), (lp_ref, gh_ref, gw_ref) = results["triton"], results["reference"]
    # No float64 truth at this size: the fused fp32-accumulated path must agree with the
    # naive bf16 path to within the naive path's own rounding (bf16 logits: ~2**-8 relative).
    assert max_err(lp, lp_ref) <= 2.0**-7 * lp_ref.abs().max().item() + 1e-2
    assert max_err(gh, gh_ref) <= 2.0**-6 * gh_ref.abs().max().item()
    assert max_err(gw, gw_ref) <= 2.0**-6 * gw_ref.abs().max().item()


@pytest.mark.gpu
def test_gpu_tf32_accuracy(matmul_precision):
    """On a GPU, fp32 under "high" uses TF32: no worse than PyTorch's own TF32 matmul
    path (the reference under the same setting) plus one TF32 rounding (2**-11)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    h, w, labels, _ = make_linear_inputs((4, 512), 32000, 1024, torch.float32, seed=19)
    h, w, labels = h.detach().cuda(), w.detach().cuda(), labels.cuda()
    truth = reference.reference_linear_logprobs(h.double(), w.double(), labels).float()
    matmul_precision("high")
    fast = dpo_fast.linear_logprobs(h, w, labels, impl="triton")
    naive = reference.reference_linear_logprobs(h, w, labels)
    scale = truth.abs().max().item()
    assert max_err(fast, truth) <= max_err(naive, truth) + 2.0**-11 * scale
    matmul_precision("highest")
    fast = dpo_fast.linear_logprobs(h, w, labels, impl="triton")
    assert max_err(fast, truth) <= FP32_REL * scale
