"""Non-tensor options shared by every implementation of the fused log-prob ops.

They travel in one frozen dataclass so that autograd functions save a single object and
``backward`` returns a handful of ``None`` rather than one per option, and so that the
Triton launchers and the PyTorch blockwise path see exactly the same configuration.
"""
from __future__ import annotations

import math
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
        if not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        for name in ("logit_scale", "temperature"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.softcap is not None and (
            not isinstance(self.softcap, (int, float)) or not math.isfinite(self.softcap) or self.softcap <= 0
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
