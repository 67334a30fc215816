"""impl="torch" never allocates [N, V]: peak extra host memory of a real-size call.

Runs in a fresh subprocess so that the high-water mark belongs to this measurement alone.
N=4096, V=131072, H=64: the naive float32 logits alone are 2 GiB; the fused call's peak
extra, forward and backward, must stay under 10% of that.
"""
import json
import subprocess
import sys
import textwrap

import pytest

from dpo_fast.memory import rss_peak_supported

NAIVE_LOGITS_BYTES = 4096 * 131072 * 4

PROBE = textwrap.dedent(
    """
    import gc, json, torch
    from dpo_fast import linear_logprobs
    from dpo_fast.memory import peak_rss_extra, trim_host_heap
    torch.manual_seed(0)
    N, V, H = 4096, 131072, 64
    hidden = torch.randn(N, H, requires_grad=True)
    weight = (torch.randn(V, H) * 0.05).requires_grad_()
    labels = torch.randint(0, V, (N,))
    # Warm-up at a small size: thread pools, allocator arenas, lazy imports.
    linear_logprobs(hidden[:64], weight[:4096], labels[:64] % 4096, impl="torch").sum().backward()
    hidden.grad = weight.grad = None
    gc.collect(); trim_host_heap()  # return freed heap pages so the baseline RSS is honest
    out, fwd = peak_rss_extra(linear_logprobs, hidden, weight, labels, impl="torch")
    loss = out.sum()
    gc.collect(); trim_host_heap()
    _, bwd = peak_rss_extra(loss.backward)
    print(json.dumps({"forward": fwd, "backward": bwd, "finite": bool(torch.isfinite(out).all()),
                      "grad_weight_nonzero": bool(weight.grad.abs().sum() > 0)}))
    """
)


@pytest.mark.skipif(not rss_peak_supported(), reason="needs Linux /proc/self/clear_refs to measure peak RSS")
def test_torch_path_peak_memory_under_ten_percent_of_naive_logits():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "2", **__import__("os").environ})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["finite"] and report["grad_weight_nonzero"]
    limit = 0.10 * NAIVE_LOGITS_BYTES
    print(f"peak extra: forward {report['forward'] / 2**20:.1f} MiB, backward {report['backward'] / 2**20:.1f} MiB "
          f"(naive logits alone {NAIVE_LOGITS_BYTES / 2**20:.0f} MiB, limit {limit / 2**20:.0f} MiB)")
    assert 0 < report["forward"] < limit
    assert 0 < report["backward"] < limit


LOGITS_PROBE = textwrap.dedent(
    """
    import gc, json, torch
    from dpo_fast import logits_logprobs
    from dpo_fast.memory import peak_rss_extra, trim_host_heap
    N, V = 4096, 32768
    logits = torch.randn(N, V).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, V, (N,))
    logits_logprobs(logits[:8], labels[:8], impl="torch").sum().backward()
    logits.grad = None
    gc.collect(); trim_host_heap()
    out, fwd = peak_rss_extra(logits_logprobs, logits, labels, impl="torch")
    loss = out.sum()
    gc.collect(); trim_host_heap()
    _, bwd = peak_rss_extra(loss.backward)
    print(json.dumps({"forward": fwd, "backward": bwd, "grad_dtype": str(logits.grad.dtype)}))
    """
)


@pytest.mark.skipif(not rss_peak_supported(), reason="needs Linux /proc/self/clear_refs to measure peak RSS")
def test_logits_path_never_copies_logits_to_float32():
    proc = subprocess.run([sys.executable, "-c", LOGITS_PROBE], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    logits_bytes = 4096 * 32768 * 2  # bf16: the input, and the gradient the backward must return
    print(f"logits path peak extra: forward {report['forward'] / 2**20:.1f} MiB, backward "
          f"{report['backward'] / 2**20:.1f} MiB (bf16 logits {logits_bytes / 2**20:.0f} MiB, fp32 copy would add "
          f"{2 * logits_bytes / 2**20:.0f} MiB)")
    assert report["grad_dtype"] == "torch.bfloat16"
    assert report["forward"] < logits_bytes / 4
    assert report["backward"] < logits_bytes + logits_bytes / 4
