"""GPU readiness checked without a GPU: what the compiler produces for sm_90 (H100).

``dpo_fast.kernels.compile_check`` runs the real launchers on meta tensors of a headline
shape (N=2048 tokens, H=4096, vocabularies 128256 and 50257; and N=512 with 50257, where
the backward's scratch is one odd-width chunk), records every kernel launch
and compiles it for ``GPUTarget("cuda", 90, 32)`` with the installed triton (ptxas ships in
the wheel). The CI sample covers every kernel x dtype class (bf16, fp16, fp32 IEEE, fp32
TF32) x flag family (plain, all flags) x aligned/odd vocabulary with the deterministic
config (the one-chunk odd case: plain flags, bf16/fp32/TF32), plus every autotune candidate
of the heaviest family (bf16, all flags, odd V).
It runs in a subprocess: the compile must not see ``TRITON_INTERPRET`` (set for this test
session by tests/conftest.py), and it caches into a temporary directory, never the repo.
``python -m dpo_fast.kernels.compile_check --full`` (or the ``slow`` test below) compiles
every candidate of every flag family.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def _sweep(tmp_path, *extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default
    out = tmp_path / "variants.json"
    proc = subprocess.run([sys.executable, "-m", "dpo_fast.kernels.compile_check", "--json", str(out),
                           "--jobs", str(min(2, os.cpu_count() or 1)), *extra],
                          env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout)
    return json.loads(out.read_text())


def _check(results):
    assert results, "no variant compiled"
    kernels = {r["kernel"].split("[")[0].split("+")[0] for r in results}
    assert kernels == {"linear_logprobs_fwd", "linear_logprobs_merge", "linear_logprobs_bwd", "grad_matmul",
                       "logits_logprobs_fwd", "logits_logprobs_bwd"}, kernels
    assert {r["dtype"] for r in results} == {"bf16", "fp16", "fp32", "fp32-tf32"}
    assert {r["vocab"] for r in results} == {"aligned", "odd", "odd-1chunk"}

    def where(r):
        return f"{r['kernel']} {r['dtype']} {r['flags']} {r['vocab']} {r['config']}"

    errors = [f"{where(r)}: {r['error']}" for r in results if r["error"]]
    assert not errors, errors
    over = [f"{where(r)}: {r['shared']} B" for r in results if r["over_smem"]]
    assert not over, f"over the 227 KiB shared-memory limit: {over}"
    # 16-bit: nothing spills inside the MMA loop (the K loop; the vocab sweep of the logits kernels).
    in_loop = [where(r) for r in results if r["dtype"] in ("bf16", "fp16") and r["spills_in_loop"]]
    assert not in_loop, f"spills inside the main loop: {in_loop}"
    # The deterministic configs are spill-free for every dtype, kernel and flag family, so
    # every kernel and flag set has at least one spill-free config.
    spilling_fixed = [f"{where(r)}: {r['spills']} spill instructions, {r['local_bytes']} B local"
                      for r in results if r["fixed"] and (r["spills"] or r["local_bytes"])]
    assert not spilling_fixed, spilling_fixed
    # Every 16-bit and TF32 dot becomes wgmma (HGMMA); IEEE fp32 stays on the FMA units.
    no_mma = [where(r) for r in results if r["needs_mma"] and not r["hgmma"]]
    assert not no_mma, f"dots not lowered to wgmma: {no_mma}"
    assert not any(r["hgmma"] for r in results if r["dtype"] == "fp32"), "IEEE fp32 must not use TF32 tensor cores"
    # Pipelined operand loads: every matmul kernel issues cp.async, 16 bytes wide, also
    # for the odd vocabulary (padded scratch rows and chunk widths). Not asserted for TF32:
    # its grad matmuls issue some narrower copies (seen with triton 3.9; TF32 wgmma only
    # takes K-major operands, the likely reason) and the table reports them.
    narrow = [where(r) for r in results if r["kernel"].startswith(("linear", "grad")) and r["dtype"] != "fp32-tf32"
              and "merge" not in r["kernel"] and (not r["ldgsts"] or r["ldgsts_narrow"])]
    assert not narrow, f"matmul operands without 16-byte cp.async: {narrow}"
    # ... and no synchronous global load or store inside their MMA loop (a misaligned operand
    # row, e.g. an odd-width scratch row, turns its cp.async into plain loads).
    sync = [where(r) for r in results if r["kernel"].startswith(("linear", "grad")) and "merge" not in r["kernel"]
            and (r["wide_global_in_loop"] or r["narrow_global_in_loop"])]
    assert not sync, f"synchronous global accesses in the MMA loop: {sync}"
    # The memory-bound logits kernels stream rows with 16-byte loads/stores, also when an odd
    # vocabulary leaves rows misaligned (interior tiles realigned and unmasked).
    scalar = [where(r) for r in results if r["kernel"].startswith("logits") and not r["wide_global_in_loop"]]
    assert not scalar, f"logits kernels without 16-byte global accesses in the row sweep: {scalar}"


def test_sm90_compile_sample(tmp_path):
    _check(_sweep(tmp_path))


@pytest.mark.slow
def test_sm90_compile_full(tmp_path):
    _check(_sweep(tmp_path, "--full"))
