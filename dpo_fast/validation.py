"""Input checks shared by every public entry point.

Each check runs before any compute and raises an error that names the argument and says
what was expected. Checks that need the tensor values (label ranges) cost one reduction
and one host sync; they are what stands between a bad label and a silently wrong loss.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_dtensor(t) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (a sharded or replicated distributed tensor)."""
    if not isinstance(t, torch.Tensor) or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def check_float(name: str, t, *, dim: int | None = None, min_dim: int | None = None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimension(s), got shape {tuple(t.shape)}")
    if min_dim is not None and t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(t.shape)}")


def check_labels(name: str, labels, shape, n_vocab: int, ignore_index: int):
    """Integer labels of the given shape, each in ``[0, n_vocab)`` or equal to ignore_index."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (e.g. torch.long), got {labels.dtype}")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} to match the hidden/logits rows, got {tuple(labels.shape)}")
    bad = ((labels < 0) | (labels >= n_vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        first = labels[bad].flatten()[0].item()
        raise ValueError(
            f"{name} must hold token ids in [0, {n_vocab}) or ignore_index={ignore_index}; "
            f"found {int(bad.sum())} outside, e.g. {first}"
        )


def check_same_device(**tensors):
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {', '.join(f'{k}: {v}' for k, v in devices.items())}")


def check_same_dtype(**tensors):
    dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"dtypes must agree, got {', '.join(f'{k}: {v}' for k, v in dtypes.items())}")


def check_linear_inputs(hidden, weight, labels, bias, ignore_index: int, *, hidden_name="hidden", labels_name="labels"):
    """Shapes, dtypes, devices and label range for ``hidden [..., H]``, ``weight [V, H]``, ``bias [V]``."""
    check_float(hidden_name, hidden, min_dim=1)
    check_float("weight", weight, dim=2)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape [V, H] with H = {hidden_name}.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if bias is not None:
        check_float("bias", bias, dim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    check_same_device(**{hidden_name: hidden, "weight": weight, "bias": bias, labels_name: labels})
    check_same_dtype(**{hidden_name: hidden, "weight": weight, "bias": bias})
    check_labels(labels_name, labels, hidden.shape[:-1], weight.shape[0], ignore_index)
