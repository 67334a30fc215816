"""Benchmark harness and the ``dpo-fast bench`` command.

Three parts:

* **Measurement primitives** used by the pytest-benchmark suites in ``benchmarks/``:
  device synchronisation, peak memory of one call beyond what already exists (CUDA
  ``max_memory_allocated`` after ``reset_peak_memory_stats``; on CPU the resident-set
  high-water mark ``VmHWM`` reset through ``/proc/self/clear_refs``), and the device's own
  matmul ceiling measured in the same run.
* **The runner**: ``dpo-fast bench`` runs a suite with ``pytest.main(..., --benchmark-json)``,
  shows progress, and writes a results folder (JSON, environment, markdown table, PNG plots,
  README snippet).
* **The report**: the markdown table (provider x shape: median time, TFLOP/s, % of the
  matmul ceiling, peak memory, time relative to the best peer) and
  ``dpo-fast bench --compare A.json B.json`` which prints regressions.

Every number in a results folder comes from the pytest-benchmark JSON; nothing is typed in.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

# ---------------------------------------------------------------------------------------
# Measurement primitives
# ---------------------------------------------------------------------------------------

def synchronize(device) -> None:
    """Wait for every queued kernel on ``device`` (a no-op on CPU)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(fn, device):
    """Run ``fn()`` once; return ``(peak bytes allocated beyond what existed before, method)``.

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats`` minus
    ``memory_allocated`` at the start. CPU (Linux): ``VmHWM`` after resetting it to the
    current RSS, minus that RSS (see :mod:`dpo_fast.memory`), after ``malloc_trim``. Whatever ``fn`` returns is
    kept alive until the measurement ends, so outputs and gradients count. Returns
    ``(None, reason)`` where neither is available.
    """
    import torch

    from .memory import measure_peak, rss_peak_supported

    device = torch.device(device)
    if device.type == "cpu" and not rss_peak_supported():
        return None, "no /proc/self/clear_refs here: peak RSS cannot be reset"
    result, peak, _ = measure_peak(fn, device)
    del result
    if peak is None:
        return None, f"peak memory not measured on {device.type}"
    if device.type == "cuda":
        return max(int(peak), 0), "cuda.max_memory_allocated - memory_allocated"
    return max(int(peak), 0), "VmHWM - VmRSS (/proc/self/clear_refs reset)"


def time_call(fn, device, rounds: int = 5, warmup: int = 1) -> list[float]:
    """Seconds per call of ``fn()``, synchronising ``device`` before and after each one."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(rounds):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def matmul_ceiling(n: int, h: int, v: int, dtype, device, rounds: int = 10, max_n: int = 8192) -> dict:
    """TFLOP/s of ``torch.matmul([n, h], [h, v])`` in ``dtype`` on ``device``: the ceiling
    the lm_head matmuls of the fused ops are measured against. A ceiling is the best the
    device does, so this is the fastest of ``rounds`` (the median is recorded too).

    ``n`` is capped at ``max_n`` tokens so that the ``[n, v]`` product stays small; the
    rate of a matmul that size is already at its plateau.
    """
    import torch

    n = min(n, max_n)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, h, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(h, v, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(n, v, device=device, dtype=dtype)
    times = time_call(lambda: torch.matmul(a, b, out=out), device, rounds=rounds, warmup=2)
    best, median = min(times), statistics.median(times)
    return {"shape": [n, h, v], "dtype": str(dtype).replace("torch.", ""), "best_s": best, "median_s": median,
            "rounds": rounds, "tflops": 2.0 * n * h * v / best / 1e12,
            "tflops_median": 2.0 * n * h * v / median / 1e12}


def device_name(device) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if match:
            name = match.group(1).strip()
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical cores, torch threads={torch.get_num_threads()})"


def device_slug(device) -> str:
    """Short folder-name form of the device: ``cpu`` or e.g. ``nvidia-h100-80gb-hbm3``."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def _version(module: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def environment(device) -> dict:
    """Device, library versions and date, recorded next to every results folder."""
    import torch

    env = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
    }
    for pkg in ("dpo_fast", "triton", "transformers", "trl", "liger-kernel", "cut-cross-entropy",
                "pytest-benchmark"):
        env[pkg] = _version(pkg)
    return env


