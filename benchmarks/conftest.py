"""pytest-benchmark suites for dpo_fast: options, shapes, providers and the measuring harness.

Run ``pytest benchmarks`` (small CPU-sized shapes, a few minutes on 2 cores) or
``pytest benchmarks --bench-size=gpu`` (real model heads, 1k-32k tokens, bfloat16) on a CUDA
machine; ``--benchmark-json=out.json`` keeps everything, ``dpo-fast bench`` wraps both and
writes a results folder. See benchmarks/README.md.

Every provider gets the same tensors and does the same work: completion tokens only (the
rows whose label is not ignore_index), the same dtype, the same lm_head. Differences that
cannot be avoided are stated in the provider's ``note`` (it lands in ``extra_info``).
Before timing, each provider's output on the first rows is checked against the oracle.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

import dpo_fast
from dpo_fast import bench as B
from dpo_fast import reference as R

# ---------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------

# lm_head shapes of real models: hidden size H, vocabulary V, final-logit tanh softcap.
MODELS = {
    "llama3-8b": (4096, 128256, None),
    "qwen2.5-7b": (3584, 152064, None),
    "gemma2-2b": (2304, 256000, 30.0),
    "mistral-7b": (4096, 32768, None),
}

SIZES = {
    # CPU default: every head scaled down by 16 in H and in V, float32, 128-512 tokens, so
    # that the whole suite runs on a 2-core CPU in a few minutes. The names say so ("/16").
    "cpu": dict(scale=16, dtype=torch.float32, sweep_model="llama3-8b", sweep_tokens=(128, 256, 512), tokens=128,
                split_models=("llama3-8b",), logits_models=("llama3-8b", "gemma2-2b"), logits_tokens=128,
                pairs=2, completion=64, epilogue_pairs=64, epilogue_len=512, rounds=5, warmup=1),
    # Real heads in bfloat16; 1k-32k tokens for the time-vs-tokens sweep on the Llama-3 head.
    "gpu": dict(scale=1, dtype=torch.bfloat16, sweep_model="llama3-8b",
                sweep_tokens=(1024, 2048, 4096, 8192, 16384, 32768), tokens=4096,
                split_models=tuple(MODELS), logits_models=tuple(MODELS), logits_tokens=4096,
                pairs=8, completion=512, epilogue_pairs=256, epilogue_len=2048, rounds=20, warmup=3),
}


@dataclass(frozen=True)
class Shape:
    model: str
    tokens: int
    hidden: int
    vocab: int
    softcap: float | None
    scale: int = 1
    series: tuple = ()

    @property
    def name(self) -> str:
        return self.model if self.scale == 1 else f"{self.model}/{self.scale}"

    @property
    def id(self) -> str:
        return f"{self.name}-N{self.tokens}"


def _shape(model, tokens, scale, series=()):
    h, v, softcap = MODELS[model]
    return Shape(model, tokens, h // scale, v // scale, softcap, scale, tuple(series))


def shapes_for(kind: str, size: str) -> list[Shape]:
    cfg = SIZES[size]
    s = cfg["scale"]
    if kind == "linear_fwd_bwd":
        # time vs tokens on one head, then every head at the same token count (memory vs V)
        out = [_shape(cfg["sweep_model"], n, s, ("tokens",) + (("vocab",) if n == cfg["tokens"] else ()))
               for n in cfg["sweep_tokens"]]
        out += [_shape(m, cfg["tokens"], s, ("vocab",)) for m in MODELS if m != cfg["sweep_model"]]
        return out
    if kind == "linear_split":
        return [_shape(m, cfg["tokens"], s) for m in cfg["split_models"]]
    if kind == "logits":
        return [_shape(m, cfg["logits_tokens"], s) for m in cfg["logits_models"]]
    if kind == "dpo_step":
        n = 2 * cfg["pairs"] * cfg["completion"]
        return [_shape(m, n, s) for m in cfg["split_models"]]
    if kind == "epilogue":
        return [Shape("pairs", cfg["epilogue_pairs"], 0, 0, None, 1)]
    raise KeyError(kind)


# ---------------------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------------------

def _has(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _dpo_fast_triton_reason(device):
    if device.type != "cuda":
        return ("needs a CUDA device: the Triton kernels only run on CPU under TRITON_INTERPRET=1, a debugging "
                "interpreter far too slow to time")
    if not _has("triton"):
        return "triton is not installed (pip install triton)"
    try:
        from dpo_fast import kernels
    except ImportError as e:  # pragma: no cover - depends on the build
        return f"dpo_fast.kernels does not import: {e}"
    if not hasattr(kernels, "linear_logprobs_fwd"):
        return "dpo_fast.kernels has no linear_logprobs_fwd yet"
    return None


def _needs(module, pip_name, gpu=False, what=""):
    def reason(device):
        if not _has(module):
            return f"{pip_name} is not installed (pip install {pip_name})"
        if gpu and device.type != "cuda":
            return f"{what or pip_name} is a Triton/CUDA kernel: needs a CUDA device, none here"
        return None
    return reason


def _trl_reason(device):
    if not _has("trl"):
        return "trl is not installed (pip install trl==1.16.0)"
    try:
        import trl.kernels

        trl.kernels.ChunkedLogProbFunction  # noqa: B018 - added in trl 1.16
    except (ImportError, AttributeError) as e:
        return f"this trl has no trl.kernels.ChunkedLogProbFunction (added in 1.16): {e}"
    return None


@dataclass
class Provider:
    name: str
    family: str
    build: object  # callable(shape, ctx) -> the function to time
    skip_reason: object = None  # callable(device) -> reason or None
    note: str = ""
    checks_against_oracle: bool = True
    shape_skip: object = None  # callable(shape) -> reason or None

    def __repr__(self):
        return self.name


_COMPILED: dict = {}

# Set in pytest_configure: True under --benchmark-disable (the smoke run: every test once,
# nothing measured). Code generation is then skipped to keep the smoke run fast:
# torch.compile gets backend="eager" (dynamo still traces the function) and Liger's DPO loss
# compiled=False. Timed runs always use the defaults.
SMOKE = False


def compiled(key, fn):
    """One ``torch.compile`` (default settings) per naive function and option set, so shapes
    of one function share dynamo's cache as they would in a training script."""
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, backend="eager") if SMOKE else torch.compile(fn)
    return _COMPILED[key]


