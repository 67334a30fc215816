"""Peak host-memory measurement for CPU runs (Linux).

``/proc/self/status`` reports the resident-set high-water mark ``VmHWM``; writing ``5`` to
``/proc/self/clear_refs`` resets it to the current RSS. The peak extra memory of a call is
then ``VmHWM`` after the call minus ``VmRSS`` before it. On CUDA use
``torch.cuda.max_memory_allocated`` instead.
"""
from __future__ import annotations

import ctypes
import gc
import re
import time

_FIELDS = re.compile(r"^(VmHWM|VmRSS):\s+(\d+)\s+kB", re.M)


def _status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {k: int(v) * 1024 for k, v in _FIELDS.findall(f.read())}


def rss_peak_supported() -> bool:
    try:
        reset_peak_rss()
        return "VmHWM" in _status()
    except OSError:
        return False


def reset_peak_rss() -> int:
    """Reset the high-water mark to the current RSS; return the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status()["VmRSS"]


def peak_rss_extra(fn, *args, **kwargs):
    """Run ``fn`` and return ``(result, peak RSS above the RSS at the start, in bytes)``."""
    base = reset_peak_rss()
    result = fn(*args, **kwargs)
    return result, _status()["VmHWM"] - base


def trim_host_heap() -> None:
    """Give the heap's free pages back to the kernel (glibc ``malloc_trim``).

    Without it, blocks freed by earlier calls stay resident and a call that reuses them
    shows no RSS growth. After a trim, any reuse faults the pages in again and counts in
    ``VmHWM`` (checked by tests/test_bench.py: a call allocating 3 x 16 MiB reads 48 MiB).
    The allocator's settings are left alone: forcing mmap for large blocks would make
    every call pay page faults (measured 1000x slower on small ops here).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def measure_peak(fn, device):
    """Run ``fn()`` once; return ``(result, peak extra bytes or None, seconds)``.

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats`` minus
    ``memory_allocated`` at the start, with the device synchronised around the call. CPU
    (Linux): :func:`peak_rss_extra` after ``gc.collect()`` and :func:`trim_host_heap`.
    The peak is None where neither is available.
    """
    import torch

    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - base, time.perf_counter() - start
    if device.type == "cpu" and rss_peak_supported():
        trim_host_heap()
        start = time.perf_counter()
        result, peak = peak_rss_extra(fn)
        return result, peak, time.perf_counter() - start
    start = time.perf_counter()
    result = fn()
    return result, None, time.perf_counter() - start