# ---------------------------------------------------------------------------------------
# Reading results
# ---------------------------------------------------------------------------------------

BENCH_TITLES = {
    "linear_logprobs.fwd": "linear_logprobs: forward",
    "linear_logprobs.bwd": "linear_logprobs: backward",
    "linear_logprobs.fwd_bwd": "linear_logprobs: forward + backward",
    "logits_logprobs.fwd_bwd": "logits_logprobs: forward + backward",
    "epilogue.dpo_loss": "loss epilogue: dpo_loss on [B] log-probs (forward + backward)",
    "epilogue.segment_sum": "loss epilogue: per-sequence segment sums (forward + backward)",
    "dpo_step.fwd_bwd": "fused DPO loss step: chosen + rejected, cached reference log-probs (forward + backward)",
    "train_step": "end-to-end DPO training step on a small HF model",
    "packing_step": "DPO step with shared prompts and packing (log-normal lengths, demo's small model)",
}
PACKING_FIELDS = ("trunk_tokens_per_pair", "real_tokens_per_pair", "first_step_loss", "pairs", "steps_per_round")


def load_rows(path_or_data) -> list[dict]:
    """One dict per benchmark of a pytest-benchmark JSON written by the suites."""
    data = path_or_data
    if not isinstance(data, dict):
        with open(path_or_data, encoding="utf-8") as f:
            data = json.load(f)
    rows = []
    for b in data.get("benchmarks", []):
        info = dict(b.get("extra_info") or {})
        stats = b.get("stats") or {}
        median = stats.get("median")
        row = {
            "name": b.get("fullname") or b.get("name"),
            "bench": info.get("bench", b.get("group") or "?"),
            "provider": info.get("provider", b.get("name")),
            "shape": info.get("shape", ""),
            "tokens": info.get("tokens"),
            "hidden": info.get("hidden"),
            "vocab": info.get("vocab"),
            "dtype": info.get("dtype"),
            "median_s": median,
            "rounds": stats.get("rounds"),
            "flops": info.get("flops"),
            "ceiling_tflops": info.get("ceiling_tflops"),
            "peak_bytes": info.get("peak_bytes"),
            "series": info.get("series") or [],
            "note": info.get("note", ""),
            **{k: info[k] for k in PACKING_FIELDS if k in info},
        }
        if row["flops"] and median:
            row["tflops"] = row["flops"] / median / 1e12
        else:
            row["tflops"] = info.get("tflops")
        if row["tflops"] and row["ceiling_tflops"]:
            row["pct_ceiling"] = 100.0 * row["tflops"] / row["ceiling_tflops"]
        else:
            row["pct_ceiling"] = None
        rows.append(row)
    return rows


def is_dpo_fast(provider: str) -> bool:
    """dpo_fast's own rows (``dpo_fast-*``) and peers patched by it (``trl+dpo_fast``)."""
    return str(provider).startswith("dpo_fast") or str(provider).endswith("+dpo_fast")


def _key(row) -> tuple:
    return (row["bench"], row["shape"], row["tokens"], row["hidden"], row["vocab"], row["dtype"])


def add_peer_ratios(rows: list[dict]) -> list[dict]:
    """Set ``vs_best_peer`` = median time / the fastest non-dpo_fast provider's on the same
    bench and shape (< 1: faster than every peer). None when the shape has no peer."""
    best: dict[tuple, float] = {}
    for r in rows:
        if r["median_s"] and not is_dpo_fast(r["provider"]):
            k = _key(r)
            best[k] = min(best.get(k, math.inf), r["median_s"])
    for r in rows:
        peer = best.get(_key(r))
        r["vs_best_peer"] = (r["median_s"] / peer) if (peer and r["median_s"]) else None
    return rows


