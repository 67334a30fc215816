"""Log-probs of Hugging Face causal LMs through the fused path, without the ``[B, T, V]`` logits.

A causal LM's forward is ``logits = f(lm_head(backbone(input_ids).last_hidden_state))`` where
``f`` is the identity for most models and a scale and/or tanh softcap for some
(Gemma 2/3 ``final_logit_softcapping``, Cohere ``logit_scale``, Granite ``logits_scaling``,
Falcon-H1 ``lm_head_multiplier``, ...). This module runs only the backbone, reads the lm_head
weight/bias and ``f`` from the model (:func:`lm_head_spec`), and hands the hidden states to
:func:`dpo_fast.linear_logprobs`, which never forms the logits.

:func:`check_lm_head_spec` compares the result with the model's own logits on a short input:
it is the guard against an architecture that transforms its logits in a way this module
does not know about (``dpo-fast precompute`` runs it before computing anything).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..ops import IMPLS, linear_logprobs
from ..options import LogprobOptions

__all__ = [
    "LMHeadSpec",
    "lm_head_spec",
    "logit_transform",
    "resolve_backbone",
    "backbone_hidden_states",
    "completion_logps",
    "sequence_logps_from_model",
    "check_lm_head_spec",
    "check_lm_head_once",
]


@dataclass(frozen=True)
class LMHeadSpec:
    """How a model turns last hidden states into logits.

    ``logits = c * tanh((hidden @ weight.T + bias) * logit_scale / c)`` with ``c = softcap``
    (no tanh when ``softcap`` is None). ``weight`` and ``bias`` are the model's own parameters
    (not copies), so gradients reach them.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    logit_scale: float
    softcap: float | None


def _unwrap_peft(model):
    """The transformers model inside a PEFT wrapper (LoRA layers stay injected), else ``model``."""
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        config = getattr(model, "active_peft_config", None)
        if config is not None and getattr(config, "is_prompt_learning", False):
            raise ValueError(
                "model is a PEFT prompt-learning model (prefix/prompt tuning): its virtual tokens live outside "
                "the backbone, so dpo_fast cannot run the backbone alone. Use the model's logits instead "
                "(e.g. dpo_fast.logits_logprobs) or a LoRA-style adapter."
            )
        return model.get_base_model()
    return model


def _text_config(model):
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"model must be a transformers PreTrainedModel with a .config, got {type(model).__name__}")
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def _number(name, value):
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"model config has {name}={value!r}; expected a finite number > 0")
    return float(value)


def _output_embedding(model):
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise ValueError(
            f"model {type(model).__name__} has no output embedding (get_output_embeddings() returned None): "
            "dpo_fast needs a causal LM with an lm_head, e.g. AutoModelForCausalLM, not a bare backbone "
            "or an encoder/classifier."
        )
    # PEFT wraps target modules: ModulesToSaveWrapper keeps a trainable copy per adapter, LoRA
    # adds a low-rank delta the plain .weight does not include.
    if hasattr(head, "modules_to_save") and hasattr(head, "original_module"):
        active = getattr(head, "active_adapters", None) or [getattr(head, "active_adapter", None)]
        if getattr(head, "disable_adapters", False) or active[0] not in head.modules_to_save:
            head = head.original_module
        else:
            head = head.modules_to_save[active[0]]
    if hasattr(head, "base_layer") and getattr(head, "lora_A", None):
        if not getattr(head, "disable_adapters", False) and not getattr(head, "merged", False):
            raise ValueError(
                "the model's lm_head carries an unmerged LoRA adapter: its effective weight is not lm_head.weight. "
                "Merge it (model.merge_adapter()) or leave lm_head out of the LoRA target_modules."
            )
        head = head.base_layer
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"model's output embedding {type(head).__name__} has no 2-D .weight; dpo_fast supports a linear lm_head"
        )
    bias = getattr(head, "bias", None)
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"model's lm_head bias must have shape [{weight.shape[0]}], got {getattr(bias, 'shape', bias)}")
    return weight, bias


