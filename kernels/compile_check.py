"""GPU readiness without a GPU: compile what the launchers launch for sm_90 and read the cubins.

``triton.compile`` with a CUDA :class:`GPUTarget` runs on a CPU-only machine (ptxas and
cuobjdump ship inside the triton wheel). This module

1. runs the real launchers of :mod:`.linear_logprobs` and :mod:`.logits_logprobs` on
   ``meta`` tensors of headline shapes (:data:`VOCABS`) with ``_launch`` replaced by a recorder, so every
   recorded launch has exactly the arguments, constexpr flags and pointer/stride alignment
   that a GPU run would specialize on (pointers are taken as 16-byte aligned plus their
   storage offset, as CUDA allocations are);
2. compiles each recorded launch with every config the launcher could pick for it (the
   autotune list and the deterministic ``FIXED_CONFIGS`` entry) for ``GPUTarget("cuda", 90,
   128)``;
3. reads from the result: dynamic shared memory (``metadata.shared``), registers and local
   memory (``cuobjdump -res-usage``), and in the SASS the spill instructions (``STL`` /
   ``LDL``), the Hopper tensor-core instructions (``HGMMA``) and the asynchronous copies
   (``LDGSTS``). A spill is *in the main loop* when it lies inside an innermost loop (a
   backward branch's range holding no other loop) that issues global loads or HGMMA: for
   the matmul kernels that is the K loop, for the logits kernels the vocabulary sweep.

Must run without ``TRITON_INTERPRET`` (the interpreter prunes the config lists and upcasts
dots). ``python -m dpo_fast.kernels.compile_check [--full] [--json PATH]`` prints the table;
``tests/test_gpu_readiness.py`` runs the CI sample in a subprocess and asserts on it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

SMEM_LIMIT = 227 * 1024  # H100: max dynamic shared memory per block (bytes)
TARGET = ("cuda", 90, 32)  # backend, compute capability 9.0 (H100), warp size
HEADLINE = dict(n=2048, h=4096)
# name -> (tokens, vocabulary). At 2048 tokens the backward's scratch holds 16384-column
# chunks (only the last one is odd); at 512 tokens an odd vocabulary is one chunk, so the
# scratch row itself has the odd width (what the 128-element padding is for).
VOCABS = {"aligned": (2048, 128256), "odd": (2048, 50257), "odd-1chunk": (512, 50257)}


class _FakePtr:
    """What triton's specializer reads from a tensor argument: dtype and data_ptr."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._ptr = (1 << 20) + t.storage_offset() * t.element_size()

    def data_ptr(self):
        return self._ptr


@dataclass
class Launch:
    kernel_name: str
    jit: object        # the innermost JITFunction
    args: dict         # runtime arguments by name (tensors replaced by _FakePtr)
    constexprs: dict   # explicit and heuristic constexprs (no block sizes)
    configs: list      # candidate triton.Config objects (autotune list + fixed)
    fixed: object      # the deterministic config


@dataclass
class Result:
    kernel: str
    dtype: str
    flags: str
    vocab: str
    config: str
    fixed: bool
    regs: int = 0
    shared: int = 0
    local_bytes: int = 0
    spills: int = 0          # STL + LDL instructions
    spills_in_loop: int = 0  # ... inside an innermost main loop
    hgmma: int = 0
    ldgsts: int = 0
    ldgsts_narrow: int = 0   # asynchronous copies narrower than 16 bytes (misaligned or masked tails)
    ffma_in_loop: int = 0
    wide_global_in_loop: int = 0
    narrow_global_in_loop: int = 0
    needs_mma: bool = False  # a 16-bit or TF32 tl.dot: must become HGMMA
    over_smem: bool = False
    error: str = ""
    seconds: float = 0.0


def _unwrap(kernel):
    """(JITFunction, [Heuristics ...]) from an autotuned/heuristics-wrapped kernel."""
    heur = []
    while not hasattr(kernel, "arg_names") or hasattr(kernel, "values"):
        if hasattr(kernel, "values"):  # triton.runtime.autotuner.Heuristics
            heur.append(kernel.values)
        kernel = kernel.fn
    return kernel, heur