# ---------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------

def fmt_time(seconds) -> str:
    if seconds is None:
        return "—"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def fmt_bytes(n) -> str:
    if n is None:
        return "—"
    mib = n / 2**20
    if mib >= 1024:
        return f"{mib / 1024:.2f} GiB"
    if mib >= 10:
        return f"{mib:.0f} MiB"
    return f"{mib:.1f} MiB"


def _fmt(value, spec, suffix="") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def markdown_table(rows: list[dict], skips: list[dict] | None = None) -> str:
    """One markdown table per bench: rows are (shape, provider), fastest first."""
    rows = add_peer_ratios([dict(r) for r in rows])
    order = list(BENCH_TITLES)
    benches = sorted({r["bench"] for r in rows}, key=lambda b: (order.index(b) if b in order else len(order), b))
    out = []
    for bench in benches:
        out.append(f"### {BENCH_TITLES.get(bench, bench)}\n")
        if bench == "packing_step":
            out += packing_table([r for r in rows if r["bench"] == bench])
            continue
        out.append("| shape | tokens | H × V | dtype | provider | median | TFLOP/s | % of matmul ceiling "
                   "| peak memory | time ÷ best peer |")
        out.append("|---|---:|---|---|---|---:|---:|---:|---:|---:|")
        these = [r for r in rows if r["bench"] == bench]
        these.sort(key=lambda r: (str(r["shape"]), r["tokens"] or 0, r["vocab"] or 0, r["median_s"] or math.inf))
        for r in these:
            hv = f"{r['hidden']} × {r['vocab']}" if r["hidden"] else "—"
            provider = f"**{r['provider']}**" if is_dpo_fast(r["provider"]) else r["provider"]
            out.append(
                f"| {r['shape']} | {r['tokens'] if r['tokens'] is not None else '—'} | {hv} | {r['dtype'] or '—'} "
                f"| {provider} | {fmt_time(r['median_s'])} | {_fmt(r['tflops'], '.3f')} "
                f"| {_fmt(r['pct_ceiling'], '.0f', '%')} | {fmt_bytes(r['peak_bytes'])} "
                f"| {_fmt(r['vs_best_peer'], '.2f', '×')} |"
            )
        out.append("")
    if skips:
        out.append("### Skipped providers\n")
        out.append("| provider / test | reason |")
        out.append("|---|---|")
        seen = set()
        for s in skips:
            key = (s.get("provider") or s["nodeid"], s["reason"])
            if key in seen:
                continue
            seen.add(key)
            out.append(f"| {key[0]} | {s['reason'].replace('|', '/')} |")
        out.append("")
    return "\n".join(out)


