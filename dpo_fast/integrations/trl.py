"""TRL integration: DPOTrainer's log-probs and per-token metric fields from dpo_fast.

TRL 1.15+ computes every log-prob of its DPOTrainer through a "fused LM head" that it
installs on the policy (and reference) model with ``add_fused_lm_head``: called with
``fused_lm_head=True``, the model runs its backbone and returns a ``FusedCausalLMOutput``
(per-token ``log_probs``, ``entropy``, ``log_sum_sq_probs``, ``mean_logits``, ``is_top1``,
``label_mask``, ``loss``, ``aux_loss``) instead of logits. DPOTrainer builds its loss and
every logged metric from those fields.

This module provides a drop-in :func:`add_fused_lm_head` with the same contract that runs
the projection through :func:`dpo_fast.linear_logprobs` (Triton kernels on CUDA, the
blockwise PyTorch path elsewhere), reading the head from
:func:`dpo_fast.integrations.hf.lm_head_spec` (tied embeddings, bias, logit scales, Gemma 2
softcapping). Two ways to use it:

* ``dpo_fast.integrations.trl.patch()``: every ``trl.DPOTrainer`` built afterwards uses it
  (``unpatch()`` undoes it). Nothing else in TRL changes: its loss code, metrics, logging,
  PEFT, ``precompute_ref_log_probs`` all run as before on dpo_fast's numbers.
* :class:`FusedDPOTrainer`, a ``DPOTrainer`` subclass that does the same for itself only and
  can read the reference log-probs from a dpo_fast cache (``ref_logps_cache=``), so that no
  reference model is ever built or held in memory.

The head runs inside the model's own forward (:func:`dpo_fast.integrations.hf.fused_head_logprobs`):
the lm_head module's forward computes the fused log-probs from its input and its own weight, so
FSDP2 (lm_head in the root unit or its own, tied, mixed precision), DeepSpeed ZeRO-2/3 and DDP
unshard or gather it and reduce its gradient exactly as for a plain-logits forward. (TRL 1.16's
own head reads ``weight.full_tensor()`` outside the forward, whose backward keeps each rank's
local, un-averaged gradient.) Difference from TRL's own head, by design: ``entropy`` carries no
gradient (DPOTrainer only logs it).
"""
from __future__ import annotations

import contextlib
import functools
import os
import types

import torch

SUPPORTED_TRL = ">=1.15.0,<1.17"
_MIN, _MAX_EXCLUSIVE = (1, 15, 0), (1, 17, 0)
_TRL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _version_tuple(version: str) -> tuple[int, ...]:
    from packaging.version import Version

    return Version(version).release + (0,) * (3 - len(Version(version).release))


def check_trl_version(version: str | None = None) -> str:
    """Raise ImportError unless the installed (or given) TRL version is in :data:`SUPPORTED_TRL`."""
    if version is None:
        try:
            import trl
        except ImportError as e:
            raise ImportError(
                f"dpo_fast.integrations.trl needs TRL ({SUPPORTED_TRL}); install it with "
                "`pip install 'dpo_fast[trl]'` or `pip install trl==1.16.0`"
            ) from e
        version = trl.__version__
    release = _version_tuple(version)[:3]
    if not (_MIN <= release < _MAX_EXCLUSIVE):
        raise ImportError(
            f"dpo_fast.integrations.trl supports TRL {SUPPORTED_TRL} (DPOTrainer with add_fused_lm_head and "
            f"FusedCausalLMOutput; tested with 1.16.0), but TRL {version} is installed. Install a supported version, "
            "e.g. `pip install trl==1.16.0`."
        )
    return version


check_trl_version()

import trl.trainer.dpo_trainer as _dpo_module  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.trainer.utils import FusedCausalLMOutput  # noqa: E402

from .hf import check_lm_head_once, fused_head_logprobs, lm_head_spec  # noqa: E402
from ..validation import is_dtensor  # noqa: E402

_TRL_ADD_FUSED_LM_HEAD = _dpo_module.add_fused_lm_head