def _trl_chunk_size() -> int:
    from trl.trainer import utils as trl_utils

    # TRL's own chunk width for its patched forward (trl/trainer/utils.py).
    return getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)


def _trl_linear_logprobs(h, w, y, softcap):
    from trl.kernels import ChunkedLogProbFunction

    return ChunkedLogProbFunction.apply(h, w, None, y, 1.0, _trl_chunk_size(), softcap, 1.0, ())[0]


# --- linear_logprobs: f(hidden [N, H], weight [V, H], labels [N]) -> float32 log-probs [N]

def _lin_dpo_fast(impl):
    return lambda shape: functools.partial(dpo_fast.linear_logprobs, softcap=shape.softcap, impl=impl)


def _lin_compile(shape):
    return compiled(("linear", shape.softcap),
                    functools.partial(R.reference_linear_logprobs, softcap=shape.softcap))


def _lin_liger(shape):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction="none", softcap=shape.softcap)
    return lambda h, w, y: -loss(w, h, y)


def _lin_cce(shape):
    from cut_cross_entropy import linear_cross_entropy

    return lambda h, w, y: -linear_cross_entropy(h, w, y, softcap=shape.softcap, reduction="none")


_LIGER_FLCE_REASON = _needs("liger_kernel", "liger-kernel", True, "Liger's fused linear cross-entropy")
_CCE_REASON = _needs("cut_cross_entropy", "cut-cross-entropy", True, "Cut Cross-Entropy's cce implementation")

