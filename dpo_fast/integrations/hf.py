"""Log-probs of Hugging Face causal LMs through the fused path, without the ``[B, T, V]`` logits.

A causal LM's forward is ``logits = f(lm_head(backbone(input_ids).last_hidden_state))`` where
``f`` is the identity for most models and a scale and/or tanh softcap for some
(Gemma 2/3 ``final_logit_softcapping``, Cohere ``logit_scale``, Granite ``logits_scaling``,
Falcon-H1 ``lm_head_multiplier``, ...). :func:`lm_head_spec` reads the lm_head module and ``f``
from the model; :func:`dpo_fast.linear_logprobs` then gives the log-probs without forming the logits.

How the head is reached (:func:`fused_head_logprobs`, used by every entry point that has a
model): the model's OWN forward runs (``model(input_ids=..., use_cache=False)``, through whatever
wraps it) while the lm_head module's ``forward`` is temporarily replaced by one that computes the
fused log-probs from its input hidden states and its own ``weight``/``bias`` and returns them
(``[..., 1]``) in place of the logits. The model's post-processing of that small tensor is
ignored (its transform ``f`` is applied inside, from :func:`lm_head_spec`), and no weight is ever
read outside a forward. Why this design rather than running ``model.base_model`` and reading
``lm_head.weight``: a sharded model only holds a usable weight inside the forward of the module
that owns it, and every framework already does the right thing for a module call:

* FSDP2 (``fully_shard``): the lm_head's unit (its own, or the root's) is unsharded by its
  pre-forward hook in the ``MixedPrecisionPolicy`` param dtype; its post-forward hook puts the
  pre-backward hook on the tensor the head returned, so the recomputing backward finds the
  weight unsharded again, and the gradient is reduce-scattered in the reduce dtype
  (``set_requires_gradient_sync(False)`` accumulates as for any module). Tied embeddings are
  one parameter in one unit.

* DeepSpeed ZeRO-3: the engine gathers the head's parameters in the head's pre-forward hook,
  re-gathers them in the pre-backward hook it attaches to the head's output, and every rank
  makes the same calls whatever its token count (the head is called once per forward even with
  no scored token). Tied weights are the engine's usual shared parameter.
* DDP: the forward goes through the ``DistributedDataParallel`` wrapper, so its reducer
  expects and all-reduces every gradient, the head's included.

The values returned to the caller are the ones computed inside the head's forward; the tensor
the head's ``__call__`` returned (which carries the head unit's FSDP2 hook, or ZeRO-3's
replacement of it) and the model's output logits (which carry the root unit's hook) are tied to
them by zero-gradient edges (``_Anchor``), so those hooks run, before the fused backward, exactly
as for a plain-logits forward. Measured without these edges: a head in its own unit fails in
backward (it reads the freed weight), and a model with only a root unit gets silently wrong
gradients (relative error 1.15: no pre-backward hook ran, so FSDP never queued the callback that
reduce-scatters them). tests/test_distributed.py checks that the hooks fire.

A DTensor weight seen *inside* the head's forward (tensor parallel) is not handled here.

:func:`check_lm_head_spec` compares the result with the model's own logits on a short input:
it is the guard against an architecture that transforms its logits in a way this module
does not know about (``dpo-fast precompute`` runs it before computing anything).
"""
from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass

import torch

from ..ops import check_impl, linear_logprobs
from ..options import LogprobOptions
from ..validation import check_labels, is_dtensor
from ..vocab_parallel import vocab_parallel_linear_logprobs

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
    "fused_head_logprobs",
]


