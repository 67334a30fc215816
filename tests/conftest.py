import os

# The Triton interpreter must be switched on before any @triton.jit function is defined,
# i.e. before dpo_fast.kernels is imported. On a CUDA machine the kernels compile for real.
if not os.environ.get("TRITON_INTERPRET"):
    try:
        import torch

        _cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        _cuda = False
    if not _cuda:
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    # `slow` tests (e.g. the full architecture sweep) run only when asked for: `-m slow` or
    # DPO_FAST_RUN_SLOW=1; CI runs their faster variants.
    if "slow" not in (config.getoption("-m") or "") and os.environ.get("DPO_FAST_RUN_SLOW") != "1":
        skip_slow = pytest.mark.skip(reason="slow: run with -m slow or DPO_FAST_RUN_SLOW=1")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip_slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is available on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one intra-op thread is faster and immune to a busy 2-core CI box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