LINEAR = [
    Provider("dpo_fast-triton", "linear", _lin_dpo_fast("triton"), _dpo_fast_triton_reason,
             "dpo_fast.linear_logprobs(impl='triton')"),
    Provider("dpo_fast-torch", "linear", _lin_dpo_fast("torch"), note="dpo_fast.linear_logprobs(impl='torch'): "
             "blockwise PyTorch, never allocates [N, V]"),
    Provider("oracle", "linear", _lin_dpo_fast("reference"),
             note="naive PyTorch: full [N, V] logits, float32 log_softmax, gather (dpo_fast.reference)"),
    Provider("torch.compile(oracle)", "linear", _lin_compile,
             note="torch.compile (default settings) of the naive path; compilation is in the warm-up, not the numbers"),
    Provider("trl-chunked", "linear", lambda shape: functools.partial(_trl_linear_logprobs, softcap=shape.softcap),
             _trl_reason, "trl.kernels.ChunkedLogProbFunction with TRL's chunk width and no optional outputs; "
             "on CPU its tiles are folded with torch ops (its Triton fold runs on CUDA only)"),
    Provider("liger-flce", "linear", _lin_liger, _LIGER_FLCE_REASON,
             "LigerFusedLinearCrossEntropyLoss(reduction='none'), negated; with reduction='none' (liger-kernel "
             "0.8.5) it defers the gradient to its backward, which re-runs the chunked forward with the per-token "
             "upstream gradient"),
    Provider("cce", "linear", _lin_cce, _CCE_REASON,
             "cut_cross_entropy.linear_cross_entropy(reduction='none'), negated; default filter_eps='high' skips "
             "gradient blocks below the dtype's precision (less backward work than the others)"),
]


# --- logits_logprobs: f(logits [N, V], labels [N]) -> float32 log-probs [N]

def _logits_trl(shape):
    from trl.trainer.utils import selective_log_softmax

    return selective_log_softmax


def _logits_liger(shape):
    from liger_kernel.transformers import LigerCrossEntropyLoss

    loss = LigerCrossEntropyLoss(reduction="none")
    return lambda z, y: -loss(z, y)


LOGITS = [
    Provider("dpo_fast-triton", "logits", lambda s: functools.partial(dpo_fast.logits_logprobs, impl="triton"),
             _dpo_fast_triton_reason, "dpo_fast.logits_logprobs(impl='triton')"),
    Provider("dpo_fast-torch", "logits", lambda s: functools.partial(dpo_fast.logits_logprobs, impl="torch"),
             note="dpo_fast.logits_logprobs(impl='torch'), row-blocked"),
    Provider("oracle", "logits", lambda s: functools.partial(dpo_fast.logits_logprobs, impl="reference"),
             note="naive PyTorch: float32 log_softmax over the full logits, then gather"),
    Provider("torch.compile(oracle)", "logits", lambda s: compiled(("logits",), R.reference_logits_logprobs),
             note="torch.compile (default settings) of the naive path"),
    Provider("trl-selective_log_softmax", "logits", _logits_trl, _needs("trl", "trl"),
             "trl.trainer.utils.selective_log_softmax (TRL's logits -> label log-prob function): on CUDA with "
             "Triton it runs TRL's fused kernel, elsewhere its torch fallback (a per-row logsumexp loop)"),
    Provider("liger-ce", "logits", _logits_liger, _needs("liger_kernel", "liger-kernel", True,
                                                          "Liger's cross-entropy"),
             "LigerCrossEntropyLoss(reduction='none'), negated; it computes the gradient in its forward and "
             "writes it over the logits buffer"),
]


# --- fused DPO loss step: f(hc [B,T,H], yc [B,T], hr, yr, weight, ref_c [B], ref_r [B]) -> scalar loss

BETA = 0.1