def packing_table(rows: list[dict]) -> list[str]:
    """Lines of the shared-prompt/packing table: trunk tokens per pair, step time (a round's
    median over its ``steps_per_round`` steps) and the speed-up against ``dpo_fast-padded``,
    peak memory and the first-step loss (same batch)."""
    base = {r["shape"]: r for r in rows if r["provider"] == "dpo_fast-padded"}
    out = ["| provider | trunk tokens / pair | real tokens / pair | median step | pairs / s | step throughput vs "
           "dpo_fast-padded | trunk tokens vs dpo_fast-padded | peak memory | first-step loss |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (str(r["shape"]), r["median_s"] or math.inf)):
        b = base.get(r["shape"])
        speed = b["median_s"] / r["median_s"] if b and b["median_s"] and r["median_s"] else None
        tokens = (r.get("trunk_tokens_per_pair") / b["trunk_tokens_per_pair"] - 1) * 100 \
            if b and b.get("trunk_tokens_per_pair") and r.get("trunk_tokens_per_pair") else None
        rate = r["pairs"] / r["median_s"] if r.get("pairs") and r["median_s"] else None
        step = r["median_s"] / r.get("steps_per_round", 1) if r["median_s"] else None
        provider = f"**{r['provider']}**" if is_dpo_fast(r["provider"]) else r["provider"]
        out.append(f"| {provider} | {_fmt(r.get('trunk_tokens_per_pair'), '.0f')} "
                   f"| {_fmt(r.get('real_tokens_per_pair'), '.0f')} | {fmt_time(step)} | {_fmt(rate, '.2f')} "
                   f"| {_fmt(speed, '.2f', '×')} | {_fmt(tokens, '+.0f', '%')} | {fmt_bytes(r['peak_bytes'])} "
                   f"| {_fmt(r.get('first_step_loss'), '.7f')} |")
    out.append("")
    return out


def environment_markdown(env: dict, ceilings: dict | None = None) -> str:
    lines = ["| | |", "|---|---|"]
    for k in ("date", "device", "platform", "python", "torch", "cuda", "triton", "dpo_fast", "transformers", "trl",
              "liger-kernel", "cut-cross-entropy", "pytest-benchmark", "command", "torch_threads", "load_average_start",
              "load_average_end"):
        if env.get(k) is not None:
            lines.append(f"| {k} | {env[k]} |")
    if ceilings:
        for name, c in sorted(ceilings.items()):
            lines.append(f"| matmul ceiling {name} | {c['tflops']:.3f} TFLOP/s (torch.matmul {c['shape']}, "
                         f"{c['dtype']}, best of {c.get('rounds', '?')}) |")
    return "\n".join(lines)


def readme_snippet(rows: list[dict], env: dict, folder: str) -> str:
    """The performance section the project README pastes, generated from a results folder."""
    rows = add_peer_ratios([dict(r) for r in rows])
    is_cpu = env.get("device_type") == "cpu"
    head = [
        "## Performance",
        "",
        f"Measured by `dpo-fast bench` on **{env.get('device')}**, {env.get('date', '')[:10]}; "
        f"torch {env.get('torch')}, triton {env.get('triton')}, dpo_fast {env.get('dpo_fast')}. "
        f"Full tables, plots and the raw JSON: [`{folder}`]({folder}).",
        "",
    ]
    if is_cpu:
        head += [
            "> **These are CPU figures** (scaled-down heads, float32, no Triton: the dpo_fast rows are the "
            "blockwise PyTorch path). They show memory behaviour and relative overheads, not GPU speed. "
            "**GPU figures are still to be measured**: run `dpo-fast bench --size gpu` on a CUDA machine.",
            "",
        ]
        load = env.get("load_average_start")
        head += [f"CPU run with torch threads = {env.get('torch_threads')}"
                 + (f"; load average {load[0]:.1f} at the start (a shared machine: small differences are noise)"
                    if load else "") + ".", ""]
    main = [r for r in rows if r["bench"] == "linear_logprobs.fwd_bwd"]
    if main:
        head += ["`linear_logprobs` forward + backward (lm_head + log-softmax + label gather):", ""]
        head += ["| shape | tokens | H × V | provider | median | peak memory | time ÷ best peer |",
                 "|---|---:|---|---|---:|---:|---:|"]
        main.sort(key=lambda r: (str(r["shape"]), r["tokens"] or 0, r["median_s"] or math.inf))
        for r in main:
            provider = f"**{r['provider']}**" if is_dpo_fast(r["provider"]) else r["provider"]
            head.append(f"| {r['shape']} | {r['tokens']} | {r['hidden']} × {r['vocab']} | {provider} "
                        f"| {fmt_time(r['median_s'])} | {fmt_bytes(r['peak_bytes'])} "
                        f"| {_fmt(r['vs_best_peer'], '.2f', '×')} |")
        head.append("")
    step = [r for r in rows if r["bench"] == "dpo_step.fwd_bwd"]
    if step:
        head += ["Fused DPO loss step (chosen + rejected, cached reference log-probs, forward + backward):", ""]
        head += ["| shape | tokens | provider | median | peak memory | time ÷ best peer |",
                 "|---|---:|---|---:|---:|---:|"]
        step.sort(key=lambda r: (str(r["shape"]), r["tokens"] or 0, r["median_s"] or math.inf))
        for r in step:
            provider = f"**{r['provider']}**" if is_dpo_fast(r["provider"]) else r["provider"]
            head.append(f"| {r['shape']} | {r['tokens']} | {provider} | {fmt_time(r['median_s'])} "
                        f"| {fmt_bytes(r['peak_bytes'])} | {_fmt(r['vs_best_peer'], '.2f', '×')} |")
        head.append("")
    packing = [r for r in rows if r["bench"] == "packing_step"]
    if packing:
        head += [f"{BENCH_TITLES['packing_step']}; one optimizer step each, same pairs, same first-step loss:", ""]
        head += packing_table(packing)
    head.append("Peak memory is what one call allocates beyond its inputs; \"time ÷ best peer\" below 1 means faster "
                "than every other provider measured on that shape.")
    return "\n".join(head) + "\n"


# ---------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------

def make_plots(rows: list[dict], out_dir) -> list[str]:
    """``time_vs_tokens.png`` and ``memory_vs_vocab.png`` from the forward+backward rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    written = []
    main = [r for r in rows if r["bench"] == "linear_logprobs.fwd_bwd" and r["median_s"]]
    specs = [
        ("tokens", "time_vs_tokens.png", "tokens", "median time (ms)", lambda r: r["median_s"] * 1e3,
         "linear_logprobs forward+backward: time vs tokens"),
        ("vocab", "memory_vs_vocab.png", "vocab", "peak memory beyond inputs (MiB)",
         lambda r: None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20,
         "linear_logprobs forward+backward: peak memory vs vocabulary"),
    ]
    for series, fname, xkey, ylabel, yfn, title in specs:
        sel = [r for r in main if series in r["series"]]
        if not sel:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for provider in sorted({r["provider"] for r in sel}):
            pts = sorted((r[xkey], yfn(r)) for r in sel if r["provider"] == provider and yfn(r) is not None)
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", linewidth=2.5 if is_dpo_fast(provider) else 1.5, label=provider)
        shapes = sorted({str(r["shape"]) for r in sel})
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xkey if xkey != "vocab" else "vocabulary size V")
        ax.set_ylabel(ylabel)
        ax.set_title(title + f"\n({', '.join(shapes)}; {sel[0]['dtype']})", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        written.append(fname)
    return written


# ---------------------------------------------------------------------------------------
# Compare
# ---------------------------------------------------------------------------------------

def compare(a, b, threshold: float = 0.10, min_memory_bytes: int = 1 << 20) -> tuple[list[str], list[dict]]:
    """Match the benchmarks of two JSONs; a regression is a median time (or peak memory)
    more than ``threshold`` above the old one (memory: and more than ``min_memory_bytes``).

    Returns ``(report lines, regressions)``; each regression is a dict with ``name``,
    ``metric``, ``old``, ``new``, ``ratio``.
    """
    old = {r["name"]: r for r in load_rows(a)}
    new = {r["name"]: r for r in load_rows(b)}
    lines = [f"{'benchmark':<80} {'old':>10} {'new':>10} {'new/old':>8}"]
    regressions = []
    for name in sorted(set(old) & set(new)):
        o, n = old[name], new[name]
        flag = ""
        if o["median_s"] and n["median_s"]:
            ratio = n["median_s"] / o["median_s"]
            if ratio > 1 + threshold:
                regressions.append({"name": name, "metric": "time", "old": o["median_s"], "new": n["median_s"],
                                    "ratio": ratio})
                flag = "  REGRESSION (time)"
            lines.append(f"{name[-80:]:<80} {fmt_time(o['median_s']):>10} {fmt_time(n['median_s']):>10} "
                         f"{ratio:>7.2f}x{flag}")
        if o["peak_bytes"] is not None and n["peak_bytes"] is not None:
            grew = n["peak_bytes"] - o["peak_bytes"]
            if grew > min_memory_bytes and n["peak_bytes"] > (1 + threshold) * o["peak_bytes"]:
                ratio = n["peak_bytes"] / max(o["peak_bytes"], 1)
                regressions.append({"name": name, "metric": "memory", "old": o["peak_bytes"],
                                    "new": n["peak_bytes"], "ratio": ratio})
                lines.append(f"{'':<80} {fmt_bytes(o['peak_bytes']):>10} {fmt_bytes(n['peak_bytes']):>10} "
                             f"{ratio:>7.2f}x  REGRESSION (memory)")
    only_old, only_new = sorted(set(old) - set(new)), sorted(set(new) - set(old))
    if only_old:
        lines.append(f"{len(only_old)} benchmark(s) only in the old file, e.g. {only_old[0]}")
    if only_new:
        lines.append(f"{len(only_new)} benchmark(s) only in the new file, e.g. {only_new[0]}")
    lines.append(f"{len(regressions)} regression(s) above {threshold:.0%}" if regressions
                 else f"no regression above {threshold:.0%} in {len(set(old) & set(new))} common benchmark(s)")
    return lines, regressions


# ---------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------

SUITES = {
    "all": None,
    "linear": "test_linear_logprobs.py",
    "logits": "test_logits_logprobs.py",
    "epilogue": "test_epilogue.py",
    "dpo": "test_dpo_step.py",
    "train": "test_train_step.py",
    "packing": "test_packing_step.py",
}


def find_suite_dir(explicit=None) -> Path:
    """The ``benchmarks/`` folder: explicit, else ./benchmarks, else next to the package."""
    candidates = [Path(explicit)] if explicit else [Path.cwd() / "benchmarks",
                                                    Path(__file__).resolve().parents[1] / "benchmarks"]
    for c in candidates:
        if (c / "conftest.py").is_file():
            return c.resolve()
    raise SystemExit(f"no benchmarks/ folder with a conftest.py found (looked in {', '.join(map(str, candidates))}); "
                     "run from a dpo_fast checkout or pass --suite-dir")


class _Progress:
    """pytest plugin: one line per benchmark as it finishes, and the skip reasons."""

    def __init__(self, stream=None):
        if stream is None:
            # a duplicate of the real stderr, taken before pytest starts capturing fd 2
            stream = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1, encoding="utf-8")
        self.stream, self.total, self.done, self.skips, self.failures = stream, 0, 0, [], []
        self.t0 = time.perf_counter()

    def pytest_collection_finish(self, session):
        self.total = len(session.items)
        print(f"dpo-fast bench: {self.total} benchmark(s) collected", file=self.stream, flush=True)

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and not report.passed):
            self.done += 1
            status = report.outcome
            reason = ""
            if report.skipped:
                longrepr = report.longrepr
                reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
                reason = reason.removeprefix("Skipped: ")
                provider = dict(getattr(report, "user_properties", None) or []).get("provider")
                self.skips.append({"nodeid": report.nodeid, "provider": provider, "reason": reason})
            elif report.failed:
                self.failures.append(report.nodeid)
            elapsed = time.perf_counter() - self.t0
            tail = f": {reason}" if reason else ""
            print(f"[{self.done:>3}/{self.total}] {elapsed:6.0f}s {status:<7} {report.nodeid}{tail}",
                  file=self.stream, flush=True)


def run_suite(suite: str = "all", size: str = "cpu", out_dir=None, suite_dir=None, pytest_args=(),
              results_root=None) -> Path:
    """Run a suite with pytest-benchmark and write the results folder; returns its path."""
    import pytest
    import torch

    suite_dir = find_suite_dir(suite_dir)
    if suite not in SUITES:
        raise SystemExit(f"unknown suite {suite!r}; expected one of {sorted(SUITES)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    date = _dt.date.today().isoformat()
    if out_dir is None:
        root = Path(results_root) if results_root else suite_dir / "results"
        out_dir = root / f"{device_slug(device)}-{date}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    target = str(suite_dir) if SUITES[suite] is None else str(suite_dir / SUITES[suite])
    args = [target, f"--bench-size={size}", f"--benchmark-json={json_path}", "-p", "no:cacheprovider", "-q",
            "--no-header", "-p", "no:randomly", f"--rootdir={suite_dir}", *pytest_args]
    progress = _Progress()
    print(f"dpo-fast bench: suite={suite} size={size} device={device_name(device)} -> {out_dir}",
          file=sys.stderr, flush=True)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load_start and load_start[0] > (os.cpu_count() or 1):
        print(f"dpo-fast bench: warning: load average {load_start[0]:.1f} on {os.cpu_count()} cores; other jobs will "
              "distort the timings (on CPU, --threads 1 suffers least)", file=sys.stderr, flush=True)
    rc = pytest.main(args, plugins=[progress])
    if not json_path.is_file():
        raise SystemExit(f"pytest exited with {rc} and wrote no {json_path}")
    env = environment(device)
    env["command"] = "dpo-fast bench " + " ".join([f"--suite {suite}", f"--size {size}", *pytest_args])
    env["pytest_exit_code"] = int(rc)
    # other processes on the machine distort timings: record how busy it was
    env["load_average_start"] = load_start
    env["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    env["failures"] = progress.failures
    (out_dir / "skips.json").write_text(json.dumps(progress.skips, indent=1) + "\n", encoding="utf-8")
    write_report(out_dir, env=env)
    print(f"dpo-fast bench: wrote {out_dir}", file=sys.stderr, flush=True)
    if rc not in (0, 5):
        print(f"dpo-fast bench: pytest exited with {rc}; failures: {progress.failures}", file=sys.stderr)
    return out_dir


def write_report(out_dir, env: dict | None = None) -> None:
    """(Re)write table.md, README-snippet.md, environment.json and the plots of a folder
    from its results.json (and skips.json when present)."""
    out_dir = Path(out_dir)
    with open(out_dir / "results.json", encoding="utf-8") as f:
        data = json.load(f)
    env_path = out_dir / "environment.json"
    if env is None:
        env = json.loads(env_path.read_text(encoding="utf-8")) if env_path.is_file() else {}
    ceilings = {}
    for b in data.get("benchmarks", []):
        info = b.get("extra_info") or {}
        if info.get("ceiling"):
            c = info["ceiling"]
            ceilings[f"{c['dtype']} {c['shape'][0]}×{c['shape'][1]}×{c['shape'][2]}"] = c
    env["matmul_ceilings"] = ceilings
    env_path.write_text(json.dumps(env, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    skips_path = out_dir / "skips.json"
    skips = json.loads(skips_path.read_text(encoding="utf-8")) if skips_path.is_file() else []
    rows = load_rows(data)
    plots = make_plots(rows, out_dir)
    is_cpu = env.get("device_type") == "cpu"
    parts = [f"# dpo_fast benchmark results: {env.get('device', '?')}", ""]
    if is_cpu:
        parts += ["**CPU figures.** Scaled-down heads in float32; no Triton on CPU, so `dpo_fast-torch` is the "
                  "blockwise PyTorch path and GPU-only peers are skipped. GPU figures are still to be measured.", ""]
    load = env.get("load_average_start")
    if is_cpu and load and load[0] > (os.cpu_count() or 1):
        parts += [f"**Shared machine**: load average {load[0]:.1f} at the start of the run (other jobs running); "
                  f"torch threads = {env.get('torch_threads')}. Treat small differences as noise.", ""]
    parts += ["Generated by `dpo-fast bench` from `results.json`; do not edit by hand.", "",
              environment_markdown(env, ceilings), "",
              "Columns: median of the timed rounds (device synchronised around each call); effective TFLOP/s "
              "from 8·N·H·V (forward+backward), 2·N·H·V (forward) or 6·N·H·V (backward) for every provider; "
              "% of "
              "the torch.matmul ceiling (best of 10 rounds of the same shape, same run); peak memory one call "
              "allocates beyond its inputs; time ÷ the fastest non-dpo_fast provider on the same shape.", "",
              "A provider that keeps the logits (or a chunk of them) for its backward does 6·N·H·V of matmul work, "
              "not 8·N·H·V, so its effective forward+backward rate can exceed the matmul ceiling. On a shared "
              "CPU the ceiling and the providers are also measured at different moments.", ""]
    parts.append(markdown_table(rows, skips))
    parts += [f"![{p.removesuffix('.png').replace('_', ' ')}]({p})" for p in plots]
    (out_dir / "table.md").write_text("\n".join(parts) + "\n", encoding="utf-8")
    try:
        rel = out_dir.resolve().relative_to(find_suite_dir().parent)
    except (ValueError, SystemExit):
        rel = out_dir
    (out_dir / "README-snippet.md").write_text(readme_snippet(rows, env, str(rel)), encoding="utf-8")


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--suite", default="all", choices=sorted(SUITES), help="which suite to run (default: all)")
    parser.add_argument("--size", default="cpu", choices=("cpu", "gpu"),
                        help="cpu: small scaled-down shapes (minutes on 2 cores); gpu: real model heads, 1k-32k tokens")
    parser.add_argument("--out", default=None, help="results folder (default: benchmarks/results/<device>-<date>)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads on CPU (default: torch's choice); 1 gives steadier numbers on a "
                             "shared machine")
    parser.add_argument("--suite-dir", default=None, help="the benchmarks/ folder (default: ./benchmarks)")
    parser.add_argument("--compare", nargs=2, metavar=("OLD.json", "NEW.json"),
                        help="print regressions of NEW against OLD and exit (1 when any)")
    parser.add_argument("--threshold", type=float, default=0.10, help="regression threshold for --compare (0.10)")
    parser.add_argument("--report-only", metavar="FOLDER", help="rewrite table/plots of an existing results folder")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER,
                        help="after --: extra pytest arguments, e.g. -- -k fwd_bwd --bench-providers=dpo_fast-torch")
    return parser


def run_from_args(args) -> int:
    if args.compare:
        lines, regressions = compare(args.compare[0], args.compare[1], threshold=args.threshold)
        print("\n".join(lines))
        return 1 if regressions else 0
    if args.report_only:
        write_report(args.report_only)
        print(f"rewrote the report in {args.report_only}")
        return 0
    extra = [a for a in (args.pytest_args or []) if a != "--"]
    if args.threads:
        extra = [f"--bench-threads={args.threads}", *extra]
    out = run_suite(args.suite, args.size, args.out, args.suite_dir, extra)
    print((out / "table.md").read_text(encoding="utf-8"))
    return 0


def register(subparsers) -> None:
    """Add ``dpo-fast bench`` to the ``dpo-fast`` command line (see :mod:`dpo_fast.cli`)."""
    parser = subparsers.add_parser(
        "bench", help="run the benchmark suites and write a results folder (or --compare two JSONs)",
        description="Run the pytest-benchmark suites in benchmarks/ and write a results folder: results.json, "
                    "table.md, README-snippet.md, environment.json and PNG plots. Extra pytest arguments go after --.")
    add_arguments(parser)
    parser.set_defaults(func=run_from_args)


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="dpo-fast bench", description=__doc__.split("\n")[0]))
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
