"""Non-tensor options shared by every implementation of the fused log-prob ops.

They travel in one frozen dataclass so that autograd functions save a single object and
``backward`` returns a handful of ``None`` rather than one per option, and so that the
Triton launchers and the PyTorch blockwise path see exactly the same configuration.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

# Per-token outputs that can be requested besides the label log-probability. None of them
# carries a gradient. Ignored positions hold 0 (False for is_top1).
#   entropy            H(p) = lse - sum_j p_j z_j
#   log_sum_sq_probs   log sum_j p_j^2 = logsumexp(2 z) - 2 lse   (WPO weighting)
#   mean_logits        mean over the vocabulary of the transformed logit z
#   is_top1            the label is the argmax of z (first maximum wins ties)
EXTRA_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
OUTPUT_NAMES = ("log_probs",) + EXTRA_OUTPUTS


@dataclass(frozen=True)
class LogprobOptions:
    """How logits are formed from ``h @ W.T + b`` and which outputs are produced.

    The transformed logit of vocabulary entry j is
    ``z_j = c * tanh(s_j / c) / T`` with ``s = (h @ W.T + b) * logit_scale``, where the tanh
    softcap ``c`` is skipped when ``softcap`` is None and ``T`` is ``temperature``.
    """

    ignore_index: int = -100
    logit_scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0
    outputs: tuple[str, ...] = ("log_probs",)
    deterministic: bool = False

    def __post_init__(self):
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        if not isinstance(self.deterministic, bool):
            raise TypeError(f"deterministic must be a bool, got {type(self.deterministic).__name__}")
        for name in ("logit_scale", "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.softcap is not None and (
            isinstance(self.softcap, bool) or not isinstance(self.softcap, (int, float)) or not math.isfinite(self.softcap) or self.softcap <= 0
        ):
            raise ValueError(f"softcap must be None or a finite number > 0, got {self.softcap!r}")
        outputs = (self.outputs,) if isinstance(self.outputs, str) else tuple(self.outputs)
        if not outputs:
            raise ValueError(f"outputs must name at least one of {OUTPUT_NAMES}")
        unknown = [o for o in outputs if o not in OUTPUT_NAMES]
        if unknown:
            raise ValueError(f"outputs has unknown names {unknown}; expected a subset of {OUTPUT_NAMES}")
        if len(set(outputs)) != len(outputs):
            raise ValueError(f"outputs has repeated names: {outputs}")
        object.__setattr__(self, "outputs", outputs)

    @property
    def extras(self) -> tuple[str, ...]:
        """The requested outputs other than ``log_probs``, in canonical order."""
        return tuple(name for name in EXTRA_OUTPUTS if name in self.outputs)


# ----------------------------------------------------------------------------- loss options

# loss type -> (needs completion lengths, label_smoothing range as (low, high, low_open, high_open) or None).
# Every loss entry point (dpo_loss, fused_linear_dpo_loss, FusedLinearDPOLoss, the oracle
# reference_dpo_loss, TrainerConfig, FusedDPOTrainer) validates its options with
# check_loss_options below, before any tensor work.
LOSS_TYPES = {
    "sigmoid": (False, (0.0, 0.5, False, False)),
    "hinge": (False, None),
    "ipo": (True, None),
    "exo_pair": (False, (0.0, 1.0, True, True)),
    "nca_pair": (False, None),
    "robust": (False, (0.0, 0.5, False, True)),
    "bco_pair": (False, None),
    "sppo_hard": (False, None),
    "aot": (False, (0.0, 0.5, False, False)),
    "aot_unpaired": (False, (0.0, 0.5, False, False)),
    "apo_zero": (False, None),
    "apo_down": (False, None),
    "discopop": (False, None),
    "sft": (True, None),
    "sigmoid_norm": (True, None),
    "simpo": (True, (0.0, 0.5, False, False)),
}


def check_real(name: str, value, *, low=None, high=None, low_open=False, high_open=False, context="") -> float:
    """``float(value)`` for a finite real number (not a bool) in the given range, else an error naming ``name``."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # a 0-d tensor / numpy scalar
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    fmt = lambda x: f"{x:g}" if float(x).is_integer() else repr(x)  # noqa: E731
    if low is not None and high is None:
        want = f"a finite number {'>' if low_open else '>='} {fmt(low)}"
    elif high is not None and low is None:
        want = f"a finite number {'<' if high_open else '<='} {fmt(high)}"
    elif high is not None:
        want = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    else:
        want = "a finite number"
    bad_low = low is not None and (value < low or (low_open and value == low))
    bad_high = high is not None and (value > high or (high_open and value == high))
    if not math.isfinite(value) or bad_low or bad_high:
        raise ValueError(f"{name} must be {want}{context}, got {value!r}")
    return value