def _step_dpo_fast(impl):
    def build(shape):
        def step(hc, yc, hr, yr, w, rc, rr):
            return dpo_fast.fused_linear_dpo_loss(hc, yc, hr, yr, w, None, rc, rr, beta=BETA, loss_type="sigmoid",
                                                  softcap=shape.softcap, impl=impl).loss
        return step
    return build


def _naive_step(hc, yc, hr, yr, w, rc, rr, softcap=None):
    pc = R.reference_linear_logprobs(hc, w, yc, softcap=softcap).sum(-1)
    pr = R.reference_linear_logprobs(hr, w, yr, softcap=softcap).sum(-1)
    return R.reference_dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type="sigmoid")[0]


def _step_compile(shape):
    return compiled(("dpo_step", shape.softcap), functools.partial(_naive_step, softcap=shape.softcap))


def _segment_step(token_logps_fn):
    """Per-token log-probs of the completion rows (compacted as TRL's patched forward does),
    scattered back, summed per sequence, then TRL's sigmoid DPO loss."""
    def step(hc, yc, hr, yr, w, rc, rr):
        hidden = torch.cat([hc, hr])
        labels = torch.cat([yc, yr])
        mask = labels != -100
        lp = token_logps_fn(hidden[mask], w, labels[mask])
        sums = lp.new_zeros(mask.shape).masked_scatter(mask, lp).sum(-1)
        b = hc.shape[0]
        logits = BETA * ((sums[:b] - rc) - (sums[b:] - rr))
        return -F.logsigmoid(logits).mean()
    return step


def _step_from_linear(build_linear):
    return lambda shape: _segment_step(build_linear(shape))


def _step_liger(shape):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    loss = LigerFusedLinearDPOLoss(beta=BETA, loss_type="sigmoid", use_ref_model=False, compute_nll_loss=False,
                                   compiled=not SMOKE)

    def step(hc, yc, hr, yr, w, rc, rr):
        return loss(w, torch.cat([hc, hr]), torch.cat([yc, yr]))[0]
    return step


def _no_softcap(shape):
    return "no softcap option in LigerFusedLinearDPOLoss" if shape.softcap else None


def _liger_dpo_reason(device):
    if not _has("liger_kernel"):
        return "liger-kernel is not installed (pip install liger-kernel)"
    return None


DPO_STEP = [
    Provider("dpo_fast-triton", "dpo_step", _step_dpo_fast("triton"), _dpo_fast_triton_reason,
             "dpo_fast.fused_linear_dpo_loss(impl='triton')"),
    Provider("dpo_fast-torch", "dpo_step", _step_dpo_fast("torch"),
             note="dpo_fast.fused_linear_dpo_loss(impl='torch')"),
    Provider("oracle", "dpo_step", lambda s: functools.partial(_naive_step, softcap=s.softcap),
             note="naive PyTorch: full logits per side, log_softmax, gather, sums, reference sigmoid loss"),
    Provider("torch.compile(oracle)", "dpo_step", _step_compile, note="torch.compile (default settings) of the oracle"),
    Provider("trl-chunked", "dpo_step", _step_from_linear(lambda s: functools.partial(_trl_linear_logprobs,
                                                                                        softcap=s.softcap)),
             _trl_reason, "trl.kernels.ChunkedLogProbFunction on the completion rows, sequence sums and the sigmoid "
             "DPO loss in plain torch (TRL has no standalone fused DPO loss)"),
    Provider("liger-dpo", "dpo_step", _step_liger, _liger_dpo_reason,
             "LigerFusedLinearDPOLoss(use_ref_model=False, compute_nll_loss=False), compiled=True as shipped: it "
             "cannot take cached reference log-probs, so it runs reference-free (same policy work, a different loss "
             "value); it materialises the logits of one pair at a time", checks_against_oracle=False,
             shape_skip=_no_softcap),
    Provider("liger-flce", "dpo_step", _step_from_linear(_lin_liger), _LIGER_FLCE_REASON,
             "LigerFusedLinearCrossEntropyLoss(reduction='none') for the token log-probs, then sums and the loss"),
    Provider("cce", "dpo_step", _step_from_linear(_lin_cce), _CCE_REASON,
             "cut_cross_entropy.linear_cross_entropy(reduction='none') for the token log-probs, then sums and the "
             "loss"),
]