@dataclass(frozen=True)
class LMHeadSpec:
    """How a model turns last hidden states into logits.

    ``logits = c * tanh((hidden @ weight.T + bias) * logit_scale / c)`` with ``c = softcap``
    (no tanh when ``softcap`` is None). ``weight`` and ``bias`` are the model's own parameters
    (not copies), so gradients reach them.

    ``vocab_parallel`` is True for a model loaded with a tensor-parallel plan that splits the
    lm_head by vocabulary rows (``weight`` is then a DTensor ``Shard(0)`` over the TP mesh):
    the head runs through :func:`dpo_fast.vocab_parallel_linear_logprobs`, never gathered.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    logit_scale: float
    softcap: float | None
    vocab_parallel: bool = False


def _unwrap_wrappers(model):
    """The model inside DistributedDataParallel / a DeepSpeed engine (their ``.module``), else ``model``."""
    while (not callable(getattr(model, "get_output_embeddings", None))
           and isinstance(getattr(model, "module", None), torch.nn.Module)):
        model = model.module
    return model


def _unwrap_peft(model):
    """The transformers model inside a PEFT wrapper (LoRA layers stay injected), else ``model``."""
    model = _unwrap_wrappers(model)
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
    head = _head_module(model)
    weight = getattr(head, "weight", None)
    # A ZeRO-3 partitioned parameter is empty outside its module's forward; ds_shape is its real shape.
    shape = tuple(getattr(weight, "ds_shape", getattr(weight, "shape", ())))
    if not isinstance(weight, torch.Tensor) or len(shape) != 2:
        raise ValueError(
            f"model's output embedding {type(head).__name__} has no 2-D .weight; dpo_fast supports a linear lm_head"
        )
    bias = getattr(head, "bias", None)
    if bias is not None and (not isinstance(bias, torch.Tensor)
                             or tuple(getattr(bias, "ds_shape", bias.shape)) != (shape[0],)):
        raise ValueError(f"model's lm_head bias must have shape [{shape[0]}], got {getattr(bias, 'shape', bias)}")
    return weight, bias


def _head_module(model):
    """The module whose ``weight``/``bias`` make the logits (PEFT wrappers resolved)."""
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
    return head


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
    return LMHeadSpec(weight=weight, bias=bias, logit_scale=scale, softcap=softcap,
                      vocab_parallel=_tensor_parallel_head(inner, weight))


def _tensor_parallel_head(model, weight) -> bool:
    """True when transformers' tensor parallelism (``from_pretrained(..., tp_plan="auto")`` /
    ``DistributedConfig(tp_size=...)``) split the lm_head by vocabulary rows: the model reports
    ``tp_size > 1`` and the weight is a DTensor ``Shard(0)`` over a 1-D mesh (the "colwise" styles;
    the hidden states the backbone returns are then replicated plain tensors). A DTensor weight
    without that (FSDP2) is left to the op, which rejects it with a message saying what to do."""
    if not is_dtensor(weight):
        return False
    from torch.distributed.tensor import Shard

    tp_size = getattr(model, "tp_size", None) or getattr(model, "_tp_size", None)
    return (isinstance(tp_size, int) and tp_size > 1 and weight.device_mesh.ndim == 1
            and tuple(weight.placements) == (Shard(0),))


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


def _input_side_scale(config) -> float:
    """The factor some models apply to the hidden states *before* their lm_head (MiniCPM3 divides by
    ``logits_scaling``, Inkling by ``logits_mup_width_multiplier``). :func:`logit_transform` folds it
    into ``logit_scale``; the fused head, which reads the lm_head's input, must not apply it twice."""
    model_type = str(getattr(config, "model_type", "") or "")
    scale = 1.0
    value = getattr(config, "logits_mup_width_multiplier", None)
    if value is not None:
        scale /= _number("logits_mup_width_multiplier", value)
    value = getattr(config, "logits_scaling", None)
    if value is not None and model_type.startswith("minicpm3"):
        scale /= _number("logits_scaling", value)
    return scale


def _head_input_transform(model, spec: LMHeadSpec) -> tuple[float, float | None]:
    """``(scale, softcap)`` from the lm_head's input (not the backbone's output) to the logits."""
    return spec.logit_scale / _input_side_scale(_text_config(_unwrap_peft(model))), spec.softcap


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


def backbone_hidden_states(model, input_ids, attention_mask=None, **kwargs):
    """``model.base_model(input_ids, attention_mask, use_cache=False, **kwargs).last_hidden_state`` ([B, T, H]);
    ``kwargs`` are further backbone inputs such as ``position_ids``."""
    backbone = resolve_backbone(model)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
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


# ----------------------------------------------------------------------------- the head inside the model's forward

_ACTIVE = set()                 # ids of head modules whose forward is replaced right now
_ACTIVE_LOCK = threading.Lock()


@contextlib.contextmanager
def _replaced_head_forward(head, fn):
    """Within the block, ``head(x)`` runs ``fn(head, x, original_forward)`` (hooks unchanged).

    Yields a record whose ``"output"`` is what the head's ``__call__`` returned (after every
    forward hook a framework registered, which may replace the tensor) and ``"calls"`` how
    often it ran. The instance's own ``forward`` attribute, if any, is restored in ``finally``.
    """
    with _ACTIVE_LOCK:
        if id(head) in _ACTIVE:
            raise RuntimeError(f"the output embedding {type(head).__name__} is already running a dpo_fast fused head "
                               "(a re-entrant or concurrent call on the same model); run one forward at a time")
        _ACTIVE.add(id(head))
    record = {"calls": 0, "output": None}
    had_own = "forward" in head.__dict__
    original = head.forward

    def forward(x, *args, **kwargs):
        if args or kwargs:
            raise TypeError(f"dpo_fast's fused head expects the output embedding to be called with the hidden states "
                            f"only; {type(head).__name__} got {len(args)} more positional and {sorted(kwargs)} "
                            "keyword arguments")
        record["calls"] += 1
        if record["calls"] > 1:
            raise ValueError("the model's forward called its output embedding more than once; dpo_fast does not support "
                             "this architecture: the fused head needs one lm_head call per forward")
        return fn(head, x, original)

    def capture(module, inputs, output):
        record["output"] = output

    head.forward = forward
    handle = head.register_forward_hook(capture)
    try:
        yield record
    finally:
        handle.remove()
        if had_own:
            head.forward = original
        else:
            del head.forward
        with _ACTIVE_LOCK:
            _ACTIVE.discard(id(head))