def lm_head_spec(model) -> LMHeadSpec:
    """The lm_head weight, bias, logit scale and softcap of a transformers causal LM.

    Equivalent to reading ``model.get_output_embeddings().weight`` / ``.bias`` and the config
    fields that transform the logits in the model's forward:
    ``final_logit_softcapping`` / ``logits_soft_cap`` (tanh softcap), ``logit_scale``
    (multiplies, Cohere), ``logits_scaling`` (divides, Granite; multiplies for HyperCLOVA X),
    ``lm_head_multiplier`` (multiplies, Falcon-H1), ``output_multiplier`` (multiplies, MuseSpark
    and MuseGlimmer). A transform not listed here is caught by :func:`check_lm_head_spec`, which
    the trainers run once per model (:func:`check_lm_head_once`). Works through PEFT wrappers and tied
    embeddings (the weight is the shared parameter). Raises ``ValueError`` for a model without
    an output embedding.
    """
    inner = _unwrap_peft(model)
    weight, bias = _output_embedding(inner)
    scale, softcap = logit_transform(_text_config(inner), has_bias=bias is not None)
    return LMHeadSpec(weight=weight, bias=bias, logit_scale=scale, softcap=softcap)


def logit_transform(config, *, has_bias: bool = False) -> tuple[float, float | None]:
    """``(logit_scale, softcap)`` from a (text) model config; see :func:`lm_head_spec`."""
    model_type = str(getattr(config, "model_type", "") or "")
    scale = 1.0
    value = getattr(config, "logit_scale", None)
    if value is not None:
        scale *= _number("logit_scale", value)
    value = getattr(config, "logits_scaling", None)
    if value is not None:
        value = _number("logits_scaling", value)
        scale = scale * value if model_type.startswith("hyperclovax") else scale / value
    value = getattr(config, "lm_head_multiplier", None)
    if value is not None:
        scale *= _number("lm_head_multiplier", value)
    value = getattr(config, "output_multiplier", None)
    if value is not None:  # MuseSpark / MuseGlimmer: multiplies the logits before the softcap
        scale *= _number("output_multiplier", value)
    value = getattr(config, "logits_mup_width_multiplier", None)
    if value is not None:
        if has_bias:
            raise ValueError("logits_mup_width_multiplier with an lm_head bias is not supported")
        scale /= _number("logits_mup_width_multiplier", value)
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is None:
        softcap = getattr(config, "logits_soft_cap", None)
    if softcap is not None:
        softcap = _number("final_logit_softcapping", softcap)
    return scale, softcap


def resolve_backbone(model):
    """The module that maps ``input_ids`` to ``last_hidden_state``: ``model.base_model``
    (``model.get_base_model().base_model`` under PEFT)."""
    inner = _unwrap_peft(model)
    backbone = getattr(inner, "base_model", None)
    if backbone is inner:  # e.g. Llama4ForCausalLM, MllamaForCausalLM: base_model_prefix names no submodule
        get_decoder = getattr(inner, "get_decoder", None)
        for decoder in (get_decoder() if callable(get_decoder) else None, getattr(inner, "model", None)):
            if isinstance(decoder, torch.nn.Module) and decoder is not inner:
                backbone = decoder
                break
    if backbone is None or backbone is inner:
        raise ValueError(
            f"cannot find the backbone of {type(inner).__name__}: model.base_model is "
            f"{'the model itself' if backbone is inner else 'missing'}. dpo_fast needs a transformers "
            "*ForCausalLM whose base_model_prefix names its decoder."
        )
    return backbone


def backbone_hidden_states(model, input_ids, attention_mask=None):
    """``model.base_model(input_ids, attention_mask, use_cache=False).last_hidden_state`` ([B, T, H])."""
    backbone = resolve_backbone(model)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0]
    return hidden


def _check_batch(input_ids, attention_mask, completion_mask):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, T] tensor, got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    for name, mask in (("attention_mask", attention_mask), ("completion_mask", completion_mask)):
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(input_ids.shape):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{name} must be a tensor of shape {tuple(input_ids.shape)} like input_ids, got {got}")
        if mask.device != input_ids.device:
            raise ValueError(f"{name} must be on input_ids' device {input_ids.device}, got {mask.device}")
    if bool((completion_mask.bool() & ~attention_mask.bool()).any()):
        raise ValueError("completion_mask marks positions where attention_mask is 0 (padding); "
                         "completion tokens must be attended")


