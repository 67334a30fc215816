"""Peak host-memory measurement for CPU runs (Linux).

``/proc/self/status`` reports the resident-set high-water mark ``VmHWM``; writing ``5`` to
``/proc/self/clear_refs`` resets it to the current RSS. The peak extra memory of a call is
then ``VmHWM`` after the call minus ``VmRSS`` before it. On CUDA use
``torch.cuda.max_memory_allocated`` instead.
"""
from __future__ import annotations

import re

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