class _Anchor(torch.autograd.Function):
    """``value`` unchanged; each anchor gets a zero gradient, so backward hooks on it (a
    framework's pre-backward hooks on a module's output) run before ``value``'s producer."""

    @staticmethod
    def forward(ctx, value, *anchors):
        ctx.specs = [(a.shape, a.dtype, a.device) for a in anchors]
        return value.clone()  # not a view: FSDP2 warns about hooks on views

    @staticmethod
    def backward(ctx, grad, *_):
        return (grad, *(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.specs))


def _grad_tensors(out):
    """The model output's logits (or first tuple element) when it takes part in autograd."""
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out:
        logits = out[0]
    return [logits] if isinstance(logits, torch.Tensor) and logits.requires_grad else []


def _cast_operands(hidden, weight, bias, dtype=None):
    """Hidden, weight, bias in ``dtype``, else the autocast dtype, else the weight's dtype."""
    if dtype is None:
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    hidden, weight = (t if t.dtype == dtype else t.to(dtype) for t in (hidden, weight))
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    if weight.device != hidden.device:
        raise ValueError(f"the lm_head weight is on {weight.device} but the hidden states are on {hidden.device}; "
                         "models split across devices are not supported")
    return hidden, weight, bias


def _head_operands(hidden, spec: LMHeadSpec):
    """Backbone hidden states, weight, bias in the dtype the model's own lm_head matmul would use
    (for callers that run the backbone and read the head outside the forward: single-process only)."""
    return _cast_operands(hidden, spec.weight, spec.bias)


def _local_head_params(head):
    weight, bias = head.weight, getattr(head, "bias", None)
    if is_dtensor(weight) or weight.dim() != 2:
        raise ValueError(
            f"the lm_head weight inside the model's forward is a {type(weight).__name__} of shape "
            f"{tuple(weight.shape)}, not a full [V, H] tensor (a tensor-parallel lm_head, or a sharding framework "
            "this path does not know); the fused head needs the full weight inside the head's forward")
    return weight, bias