def _head_operands(hidden, spec: LMHeadSpec):
    """Hidden, weight, bias in the dtype the model's own lm_head matmul would use."""
    weight, bias = spec.weight, spec.bias
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = weight.dtype
    hidden = hidden if hidden.dtype == dtype else hidden.to(dtype)
    weight = weight if weight.dtype == dtype else weight.to(dtype)
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    if weight.device != hidden.device:
        raise ValueError(f"the lm_head weight is on {weight.device} but the hidden states are on {hidden.device}; "
                         "models split across devices are not supported")
    return hidden, weight, bias


def completion_logps(model, input_ids, attention_mask, completion_mask, *, impl="auto", outputs=("log_probs",),
                     temperature=1.0):
    """Per-token log-probs of the completion tokens of a causal LM, without the logits.

    Equivalent to::

        logits = model(input_ids, attention_mask=attention_mask, use_cache=False).logits / temperature
        lp = logits[:, :-1].float().log_softmax(-1).gather(-1, input_ids[:, 1:, None])[..., 0]
        out = torch.zeros_like(input_ids, dtype=torch.float32)
        out[:, :-1] = lp * completion_mask[:, 1:]

    i.e. position t holds ``log p(input_ids[:, t+1] | input_ids[:, :t+1])`` where
    ``completion_mask[:, t+1]`` is set and 0 elsewhere; the last column is always 0 (and a
    completion token at position 0, having no prefix, is never scored).

    The backbone runs with ``use_cache=False``; its full, contiguous ``last_hidden_state`` goes
    to :func:`dpo_fast.linear_logprobs` with left-shifted labels (-100 at the last position and
    at non-completion positions), so no hidden-state slice is copied and prompt/padding rows cost
    no vocabulary work. Under autocast the lm_head operands are cast to the autocast dtype, as
    the model's own ``nn.Linear`` would be.

    Args:
        model: a transformers causal LM (``*ForCausalLM``, GPT-2 style ``*LMHeadModel``,
            PEFT-wrapped), see :func:`lm_head_spec`.
        input_ids, attention_mask, completion_mask: ``[B, T]`` tensors on the model's device.
        impl: ``"auto"``, ``"reference"``, ``"torch"`` or ``"triton"`` (see :func:`dpo_fast.linear_logprobs`).
        outputs: names from ``dpo_fast.options.OUTPUT_NAMES``.
        temperature: divides the (capped) logits.
    Returns:
        a float32 ``[B, T]`` tensor (float64 for a float64 model), or a dict of them when several
        outputs are requested. Gradients flow into the model.
    """
    LogprobOptions(temperature=temperature, outputs=outputs)  # validate before any compute
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    _check_batch(input_ids, attention_mask, completion_mask)
    spec = lm_head_spec(model)
    labels = torch.full_like(input_ids, -100, dtype=torch.long)
    labels[:, :-1] = input_ids[:, 1:].masked_fill(~completion_mask[:, 1:].bool(), -100)
    hidden = backbone_hidden_states(model, input_ids, attention_mask)
    hidden, weight, bias = _head_operands(hidden, spec)
    # The operands now have the dtype autocast chose; inside, the fused op accumulates in fp32 on
    # its own terms, which autocast must not override (it would recast the fp32 tiles to bf16).
    with torch.autocast(hidden.device.type, enabled=False):
        return linear_logprobs(hidden, weight, labels, bias, ignore_index=-100, logit_scale=spec.logit_scale,
                               softcap=spec.softcap, temperature=temperature, outputs=outputs, impl=impl)