@contextlib.contextmanager
def record_launches():
    """Replace the launchers' ``_launch`` by a recorder; yields the list of Launch records."""
    from . import linear_logprobs as KL
    from . import logits_logprobs as KG

    records = []

    def recorder(tuned, kernel, fixed, grid, deterministic, *args, **constexprs):
        jit, heur = _unwrap(kernel)
        bound = dict(zip(jit.arg_names, args))
        bound = {k: (_FakePtr(v) if isinstance(v, torch.Tensor) else v) for k, v in bound.items()}
        cx = dict(constexprs)
        for values in heur:
            for k, f in values.items():
                cx[k] = f({**bound, **cx})
        configs = [fixed] if deterministic else list(tuned.configs) + [fixed]
        records.append(Launch(jit.__name__, jit, bound, cx, configs, fixed))

    saved = (KL._launch, KG._launch)
    KL._launch = KG._launch = recorder
    try:
        yield records
    finally:
        KL._launch, KG._launch = saved


def _cfg_str(cfg) -> str:
    blocks = ",".join(f"{k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in cfg.kwargs.items())
    return f"{blocks} w{cfg.num_warps} s{cfg.num_stages}"


def _tool(name: str) -> str:
    try:
        import triton.knobs as knobs
        return getattr(knobs.nvidia, name).path
    except Exception:  # pragma: no cover - older layouts
        import triton.backends.nvidia as nv
        return os.path.join(os.path.dirname(nv.__file__), "bin", name)


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def analyze_sass(sass: str) -> dict:
    """Spill/HGMMA/LDGSTS counts, and spills and FFMAs inside innermost main loops."""
    instrs = []
    for m in _SASS_LINE.finditer(sass):
        instrs.append((int(m.group(1), 16), m.group(3), m.group(4)))
    loops = []
    for addr, op, rest in instrs:
        if op.startswith("BRA"):
            t = re.search(r"0x([0-9a-f]+)", rest)
            if t and int(t.group(1), 16) <= addr:
                loops.append((int(t.group(1), 16), addr))
    innermost = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]

    def in_range(lp, pred):
        return [i for i in instrs if lp[0] <= i[0] <= lp[1] and pred(i[1])]

    def is_main(op):
        return op.startswith(("HGMMA", "LDGSTS", "LDG", "UTMALDG"))

    main = [lp for lp in innermost if in_range(lp, is_main)]
    is_spill = lambda op: op.startswith(("STL", "LDL"))  # noqa: E731
    return {
        "spills": sum(1 for i in instrs if is_spill(i[1])),
        "spills_in_loop": sum(len(in_range(lp, is_spill)) for lp in main),
        "hgmma": sum(1 for i in instrs if i[1].startswith("HGMMA")),
        "ldgsts": sum(1 for i in instrs if i[1].startswith("LDGSTS")),
        "ldgsts_narrow": sum(1 for i in instrs if i[1].startswith("LDGSTS") and ".128" not in i[1]),
        "ffma_in_loop": sum(len(in_range(lp, lambda op: op.startswith("FFMA"))) for lp in main),
        # 16-byte and narrower global loads/stores inside the main loops (the logits kernels:
        # with an odd vocabulary the interior tiles must stay 16 bytes wide)
        "wide_global_in_loop": sum(len(in_range(lp, lambda op: op.startswith(("LDG.", "STG."))
                                                and ".128" in op)) for lp in main),
        "narrow_global_in_loop": sum(len(in_range(lp, lambda op: op.startswith(("LDG.", "STG."))
                                                  and ".128" not in op)) for lp in main),
    }


def _res_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", res)
    local = re.search(r"LOCAL:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    return {"regs": int(regs.group(1)) if regs else -1,
            "local_bytes": max(int(local.group(1)) if local else 0, int(stack.group(1)) if stack else 0),
            "sass": sass}