def _router_aux_loss(model, backbone_outputs, attention_mask):
    """The MoE load-balancing loss exactly as the model's own forward adds it."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    config = model.config.get_text_config()
    num_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if num_experts is None:
        num_experts = getattr(model, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None) or getattr(model, "num_experts_per_tok", 2)
    return load_balancing_loss_func(backbone_outputs.router_logits, num_experts, top_k, attention_mask)


def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple[str, ...] = ("log_probs",), *, impl: str = "auto", packing=None) -> None:
    """Give ``model`` TRL's fused-LM-head forward, computed by dpo_fast.

    Same contract as ``trl.trainer.utils.add_fused_lm_head`` (1.15+):
    ``model(..., labels=labels, fused_lm_head=True)`` returns a ``FusedCausalLMOutput`` whose
    per-token fields have shape ``[B, T-1]`` (``[B, T]`` with pre-shifted ``shift_labels``)
    and are 0 where the next-token label is -100; without ``fused_lm_head`` the original
    forward runs (generation is unchanged).

    Args:
        model: a transformers causal LM (the bare model, not a PEFT wrapper: patch
            ``peft_model.get_base_model()``).
        temperature: divides the (scaled, softcapped) logits.
        cast_lm_head_to_fp32: run the head projection in float32 whatever the autocast state.
        outputs: per-token fields to compute, from ``("log_probs", "entropy",
            "log_sum_sq_probs", "mean_logits", "is_top1")``; the others are None.
        impl: dpo_fast implementation (``"auto"``, ``"torch"``, ``"triton"``, ``"reference"``).
        packing: None, ``"shared_prompt"`` or ``"shared_prompt_packed"``: the fused forward of a
            ``[chosen rows; rejected rows]`` batch (DPOTrainer's) runs the shared-prompt (packed)
            layout of :mod:`dpo_fast.integrations.packing` (see :func:`_packed_fused_forward`).
    """
    from ..ops import check_impl
    from ..options import LogprobOptions
    from .packing import check_packing

    check_impl(impl)
    LogprobOptions(temperature=temperature)  # a bad temperature fails now, not at the first step
    check_packing(packing)
    outputs = (outputs,) if isinstance(outputs, str) else tuple(outputs)
    unknown = [o for o in outputs if o not in _TRL_OUTPUTS]
    if unknown:
        raise ValueError(f"outputs has unknown names {unknown}; expected a subset of {_TRL_OUTPUTS}")
    requested = ("log_probs",) + tuple(o for o in _TRL_OUTPUTS[1:] if o in outputs)
    lm_head_spec(model)  # fail now, not at the first step, for a model without an output embedding
    _check_head_once(model)
    original_forward = model.forward
    text_config = model.config.get_text_config()

    @functools.wraps(type(model).forward)
    def fused_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                      **kwargs):
        if not fused_lm_head:
            for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[name] = value
            return original_forward(*args, **kwargs)
        if labels is None and shift_labels is None:
            raise ValueError("fused_lm_head=True needs labels (or shift_labels): the next-token ids to score, -100 elsewhere")
        kwargs["use_cache"] = False
        if packing is not None:
            return _packed_fused_forward(self, args, kwargs, labels, shift_labels, num_items_in_batch, requested,
                                         temperature, cast_lm_head_to_fp32, impl, packing)
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        if shift_labels is None:
            targets = labels[:, 1:]
            head_labels = torch.nn.functional.pad(targets, (0, 1), value=-100)
        else:
            targets = head_labels = shift_labels
        # The model's own forward runs with its lm_head computing the fused log-probs inside it (read
        # on every call: PEFT and FSDP replace modules after patching), so FSDP2, ZeRO-3 and DDP
        # unshard/gather the head and reduce its gradient as for any module (see integrations.hf).
        result, model_outputs = fused_head_logprobs(
            self, head_labels, impl=impl, outputs=requested, temperature=temperature,
            head_dtype=torch.float32 if cast_lm_head_to_fp32 else None,
            forward=functools.partial(original_forward, *args), **kwargs)
        if shift_labels is None:
            result = {name: value[:, :-1] for name, value in result.items()} if isinstance(result, dict) \
                else result[:, :-1]
        mask = targets != -100
        log_probs = result["log_probs"] if isinstance(result, dict) else result
        fields = result if isinstance(result, dict) else {"log_probs": log_probs}
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / count
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = getattr(model_outputs, "aux_loss", None)
            if aux_loss is None:
                aux_loss = _router_aux_loss(self, model_outputs, kwargs.get("attention_mask"))
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(loss=loss, label_mask=mask, aux_loss=aux_loss,
                                   **{name: fields.get(name) for name in _TRL_OUTPUTS})

    model.forward = types.MethodType(fused_forward, model)
    model._dpo_fast_fused_head = impl
    model._dpo_fast_packing = packing


def _packed_fused_forward(model, args, kwargs, labels, shift_labels, num_items_in_batch, requested, temperature,
                          cast_lm_head_to_fp32, impl, packing):
    """The fused-head output of DPOTrainer's ``[chosen; rejected]`` batch via the shared-prompt layout.

    DPOTrainer (text datasets) calls ``model(input_ids=, attention_mask=, use_cache=False,
    labels=input_ids with -100 off the completion)``, rows ``i`` and ``B + i`` the chosen and
    rejected sequence of pair ``i``, right-padded: exactly what
    :func:`~dpo_fast.integrations.packing.packed_completion_logps` takes (its completion mask is
    ``labels != -100``). Anything else (pre-shifted labels, extra model inputs such as images or
    position ids, MoE router logits, a float32-cast head) is refused with a clear error.
    """
    from .packing import packed_completion_logps

    extra = sorted(k for k in kwargs if k not in ("input_ids", "attention_mask", "use_cache"))
    problems = [("positional inputs", bool(args)), ("shift_labels", shift_labels is not None),
                (f"model inputs {extra}", bool(extra)), ("cast_lm_head_to_fp32", cast_lm_head_to_fp32)]
    bad = [name for name, present in problems if present]
    if bad:
        raise ValueError(f"packing={packing!r} handles DPOTrainer's text batches (input_ids, attention_mask, labels); "
                         f"this call also has {', '.join(bad)}: use packing=None")
    input_ids = kwargs.get("input_ids")
    attention_mask = kwargs.get("attention_mask")
    if attention_mask is None and isinstance(input_ids, torch.Tensor):
        attention_mask = torch.ones_like(input_ids)
    completion = (labels != -100).long() if isinstance(labels, torch.Tensor) else labels
    fields = packed_completion_logps(model, input_ids, attention_mask, completion, packing=packing, impl=impl,
                                     outputs=requested, temperature=temperature)
    fields = fields if isinstance(fields, dict) else {"log_probs": fields}
    fields = {name: value[:, :-1] for name, value in fields.items()}  # position t scores token t+1, as TRL's
    mask = labels[:, 1:] != -100
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = -fields["log_probs"].sum() / count
    return FusedCausalLMOutput(loss=loss, label_mask=mask, aux_loss=None,
                               **{name: fields.get(name) for name in _TRL_OUTPUTS})


def _check_head_once(model):
    """``check_lm_head_once`` unless the head is already sharded (ZeRO-3 ``zero.Init`` / FSDP2): outside
    its engine a partitioned model cannot run a forward, and a sharded one needs every rank to run it.
    The fused forward itself runs the head inside the model's forward, where the framework gathers it."""
    weight = lm_head_spec(model).weight
    if weight.numel() == 0 or is_dtensor(weight):
        return
    check_lm_head_once(model)


@contextlib.contextmanager
def _fused_head_in_dpo_trainer(impl, packing=None):
    """Within the block, DPOTrainer installs dpo_fast's head instead of TRL's."""
    previous = _dpo_module.add_fused_lm_head
    _dpo_module.add_fused_lm_head = functools.partial(add_fused_lm_head, impl=impl, packing=packing)
    try:
        yield
    finally:
        _dpo_module.add_fused_lm_head = previous


def patch(impl: str = "auto") -> None:
    """Make every ``trl.DPOTrainer`` constructed from now on compute its log-probs with dpo_fast.

    Policy and reference log-probs and the per-token metric fields (entropy, mean logits,
    token accuracy via is_top1, log Σ p² for WPO weighting) then come from
    :func:`dpo_fast.linear_logprobs`; TRL's loss and logging are unchanged. Idempotent;
    :func:`unpatch` restores TRL's head.
    """
    from ..ops import check_impl

    check_impl(impl)
    _dpo_module.add_fused_lm_head = functools.partial(add_fused_lm_head, impl=impl)


def unpatch() -> None:
    """Undo :func:`patch`: DPOTrainers built afterwards use TRL's own fused head again."""
    _dpo_module.add_fused_lm_head = _TRL_ADD_FUSED_LM_HEAD


def is_patched() -> bool:
    return _dpo_module.add_fused_lm_head is not _TRL_ADD_FUSED_LM_HEAD


class FusedDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` whose log-probs come from dpo_fast, optionally with cached reference log-probs.

    Takes every argument of ``DPOTrainer`` plus, keyword-only:

    Args:
        ref_logps_cache: a dpo_fast reference log-prob cache (a path or a
            :class:`dpo_fast.cache.RefLogpsCache`, written by ``dpo-fast precompute``). The
            reference log-probs of every training/eval row are read from it: ``ref_model`` must
            be None, no reference model is built, and ``args.precompute_ref_log_probs`` is
            switched on so that TRL reads the values from the batch. The cache must match
            ``args.max_length``, ``truncation_mode`` and ``ld_alpha`` (and, when ``model`` is a
            local folder, its weights): else ``StaleCacheError`` names the difference. Rows
            missing from the cache raise ``KeyError`` with the count.
        impl: dpo_fast implementation for the fused head (default ``"auto"``).
        packing: None (default), ``"shared_prompt"`` or ``"shared_prompt_packed"``: the policy and
            reference forwards run each prompt once (and pack the pairs), with the same numbers
            (:mod:`dpo_fast.integrations.packing`; the model is probed on first use and refused,
            naming the fallback, if its attention cannot honour the layout). Text datasets only
            (vision batches carry extra inputs and left-padded prompts: a clear error).
    """

    def __init__(self, model, ref_model=None, args=None, *posargs, ref_logps_cache=None, impl="auto", packing=None,
                 **kwargs):
        from ..ops import check_impl
        from .packing import check_packing

        check_impl(impl)
        check_packing(packing)
        if args is not None:  # the loss options, with the same check as every dpo_fast loss, before any work
            from ..options import check_loss_options

            check_loss_options(args.loss_type, args.loss_weights, args.beta, args.label_smoothing,
                               discopop_tau=args.discopop_tau)
        self._dpo_fast_cache = None
        self._dpo_fast_model_dir = None
        if ref_logps_cache is not None:
            from ..cache import RefLogpsCache

            if ref_model is not None:
                raise ValueError("pass either ref_model or ref_logps_cache, not both: with a cache no reference "
                                 "model is used")
            if args is None:
                name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
                args = DPOConfig(f"{name.split('/')[-1]}-DPO")
            if args.sync_ref_model:
                raise ValueError("ref_logps_cache holds a fixed reference; it cannot be used with sync_ref_model=True")
            cache = ref_logps_cache if isinstance(ref_logps_cache, RefLogpsCache) else RefLogpsCache.open(ref_logps_cache)
            # Fail before any dataset work if the cache was made for another truncation, LD-DPO weighting or
            # temperature (TRL's DPOTrainer scores with untempered logits: add_fused_lm_head's temperature=1).
            cache.check(max_length=args.max_length, truncation_mode=args.truncation_mode, ld_alpha=args.ld_alpha,
                        temperature=1.0)
            self._dpo_fast_cache = cache
            if isinstance(model, str) and os.path.isdir(model):
                self._dpo_fast_model_dir = model  # the cache must come from these weights
            args.precompute_ref_log_probs = True  # TRL then reads ref_*_logps from the batch, builds no ref model
        with _fused_head_in_dpo_trainer(impl, packing):
            super().__init__(model, ref_model, args, *posargs, **kwargs)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if self._dpo_fast_cache is None:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        from ..cache import dataset_with_ref_logps

        spec = lm_head_spec(self.model)
        self._dpo_fast_cache.check(logit_scale=float(spec.logit_scale),  # the head transform the cache was made with
                                   softcap=None if spec.softcap is None else float(spec.softcap))
        return dataset_with_ref_logps(dataset, self._dpo_fast_cache, max_length=self.args.max_length,
                                      truncation_mode=self.args.truncation_mode, ld_alpha=self.args.ld_alpha,
                                      model=self._dpo_fast_model_dir)