def check_loss_options(loss_type="sigmoid", loss_weights=None, beta=0.1, label_smoothing=0.0, simpo_gamma=0.5,
                       discopop_tau=0.05, *, has_reference=None) -> tuple[list[str], list[float]]:
    """Validate the preference-loss options; return ``(loss type names, one float weight per name)``.

    The one check behind every loss entry point, run before any tensor work. Every float is
    checked with ``math.isfinite`` and its range (NaN and inf are errors naming the argument):
    ``beta > 0``; ``label_smoothing`` in ``[0, 1)`` and in the range each listed loss type
    allows; ``simpo_gamma`` finite; ``discopop_tau > 0``; ``loss_weights`` one finite weight
    ``>= 0`` per loss type. ``loss_type`` is a name or a non-empty list of names from
    ``LOSS_TYPES``; ``simpo`` is reference-free and stands alone. ``has_reference``: whether
    reference log-probs are given (None: not known yet).
    """
    check_real("beta", beta, low=0.0, low_open=True)
    if isinstance(loss_type, str):
        types = [loss_type]
    elif isinstance(loss_type, (list, tuple)):
        types = list(loss_type)
    else:
        raise TypeError(f"loss_type must be a loss type name or a list of names from {sorted(LOSS_TYPES)}, "
                        f"got {type(loss_type).__name__} {loss_type!r}")
    if not types:
        raise ValueError("loss_type must name at least one loss type, got an empty list")
    for kind in types:
        if not isinstance(kind, str):
            raise TypeError(f"loss_type entries must be strings, got {type(kind).__name__} {kind!r}")
        if kind not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {kind!r}; expected one of {sorted(LOSS_TYPES)}")
    if "simpo" in types and len(types) > 1:
        raise ValueError(f"loss_type 'simpo' is reference-free and cannot be combined with other loss types, got {types}")
    if "simpo" in types and has_reference:
        raise ValueError("loss_type 'simpo' is reference-free: pass ref_chosen_logps=None and ref_rejected_logps=None")
    eps = check_real("label_smoothing", label_smoothing, low=0.0, high=1.0, high_open=True)
    for kind in types:
        rng = LOSS_TYPES[kind][1]
        if rng is not None:
            low, high, low_open, high_open = rng
            check_real("label_smoothing", eps, low=low, high=high, low_open=low_open, high_open=high_open,
                       context=f" for loss_type {kind!r}")
    check_real("simpo_gamma", simpo_gamma)
    check_real("discopop_tau", discopop_tau, low=0.0, low_open=True)
    if loss_weights is None:
        weights = [1.0] * len(types)
    else:
        if isinstance(loss_weights, (str, bytes)) or not hasattr(loss_weights, "__len__"):
            raise TypeError(f"loss_weights must be None or a list of numbers, got {type(loss_weights).__name__}")
        if len(loss_weights) != len(types):
            raise ValueError(f"loss_weights must have one weight per loss type ({len(types)}: {types}), "
                             f"got {len(loss_weights)}")
        weights = [check_real(f"loss_weights[{i}]", w, low=0.0) for i, w in enumerate(loss_weights)]
    return types, weights