def fused_head_logprobs(model, labels, *, index=None, impl="auto", outputs=("log_probs",), temperature=1.0,
                        head_dtype=None, forward=None, **model_kwargs):
    """Run the model's own forward with its lm_head computing fused log-probs instead of logits.

    Equivalent to::

        out = model(**model_kwargs, use_cache=False)
        z = f(out.logits).float() / temperature        # f: lm_head_spec's scale and softcap
        if index is not None: z = z.reshape(-1, V)[index]
        log_probs = z.log_softmax(-1).gather(-1, labels[..., None])[..., 0]   # 0 where labels == -100

    without forming the logits: the output embedding's forward is replaced, for this call, by
    one that runs :func:`dpo_fast.linear_logprobs` on its input hidden states with its own
    weight and bias (see the module docstring for why this is right under FSDP2, ZeRO-3, DDP).
    The model must call its output embedding exactly once, on all positions
    (``logits_to_keep=0``, the default of transformers models).

    Args:
        model: a transformers causal LM, possibly wrapped (PEFT, FSDP2, DDP, DeepSpeed engine).
        labels: integer token ids, -100 for positions to skip. Without ``index``: the shape of
            the head's input rows (``[B, T]`` for ``input_ids [B, T]``); label t scores the
            logits of position t (shift them yourself). With ``index``: ``[N]``.
        index: optional ``[N]`` int64 flat indices into the head's ``B * T`` input rows; only
            those rows are scored (packed or shared-prompt layouts).
        impl, outputs, temperature: as in :func:`dpo_fast.linear_logprobs`.
        head_dtype: run the head in this dtype (default: the autocast dtype when autocast is
            on, else the dtype of the weight inside the forward, e.g. FSDP2's param dtype).
        forward: callable to invoke instead of ``model`` (e.g. an unpatched bound forward).
        **model_kwargs: passed to the forward (``input_ids``, ``attention_mask``,
            ``position_ids``, a 4-D mask, ...); ``use_cache`` is forced to False.
    Returns:
        ``(result, model_output)``: ``result`` as :func:`dpo_fast.linear_logprobs` returns it
        (float32 ``labels.shape`` tensor, or a dict), gradients flowing to the model;
        ``model_output`` the model's own output (its ``logits`` are meaningless; use e.g. its
        ``aux_loss``).
    """
    opts = LogprobOptions(temperature=temperature, outputs=outputs)
    spec = lm_head_spec(model)
    head = _head_module(_unwrap_peft(model))
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got "
                        f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if index is not None:
        if not isinstance(index, torch.Tensor) or index.dtype != torch.long or index.dim() != 1:
            raise TypeError("index must be a 1-D int64 tensor of flat row indices")
        if tuple(labels.shape) != tuple(index.shape):
            raise ValueError(f"labels must have the shape of index {tuple(index.shape)}, got {tuple(labels.shape)}")
    if head_dtype is not None and head_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"head_dtype must be a floating dtype, got {head_dtype!r}")
    n_vocab = tuple(getattr(spec.weight, "ds_shape", spec.weight.shape))[0]
    check_labels("labels", labels, labels.shape, n_vocab, -100)  # before the model runs
    scale, softcap = _head_input_transform(model, spec)
    holder = {}

    def head_forward(module, x, original):
        weight, bias = _local_head_params(module)
        if index is None:
            if tuple(x.shape[:-1]) != tuple(labels.shape):
                raise ValueError(f"the model called its lm_head on hidden states of shape {tuple(x.shape)}, which do not "
                                 f"match labels of shape {tuple(labels.shape)} (does the model slice the positions, "
                                 "e.g. logits_to_keep?)")
            rows = x
        else:
            flat = x.reshape(-1, x.shape[-1])
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= flat.shape[0]):
                raise ValueError(f"index must hold row indices in [0, {flat.shape[0]}) of the head's input rows")
            rows = flat.index_select(0, index.to(x.device))
        rows, weight, bias = _cast_operands(rows, weight, bias, head_dtype)
        with torch.autocast(rows.device.type, enabled=False):
            result = linear_logprobs(rows, weight, labels.to(rows.device), bias, ignore_index=-100,
                                     logit_scale=scale, softcap=softcap, temperature=temperature,
                                     outputs=opts.outputs, impl=impl)
        holder["result"] = result
        log_probs = result["log_probs"] if isinstance(result, dict) else result
        holder["log_probs"] = log_probs
        return log_probs.unsqueeze(-1).clone()  # what the model post-processes, and frameworks hook

    model_kwargs["use_cache"] = False
    with _replaced_head_forward(head, head_forward) as record:
        out = (model if forward is None else forward)(**model_kwargs)
    if record["calls"] == 0:
        raise ValueError(f"{type(_unwrap_peft(model)).__name__}'s forward never called its output embedding "
                         f"({type(head).__name__}); dpo_fast does not support this architecture: the fused head "
                         "runs inside the lm_head's forward")
    result, log_probs = holder["result"], holder["log_probs"]
    if log_probs.requires_grad:
        anchors = [t for t in [record["output"], *_grad_tensors(out)]
                   if isinstance(t, torch.Tensor) and t.requires_grad]
        if anchors:
            log_probs = _Anchor.apply(log_probs, *anchors)
        result = {**result, "log_probs": log_probs} if isinstance(result, dict) else log_probs
    return result, out


