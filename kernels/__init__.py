"""Triton kernels behind ``impl="triton"`` (installed as ``dpo_fast.kernels``).

:mod:`dpo_fast.ops` calls the four launchers below, which have the same signatures as
their PyTorch counterparts in :mod:`dpo_fast.blockwise`:

* ``linear_logprobs_fwd(hidden, weight, labels, bias, opts, *, num_sms=None) -> (log_probs, lse, extras)``
  (``num_sms``: the SM count the grid is sized for, default the device's)
* ``linear_logprobs_bwd(grad, hidden, weight, labels, bias, lse, opts, needs_input_grad)``
  ``-> (grad_hidden, grad_weight, grad_bias)``
* ``logits_logprobs_fwd(logits, labels, opts) -> (log_probs, lse)``
* ``logits_logprobs_bwd(grad, logits, labels, lse, opts) -> grad_logits``

The algorithms, byte counts and block choices are described in
:mod:`.linear_logprobs` and :mod:`.logits_logprobs`; the interpreter workarounds in
:mod:`._common`; what the kernels compile to for sm_90 is checked by :mod:`.compile_check`. Supported dtypes: float32, bfloat16, float16 (float64 raises; ``impl="auto"``
sends float64 to the PyTorch path).

Loss epilogue (why there is no fused DPO-loss kernel). After the fused log-prob op, the
remaining DPO work is a masked segment sum of the per-token log-probs per sequence (over
the N valid tokens, a few tens of KiB of fp32) and an elementwise sigmoid loss over B
sequence pairs (B is 8-128 in practice), plus their backward (a broadcast of B scalars back
to the tokens). In PyTorch that is a handful of small kernels, each reading at most O(N)
bytes, i.e. launch-latency bound at a few microseconds each, while the fused
linear-log-softmax it follows performs 2*N*H*V FLOPs forward and 6*N*H*V backward
(~5e16 FLOPs at N=16384, H=4096, V=128256: tens of milliseconds on any current GPU). A fused
epilogue kernel could save at most those few launches, well under 1% of the step, so the
PyTorch version (``dpo_fast.losses`` / ``dpo_fast.ops.sequence_logps``) is kept. This is an
argument from operation counts: it was NOT measured on a GPU (none was available when it
was written); a GPU benchmark of the epilogue against the fused op would settle it.
"""
from .linear_logprobs import linear_logprobs_bwd, linear_logprobs_fwd
from .logits_logprobs import logits_logprobs_bwd, logits_logprobs_fwd

__all__ = ["linear_logprobs_fwd", "linear_logprobs_bwd", "logits_logprobs_fwd", "logits_logprobs_bwd"]
