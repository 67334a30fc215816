"""Everything to run the day a CUDA GPU is available, into one results folder.

    python benchmarks/gpu_day.py [--out DIR] [--skip-bench] [--skip-compile]

writes ``benchmarks/results/<device>-<date>/`` (the folder ``dpo-fast bench`` uses):

* ``env.txt``            torch / triton / CUDA versions, ``nvidia-smi`` output
* ``pytest-gpu.txt``     ``pytest -m gpu tests`` (the compiled kernels at headline shapes,
  TF32 accuracy) and ``pytest-gpu.xml`` (JUnit)
* ``pytest-kernels.txt`` ``tests/test_triton_kernels.py`` compiled on the GPU (the same
  oracle comparisons CI runs under the interpreter)
* ``compile-sm90.txt`` / ``compile-sm90.json``  ``python -m dpo_fast.kernels.compile_check --full``
* ``results.json``, table and plots from ``dpo-fast bench --size gpu``
* ``summary.txt``        exit code and wall time of each step

Each step runs in its own process; a failing step is recorded and the next one still runs.
The exit code is non-zero if any step failed.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(name, cmd, out_dir, log, env=None):
    t0 = time.time()
    print(f"[gpu_day] {name}: {' '.join(cmd)}", flush=True)
    with open(out_dir / log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    line = f"{name:16s} rc={rc} {time.time() - t0:8.1f} s  -> {log}"
    print(f"[gpu_day] {line}", flush=True)
    return rc, line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="results folder (default: benchmarks/results/<device>-<date>)")
    p.add_argument("--skip-bench", action="store_true", help="no dpo-fast bench --size gpu (it takes the longest)")
    p.add_argument("--skip-compile", action="store_true", help="no sm_90 compile sweep")
    a = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_day: no CUDA device visible (torch.cuda.is_available() is False)")
    from dpo_fast.bench import device_slug

    out_dir = Path(a.out) if a.out else (ROOT / "benchmarks" / "results"
                                         / f"{device_slug('cuda')}-{_dt.date.today().isoformat()}")
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "env.txt", "w") as f:
        import triton
        f.write(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
                f"python {sys.version.split()[0]}\n{torch.cuda.get_device_name(0)}, "
                f"{torch.cuda.get_device_properties(0).multi_processor_count} SMs\n\n")
        f.flush()
        subprocess.run(["nvidia-smi"], stdout=f, stderr=subprocess.STDOUT, check=False)

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels
    steps = [
        ("pytest -m gpu", [sys.executable, "-m", "pytest", "-m", "gpu", "tests", "-q", "-rs",
                           f"--junitxml={out_dir / 'pytest-gpu.xml'}"], "pytest-gpu.txt"),
        ("kernel tests", [sys.executable, "-m", "pytest", "tests/test_triton_kernels.py", "-q", "-s"],
         "pytest-kernels.txt"),
    ]
    if not a.skip_compile:
        steps.append(("compile sm_90", [sys.executable, "-m", "dpo_fast.kernels.compile_check", "--full",
                                        "--json", str(out_dir / "compile-sm90.json"), "--jobs", "8"],
                      "compile-sm90.txt"))
    if not a.skip_bench:
        steps.append(("dpo-fast bench", [sys.executable, "-m", "dpo_fast", "bench", "--size", "gpu",
                                         "--out", str(out_dir)], "bench.txt"))
    lines, failed = [], False
    for name, cmd, log in steps:
        rc, line = _run(name, cmd, out_dir, log, env)
        lines.append(line)
        failed |= rc != 0
    (out_dir / "summary.txt").write_text("\n".join(lines) + "\n")
    print(f"[gpu_day] results in {out_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