def vocab_parallel_head_logprobs(model, spec: LMHeadSpec, labels, *, index=None, impl="auto", outputs=("log_probs",),
                                 temperature=1.0, input_ids, attention_mask=None, **backbone_kwargs):
    """The tensor-parallel counterpart of :func:`fused_head_logprobs` (``spec.vocab_parallel``):
    the backbone runs, then :func:`dpo_fast.vocab_parallel_linear_logprobs` scores its hidden
    states (the rows ``index`` selects from the flattened ``[B * T, H]`` when given) against
    each rank's own head rows, which are never gathered. ``backbone_kwargs`` go to the backbone
    (e.g. ``position_ids``). Returns what ``vocab_parallel_linear_logprobs`` returns."""
    hidden = backbone_hidden_states(model, input_ids, attention_mask, **backbone_kwargs)
    if index is not None:
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    hidden, weight, bias = _head_operands(hidden, spec)
    with torch.autocast(hidden.device.type, enabled=False):
        return vocab_parallel_linear_logprobs(hidden, weight, labels, bias, ignore_index=-100,
                                              logit_scale=spec.logit_scale, softcap=spec.softcap,
                                              temperature=temperature, outputs=outputs, impl=impl)


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

    The model's own forward runs (``use_cache=False``) with its lm_head replaced, for this
    call, by :func:`dpo_fast.linear_logprobs` on the full, contiguous hidden states with
    left-shifted labels (-100 at the last position and at non-completion positions), so
    prompt/padding rows cost no vocabulary work (:func:`fused_head_logprobs`; this is what
    makes FSDP2, DeepSpeed ZeRO-3 and DDP models work). Under autocast the lm_head operands are
    cast to the autocast dtype, as the model's own ``nn.Linear`` would be.

    Args:
        model: a transformers causal LM (``*ForCausalLM``, GPT-2 style ``*LMHeadModel``,
            PEFT-wrapped), see :func:`lm_head_spec`. Loaded with a tensor-parallel plan
            (``tp_plan="auto"``), its vocabulary-split lm_head runs through
            :func:`dpo_fast.vocab_parallel_linear_logprobs`, never gathered.
        input_ids, attention_mask, completion_mask: ``[B, T]`` tensors on the model's device.
        impl: ``"auto"``, ``"reference"``, ``"torch"`` or ``"triton"`` (see :func:`dpo_fast.linear_logprobs`).
        outputs: names from ``dpo_fast.options.OUTPUT_NAMES``.
        temperature: divides the (capped) logits.
    Returns:
        a float32 ``[B, T]`` tensor (float64 for a float64 model), or a dict of them when several
        outputs are requested. Gradients flow into the model.
    """
    LogprobOptions(temperature=temperature, outputs=outputs)  # validate before any compute
    check_impl(impl)
    _check_batch(input_ids, attention_mask, completion_mask)
    labels = torch.full_like(input_ids, -100, dtype=torch.long)
    labels[:, :-1] = input_ids[:, 1:].masked_fill(~completion_mask[:, 1:].bool(), -100)
    spec = lm_head_spec(model)
    if spec.vocab_parallel:  # a tensor-parallel head: its rows stay sharded (dpo_fast.vocab_parallel)
        return vocab_parallel_head_logprobs(model, spec, labels, impl=impl, outputs=outputs, temperature=temperature,
                                            input_ids=input_ids, attention_mask=attention_mask)
    result, _ = fused_head_logprobs(model, labels, impl=impl, outputs=outputs, temperature=temperature,
                                    input_ids=input_ids, attention_mask=attention_mask)
    return result


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
    head = _head_module(_unwrap_peft(model))
    device = spec.weight.device
    if input_ids is None:
        n_vocab = tuple(getattr(spec.weight, "ds_shape", spec.weight.shape))[0]
        input_ids = (torch.arange(8, device=device) * 7919 % max(1, min(n_vocab, 1000))).unsqueeze(0)
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids)
    scale, softcap = _head_input_transform(model, spec)
    captured = {}

    def rebuild(rows, weight, bias):
        s = rows @ weight.T
        if bias is not None:
            s = s + bias
        z = s.double() * scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        captured["z"], captured["dtype"] = z, weight.dtype

    def head_forward(module, x, original):
        # Inside the head's forward a sharded weight is whole: rebuild the logits from it, as the
        # fused path will, next to what the module itself returns.
        rebuild(*_cast_operands(x, *_local_head_params(module)))
        return original(x)

    was_training = model.training
    model.eval()
    try:
        if spec.vocab_parallel:  # a check on a few tokens: gathering the head once is fine here
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.double()
            hidden, weight, bias = _head_operands(backbone_hidden_states(model, input_ids, attention_mask), spec)
            rebuild(hidden, weight.full_tensor(), None if bias is None else bias.full_tensor())
            record = {"calls": 1}
        else:
            with _replaced_head_forward(head, head_forward) as record:
                logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.double()
    finally:
        model.train(was_training)
    if record["calls"] != 1:
        raise ValueError(f"{type(_unwrap_peft(model)).__name__} (model_type={_model_type(model)!r})'s forward called its "
                         f"output embedding {record['calls']} times (expected once); dpo_fast does not support this "
                         "architecture")
    z = captured["z"]
    if tuple(z.shape) != tuple(logits.shape):
        raise ValueError(f"{type(model).__name__} (model_type={_model_type(model)!r}): the lm_head gives logits of shape "
                         f"{tuple(z.shape)} but the model returns {tuple(logits.shape)}; dpo_fast does not support this "
                         "architecture")
    low = captured["dtype"] in (torch.float16, torch.bfloat16)
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