# --- epilogue

def _dpo_loss_lib(pc, pr, rc, rr):
    return dpo_fast.dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type="sigmoid").loss


def _dpo_loss_ref(pc, pr, rc, rr):
    return R.reference_dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type="sigmoid")[0]


EPILOGUE_LOSS = [
    Provider("dpo_fast", "epilogue", lambda s: _dpo_loss_lib, note="dpo_fast.dpo_loss(...).loss (validates inputs: "
             "one host sync)"),
    Provider("oracle", "epilogue", lambda s: _dpo_loss_ref, note="dpo_fast.reference.reference_dpo_loss"),
    Provider("torch.compile(oracle)", "epilogue", lambda s: compiled(("dpo_loss",), _dpo_loss_ref),
             note="torch.compile (default settings) of the oracle"),
]

EPILOGUE_SEGMENT = [
    Provider("dpo_fast", "epilogue", lambda s: dpo_fast.sequence_logps, note="dpo_fast.sequence_logps"),
    Provider("oracle", "epilogue", lambda s: R.reference_sequence_logps,
             note="dpo_fast.reference.reference_sequence_logps"),
    Provider("torch.compile(oracle)", "epilogue", lambda s: compiled(("segment",), R.reference_sequence_logps),
             note="torch.compile (default settings) of the oracle"),
]

PROVIDERS = {"linear": LINEAR, "logits": LOGITS, "dpo_step": DPO_STEP, "epilogue_loss": EPILOGUE_LOSS,
             "epilogue_segment": EPILOGUE_SEGMENT}


# ---------------------------------------------------------------------------------------
# pytest hooks
# ---------------------------------------------------------------------------------------

def pytest_addoption(parser):
    group = parser.getgroup("dpo_fast benchmarks")
    group.addoption("--bench-size", default=os.environ.get("DPO_FAST_BENCH_SIZE", "cpu"), choices=sorted(SIZES),
                    help="cpu (default): heads scaled down by 16, float32, <= 1k tokens; "
                         "gpu: real model heads, bfloat16, 1k-32k tokens")
    group.addoption("--bench-providers", default=None,
                    help="comma-separated provider names to run (default: all)")
    group.addoption("--bench-rounds", type=int, default=None, help="timed rounds per benchmark (cpu 5, gpu 20)")
    group.addoption("--bench-threads", type=int, default=None,
                    help="torch.set_num_threads(N) for the CPU runs (default: torch's own choice). On a machine shared "
                         "with other jobs, 1 avoids OpenMP threads waiting on each other for whole time slices")