def compile_one(launch: Launch, cfg) -> dict:
    """Compile one launch with one config for sm_90; the raw metrics."""
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
    from triton._C.libtriton import native_specialize_impl

    jit = launch.jit
    constexprs = {**launch.constexprs, **cfg.kwargs}
    sig, attrs = {}, {}
    for i, name in enumerate(jit.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        ty, spec = native_specialize_impl(BaseBackend, launch.args[name], False, True, True)
        sig[name] = ty
        if ty == "constexpr":
            constexprs[name] = spec
        elif spec:
            attrs[(i,)] = BaseBackend.parse_attr(spec)
    src = ASTSource(jit, sig, {k: v for k, v in constexprs.items() if k in jit.arg_names}, attrs)
    k = triton.compile(src, target=GPUTarget(*TARGET),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    out = _res_usage(k.asm["cubin"])
    out.update(analyze_sass(out.pop("sass")))
    out["shared"] = int(k.metadata.shared)
    return out


def _dtype_label(dtype, precision):
    if dtype == torch.float32:
        return "fp32-tf32" if precision != "highest" else "fp32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


# Flag families of each launcher: name -> option kwargs / bias.
LINEAR_FLAGS = {
    "plain": dict(),
    "bias": dict(bias=True),
    "softcap": dict(softcap=30.0),
    "all": dict(bias=True, softcap=30.0, outputs=("log_probs", "entropy", "log_sum_sq_probs", "mean_logits",
                                                  "is_top1")),
    "extras": dict(outputs=("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")),
    "is_top1": dict(outputs=("log_probs", "is_top1")),
}
LOGITS_FLAGS = {"plain": dict()}
DTYPES = [(torch.bfloat16, "highest"), (torch.float16, "highest"), (torch.float32, "highest"),
          (torch.float32, "high")]


def scenario_launches(op, dtype, precision, flags, vocab, deterministic=False, n=None, h=None):
    """Run one launcher scenario on meta tensors; the recorded launches."""
    from dpo_fast.options import LogprobOptions
    from . import linear_logprobs as KL
    from . import logits_logprobs as KG

    n = n or HEADLINE["n"]
    h = h or HEADLINE["h"]
    meta = "meta"
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        with record_launches() as rec:
            if op == "linear":
                kw = dict(LINEAR_FLAGS[flags])
                has_bias = kw.pop("bias", False)
                opts = LogprobOptions(deterministic=deterministic, **kw)
                hid = torch.empty(n, h, dtype=dtype, device=meta)
                w = torch.empty(vocab, h, dtype=dtype, device=meta)
                b = torch.empty(vocab, dtype=dtype, device=meta) if has_bias else None
                lab = torch.empty(n, dtype=torch.int64, device=meta)
                _, lse, _ = KL.linear_logprobs_fwd(hid, w, lab, b, opts)
                g = torch.empty(n, dtype=torch.float32, device=meta)
                KL.linear_logprobs_bwd(g, hid, w, lab, b, lse, opts, (True, True, has_bias))
            else:
                opts = LogprobOptions(deterministic=deterministic, **LOGITS_FLAGS[flags])
                logits = torch.empty(n, vocab, dtype=dtype, device=meta)
                lab = torch.empty(n, dtype=torch.int64, device=meta)
                _, lse = KG.logits_logprobs_fwd(logits, lab, opts)
                KG.logits_logprobs_bwd(torch.empty(n, device=meta), logits, lab, lse, opts)
    finally:
        torch.set_float32_matmul_precision(prev)
    return rec


def _launch_label(launch: Launch) -> str:
    name = launch.kernel_name.strip("_").replace("_kernel", "")
    if name == "grad_matmul":
        name += "[h]" if launch.args.get("stride_ak") == 1 else "[W]"
        if launch.constexprs.get("ACCUMULATE"):
            name += "+acc"
    return name


def _needs_mma(launch: Launch) -> bool:
    prec = launch.constexprs.get("DOT_PRECISION")
    return prec is not None and prec != "ieee"


def plan(full: bool):
    """The (scenario, launch, config) triples to compile, deduplicated by compiled identity."""
    items, seen = [], set()
    for op, flag_sets in (("linear", LINEAR_FLAGS), ("logits", LOGITS_FLAGS)):
        for dtype, precision in DTYPES:
            if op == "logits" and precision != "highest":
                continue
            for flags in flag_sets:
                if not full and op == "linear" and flags not in ("plain", "all"):
                    continue
                for vname, (n, vocab) in VOCABS.items():
                    if not full and vname == "odd-1chunk" and (op != "linear" or flags != "plain"
                                                               or dtype == torch.float16):
                        continue
                    for launch in scenario_launches(op, dtype, precision, flags, vocab, n=n):
                        for cfg in launch.configs:
                            fixed = cfg is launch.fixed
                            if not full and not fixed and not (dtype == torch.bfloat16 and flags == "all"
                                                               and vname == "odd"):
                                continue
                            key = (launch.kernel_name, repr(sorted((k, str(v)) for k, v in launch.constexprs.items())),
                                   repr(sorted((k, _spec_key(v)) for k, v in launch.args.items())), _cfg_str(cfg))
                            if key in seen:
                                continue
                            seen.add(key)
                            items.append((Result(_launch_label(launch), _dtype_label(dtype, precision), flags, vname,
                                                 _cfg_str(cfg), fixed, needs_mma=_needs_mma(launch)), launch, cfg))
    return items


def _spec_key(v):
    from triton.backends.compiler import BaseBackend
    from triton._C.libtriton import native_specialize_impl
    if isinstance(v, (int, _FakePtr)) and not isinstance(v, bool):
        return native_specialize_impl(BaseBackend, v, False, True, True)
    return type(v).__name__ if isinstance(v, float) else repr(v)


def _run_item(item):
    res, launch, cfg = item
    t0 = time.time()
    try:
        res.__dict__.update(compile_one(launch, cfg))
    except Exception as e:  # noqa: BLE001 - reported in the table
        res.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    res.over_smem = res.shared > SMEM_LIMIT or "OutOfResources" in res.error
    res.seconds = round(time.time() - t0, 2)
    return res


_ITEMS: list = []


def _run_index(i):
    return _run_item(_ITEMS[i])


def sweep(full: bool = False, jobs: int = 1):
    """Compile the plan; with ``jobs > 1`` in forked workers (the plan holds JIT functions,
    which do not pickle, so workers receive indices into it)."""
    _ITEMS[:] = plan(full)
    if jobs > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(jobs) as pool:
            return pool.map(_run_index, range(len(_ITEMS)), chunksize=1)
    return [_run_item(i) for i in _ITEMS]


def summarize(results):
    """Rows per (kernel, dtype): variants, spilling, spilling in the main loop, over shared
    memory, and (for 16-bit / TF32 dots) lowered to HGMMA."""
    rows = {}
    for r in results:
        row = rows.setdefault((r.kernel.split("+")[0], r.dtype), dict(variants=0, spilling=0, spills_in_loop=0,
                                                                      over_smem=0, errors=0, mma=0, hgmma=0))
        row["variants"] += 1
        row["spilling"] += r.spills > 0 or r.local_bytes > 0
        row["spills_in_loop"] += r.spills_in_loop > 0
        row["over_smem"] += r.over_smem
        row["errors"] += bool(r.error) and not r.over_smem
        row["mma"] += r.needs_mma
        row["hgmma"] += r.needs_mma and r.hgmma > 0
    return rows


def format_table(results) -> str:
    rows = summarize(results)
    lines = [f"{'kernel':24s} {'dtype':10s} {'variants':>8s} {'spilling':>8s} {'in loop':>8s} {'>smem':>6s} "
             f"{'errors':>6s} {'wgmma':>9s}"]
    tot = dict(variants=0, spilling=0, spills_in_loop=0, over_smem=0, errors=0, mma=0, hgmma=0)
    for (k, d), row in sorted(rows.items()):
        for key in tot:
            tot[key] += row[key]
        lines.append(f"{k:24s} {d:10s} {row['variants']:8d} {row['spilling']:8d} {row['spills_in_loop']:8d} "
                     f"{row['over_smem']:6d} {row['errors']:6d} {row['hgmma']:4d}/{row['mma']:<4d}")
    lines.append(f"{'total':24s} {'':10s} {tot['variants']:8d} {tot['spilling']:8d} {tot['spills_in_loop']:8d} "
                 f"{tot['over_smem']:6d} {tot['errors']:6d} {tot['hgmma']:4d}/{tot['mma']:<4d}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="every config of every flag family (slow)")
    p.add_argument("--json", help="write every compiled variant's metrics here")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--details", action="store_true", help="one line per variant")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("compile_check: unset TRITON_INTERPRET (the interpreter prunes the configs and upcasts dots)")
    import triton
    t0 = time.time()
    results = sweep(a.full, a.jobs)
    if a.details:
        for r in results:
            print(f"{r.kernel:22s} {r.dtype:9s} {r.flags:8s} {r.vocab:7s} {r.config:36s} fixed={int(r.fixed)} "
                  f"regs={r.regs} smem={r.shared // 1024}K local={r.local_bytes} spills={r.spills} "
                  f"in_loop={r.spills_in_loop} hgmma={r.hgmma} ldgsts={r.ldgsts} narrow={r.ldgsts_narrow} "
                  f"wide_ldg_stg_in_loop={r.wide_global_in_loop} {r.error}")
    print(f"triton {triton.__version__}, sm_90, {len(results)} variants, {time.time() - t0:.0f} s")
    print(format_table(results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)


if __name__ == "__main__":
    main()