def sequence_logps_from_model(model, input_ids, attention_mask, completion_mask, **kwargs):
    """Summed completion log-probs and completion token counts per sequence.

    Equivalent to ``completion_logps(...).sum(-1)`` and ``completion_mask[:, 1:].sum(-1)``:
    returns ``(logps_sum [B], n_tokens [B])``. Keyword arguments go to :func:`completion_logps`;
    ``outputs`` must include ``"log_probs"`` (only the log-prob sums are returned).
    """
    outputs = kwargs.get("outputs", ("log_probs",))
    outputs = (outputs,) if isinstance(outputs, str) else tuple(outputs)
    if "log_probs" not in outputs:
        raise ValueError(f"outputs must include 'log_probs' for sequence_logps_from_model, got {outputs}")
    per_token = completion_logps(model, input_ids, attention_mask, completion_mask, **kwargs)
    if isinstance(per_token, dict):
        per_token = per_token["log_probs"]
    n_tokens = completion_mask[:, 1:].long().sum(-1)
    return per_token.sum(-1), n_tokens


@torch.no_grad()
def check_lm_head_spec(model, input_ids=None, *, rtol=None, atol=None):
    """Compare :func:`lm_head_spec`'s reconstruction of the logits with ``model(input_ids).logits``.

    Equivalent to ``torch.testing.assert_close(spec_logits(hidden), model(input_ids).logits)`` on a
    short input (default: 8 token ids), with a tolerance scaled to the model dtype. Raises
    ``ValueError`` naming the model type when they differ: the model transforms its logits in a
    way dpo_fast does not know, and its log-probs would be wrong. Returns the largest difference.
    """
    spec = lm_head_spec(model)
    device = spec.weight.device
    if input_ids is None:
        n_vocab = spec.weight.shape[0]
        input_ids = (torch.arange(8, device=device) * 7919 % max(1, min(n_vocab, 1000))).unsqueeze(0)
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids)
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.double()
        hidden = backbone_hidden_states(model, input_ids, attention_mask)
        if hidden.shape[-1] != spec.weight.shape[1]:
            raise ValueError(
                f"{type(model).__name__} (model_type={_model_type(model)!r}): the backbone's hidden states have width "
                f"{hidden.shape[-1]} but the lm_head takes {spec.weight.shape[1]}: the model transforms the hidden "
                "states before its lm_head (a prediction-head transform); dpo_fast does not support this architecture")
        hidden, weight, bias = _head_operands(hidden, spec)
        s = hidden @ weight.T
        if bias is not None:
            s = s + bias
        z = s.double() * spec.logit_scale
        if spec.softcap is not None:
            z = spec.softcap * torch.tanh(z / spec.softcap)
    finally:
        model.train(was_training)
    if tuple(z.shape) != tuple(logits.shape):
        raise ValueError(f"{type(model).__name__}: the lm_head gives logits of shape {tuple(z.shape)} but the model "
                         f"returns {tuple(logits.shape)}; this architecture is not supported")
    low = weight.dtype in (torch.float16, torch.bfloat16)
    rtol = (2e-2 if low else 1e-4) if rtol is None else rtol
    atol = (2e-2 if low else 1e-4) if atol is None else atol
    diff = (z - logits).abs()
    worst = float(diff.max()) if diff.numel() else 0.0
    if bool((diff > atol + rtol * logits.abs()).any()):
        raise ValueError(
            f"{type(model).__name__} (model_type={_model_type(model)!r}) computes its logits differently from "
            f"lm_head(hidden) * {spec.logit_scale} with softcap={spec.softcap} (max |difference| {worst:.3g}); "
            "dpo_fast does not support this architecture's logit transform"
        )
    return worst


def _model_type(model) -> str:
    return str(getattr(_text_config(_unwrap_peft(model)), "model_type", "?"))


def check_lm_head_once(model) -> None:
    """Run :func:`check_lm_head_spec` the first time a trainer or the TRL integration sees ``model``.

    An architecture whose logit transform dpo_fast does not reproduce is then an error naming
    its model type before any training, not silently wrong log-probs. The result is remembered
    on the model object (one short forward per model; a failure is raised again on every call).
    """
    inner = _unwrap_peft(model)
    if getattr(inner, "_dpo_fast_head_checked", False):
        return
    check_lm_head_spec(model)
    try:
        object.__setattr__(inner, "_dpo_fast_head_checked", True)
    except (AttributeError, TypeError):  # pragma: no cover - a model that refuses attributes is re-checked
        pass