def pytest_configure(config):
    global SMOKE
    SMOKE = _smoke(config)
    # transformers/trl imports trip a torch.jit deprecation warning; not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
    config.addinivalue_line("filterwarnings", "ignore:`gradient_checkpointing` is deprecated:FutureWarning")
    config.addinivalue_line("filterwarnings", "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
    config.addinivalue_line("markers", "bench(kind, providers): a dpo_fast benchmark over shapes of `kind` and the "
                                       "provider list `providers`")


def _smoke(config) -> bool:
    """--benchmark-disable runs each test once: keep the smallest shape only."""
    return bool(config.getoption("benchmark_disable", False))


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("bench")
    if marker is None:
        return
    kind, family = marker.args
    size = metafunc.config.getoption("bench_size")
    shapes = shapes_for(kind, size)
    if _smoke(metafunc.config):
        shapes = shapes[:1]
    providers = PROVIDERS[family]
    wanted = metafunc.config.getoption("bench_providers")
    if wanted:
        names = {p.strip() for p in wanted.split(",")}
        providers = [p for p in providers if p.name in names]
    if "shape" in metafunc.fixturenames:
        metafunc.parametrize("shape", shapes, ids=[s.id for s in shapes])
    metafunc.parametrize("provider", providers, ids=[p.name for p in providers])


# ---------------------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------------------

ROTATION_BYTES = 256 << 20  # rotate at least this much input so no set stays in a cache
MAX_ROTATION_SETS = 8


def rotation_sets(set_bytes: int) -> int:
    """How many copies of the inputs to cycle through between rounds (2..8)."""
    return max(2, min(MAX_ROTATION_SETS, math.ceil(ROTATION_BYTES / max(set_bytes, 1))))


@dataclass
class Harness:
    device: torch.device
    dtype: torch.dtype
    size: str
    rounds: int
    warmup: int
    enabled: bool
    ceilings: dict = field(default_factory=dict)

    def generator(self, seed=0):
        return torch.Generator(device="cpu").manual_seed(seed)

    def randn(self, *shape, gen, scale=1.0, dtype=None):
        return (torch.randn(*shape, generator=gen) * scale).to(self.device, dtype or self.dtype)

    def labels(self, n, vocab, gen, shape=None):
        return torch.randint(0, vocab, shape or (n,), generator=gen).to(self.device)

    def ceiling(self, n, h, v):
        key = (min(n, 8192), h, v, self.dtype)
        if key not in self.ceilings:
            self.ceilings[key] = B.matmul_ceiling(n, h, v, self.dtype, self.device, rounds=10)
        return self.ceilings[key]

    def linear_sets(self, shape, requires_grad=True):
        """Rotation sets ``[(hidden [N, H], weight [V, H], labels [N])]``; the weight is shared
        between sets when it is larger than 128 MiB (no cache holds it anyway)."""
        gen = self.generator(shape.tokens * 31 + shape.vocab)
        el = torch.empty((), dtype=self.dtype).element_size()
        w_bytes = shape.vocab * shape.hidden * el
        h_bytes = shape.tokens * (shape.hidden * el + 8)
        share_w = w_bytes > (128 << 20)
        k = rotation_sets(h_bytes + (0 if share_w else w_bytes))
        w_scale = 2.0 / math.sqrt(shape.hidden)  # logits of std ~2, as a trained head gives
        shared = self.randn(shape.vocab, shape.hidden, gen=gen, scale=w_scale) if share_w else None
        sets = []
        for _ in range(k):
            w = shared if share_w else self.randn(shape.vocab, shape.hidden, gen=gen, scale=w_scale)
            h = self.randn(shape.tokens, shape.hidden, gen=gen)
            sets.append((h.requires_grad_(requires_grad), w.requires_grad_(requires_grad),
                         self.labels(shape.tokens, shape.vocab, gen)))
        return sets


    def check_linear(self, fn, hidden, weight, labels, softcap):
        """Max abs error of ``fn`` on the first rows against the float64 oracle; fails the test
        when it exceeds the dtype's tolerance (a wrong provider's timings mean nothing)."""
        m = min(CHECK_ROWS, hidden.shape[0])
        with torch.no_grad():
            got = fn(hidden[:m].detach(), weight.detach(), labels[:m]).double()
            want = R.reference_linear_logprobs(hidden[:m].detach().double(), weight.detach().double(), labels[:m],
                                               softcap=softcap)
        return self.check_error(float((got - want).abs().max()))

    def rotation(self, set_bytes: int) -> int:
        return rotation_sets(set_bytes)

    def check_error(self, err: float) -> float:
        """Fail the test when a provider's max abs error against the float64 oracle exceeds
        the dtype's tolerance: a wrong provider's timings mean nothing."""
        tol = check_tolerance(self.dtype)
        if not err <= tol:
            pytest.fail(f"output differs from the float64 oracle by {err:.3g} > {tol:g}")
        return err

    def skip_if_unavailable(self, provider, shape, request):
        request.node.user_properties.append(("provider", provider.name))
        reason = provider.skip_reason(self.device) if provider.skip_reason else None
        if reason is None and provider.shape_skip is not None:
            reason = provider.shape_skip(shape)
        if reason:
            pytest.skip(f"{provider.name}: {reason}")

    def run(self, benchmark, *, bench, provider, shape, target, setup, flops=None, check=None, matmul=None,
            extra=None):
        """Time ``target(*setup())`` with pytest-benchmark and record everything in extra_info.

        ``setup`` (untimed) returns the arguments of one round (the next input set in the
        rotation, gradients cleared); the device is synchronised after it and after each
        timed call. ``check`` (optional) returns the max abs error against the oracle.
        ``matmul`` = (N, H, V) for the ceiling. Afterwards one more call measures peak memory.
        """
        dev = self.device

        def timed(*args):
            out = target(*args)
            B.synchronize(dev)
            return out

        def synced_setup():
            args = setup()
            B.synchronize(dev)
            return args, {}

        info = benchmark.extra_info
        info.update(bench=bench, provider=provider.name, note=provider.note, shape=shape.name, model=shape.model,
                    tokens=shape.tokens, hidden=shape.hidden or None, vocab=shape.vocab or None,
                    softcap=shape.softcap, dtype=str(self.dtype).replace("torch.", ""), device=str(dev),
                    device_name=B.device_name(dev), size=self.size, series=list(shape.series), flops=flops,
                    rounds=self.rounds, warmup_rounds=self.warmup, torch_threads=torch.get_num_threads())
        if extra:
            info.update(extra)
        benchmark.group = f"{bench} {shape.id}"
        try:
            if check is not None:
                err = check()
                info["max_abs_err_vs_oracle"] = err
            benchmark.pedantic(timed, setup=synced_setup, rounds=self.rounds, warmup_rounds=self.warmup,
                               iterations=1)
            if not self.enabled:
                return
            peak, method = B.peak_memory(functools.partial(timed, *synced_setup()[0]), dev)
        except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - GPU only
            torch.cuda.empty_cache()
            pytest.skip(f"{provider.name}: out of memory at {shape.id}: {str(e).splitlines()[0]}")
        info["peak_bytes"] = peak
        info["peak_method"] = method
        median = benchmark.stats.stats.median if benchmark.stats else None
        if flops and median:
            info["tflops"] = flops / median / 1e12
        if matmul is not None:
            c = self.ceiling(*matmul)
            info["ceiling"] = c
            info["ceiling_tflops"] = c["tflops"]
            if info.get("tflops"):
                info["pct_of_ceiling"] = 100.0 * info["tflops"] / c["tflops"]


@pytest.fixture(scope="session")
def harness(request):
    config = request.config
    size = config.getoption("bench_size")
    cfg = SIZES[size]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if size == "gpu" and device.type != "cuda":
        pytest.skip("--bench-size=gpu needs a CUDA device; none here (the default cpu size runs anywhere)")
    threads = config.getoption("bench_threads")
    if threads:
        torch.set_num_threads(threads)
    rounds = config.getoption("bench_rounds") or cfg["rounds"]
    torch.manual_seed(0)
    return Harness(device=device, dtype=cfg["dtype"], size=size, rounds=rounds, warmup=cfg["warmup"],
                   enabled=not _smoke(config))


@pytest.fixture(scope="session")
def size_cfg(request):
    return SIZES[request.config.getoption("bench_size")]


def check_tolerance(dtype) -> float:
    """Max abs error on log-probs accepted before a provider's timings are recorded."""
    return 2e-3 if dtype in (torch.float32, torch.float64) else 0.15


CHECK_ROWS = 256

