"""Tiny random models of every architecture in transformers' causal-LM auto mapping.

``build_tiny(model_type)`` takes the architecture's default config, shrinks every size field it
knows (layers, widths, heads, experts, vocabulary) in the config and its sub-configs, builds the
``*ForCausalLM`` class the auto mapping names, and scales the lm_head weight so that the logits
reach realistic magnitudes (max |z| about 10-30 on random input), where a forgotten logit
transform (a multiplier, a softcap) shows up as a large error.

``compare(model)`` runs :func:`dpo_fast.integrations.hf.completion_logps` and the model's own
logits (fp32, plain log_softmax) on one padded batch and returns the largest difference.

Nothing is downloaded: an architecture whose config or model cannot be built offline (needs a
remote file, an extra package, a vision tower of its own, ...) raises :class:`NotBuildable`.
"""
from __future__ import annotations

import math
import re

import torch

VOCAB = 160
HIDDEN = 32
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 8

# field name -> value, applied to the config and each sub-config that has the field
_SIZES = {
    "vocab_size": VOCAB, "text_vocab_size": VOCAB, "unpadded_vocab_size": VOCAB, "padded_vocab_size": VOCAB,
    "rotary_dim": HEAD_DIM,
    "hidden_size": HIDDEN, "d_model": HIDDEN, "n_embd": HIDDEN, "n_embed": HIDDEN, "dim": HIDDEN,
    "embed_dim": HIDDEN, "model_dim": HIDDEN, "word_embed_proj_dim": HIDDEN,
    "num_hidden_layers": LAYERS, "n_layer": LAYERS, "num_layers": LAYERS, "n_layers": LAYERS,
    "decoder_layers": LAYERS,
    "num_attention_heads": HEADS, "n_head": HEADS, "n_heads": HEADS, "num_heads": HEADS,
    "decoder_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "n_kv_heads": KV_HEADS, "num_kv_heads": KV_HEADS, "multi_query_group_num": KV_HEADS,
    "head_dim": HEAD_DIM, "kv_channels": HEAD_DIM, "attention_head_dim": HEAD_DIM, "qk_head_dim": HEAD_DIM,
    "v_head_dim": HEAD_DIM, "qk_nope_head_dim": HEAD_DIM, "qk_rope_head_dim": HEAD_DIM,
    "global_head_dim": HEAD_DIM,
    "intermediate_size": 2 * HIDDEN, "ffn_hidden_size": 2 * HIDDEN, "n_inner": 2 * HIDDEN, "ffn_dim": 2 * HIDDEN,
    "decoder_ffn_dim": 2 * HIDDEN, "d_ff": 2 * HIDDEN,
    "moe_intermediate_size": HIDDEN, "shared_expert_intermediate_size": HIDDEN, "expert_intermediate_size": HIDDEN,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "top_k": 2, "n_group": 1, "topk_group": 1,
    "first_k_dense_replace": 1, "n_shared_experts": 1,
    "max_position_embeddings": 64, "n_positions": 64, "n_ctx": 64, "seq_length": 64, "max_sequence_length": 64,
    "sliding_window": 16, "window_size": 16, "attention_window_size": 16,
    "q_lora_rank": 16, "kv_lora_rank": 16, "num_nextn_predict_layers": 0,
}
# fields that hold one entry per layer: truncated to LAYERS
_PER_LAYER = ("layer_types", "layers_block_type", "block_types", "attn_layer_indices", "mlp_only_layers",
              "hybrid_override_pattern", "layer_block_types", "sliding_window_pattern_list", "no_rope_layers",
              "moe_layers_enum", "full_attn_idxs")

DTYPE = torch.float32


class NotBuildable(Exception):
    """The architecture cannot be built offline as a tiny decoder; the message says why."""


# Not in the causal-LM mapping but causal LMs that transform their logits in their own way
# (logits * output_multiplier before the softcap): swept as well.
EXTRA = {"muse_spark": "MuseSparkForConditionalGeneration", "muse_glimmer": "MuseGlimmerForConditionalGeneration"}


def causal_lm_mapping() -> dict:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def swept() -> dict:
    """model_type -> class name: the causal-LM auto mapping plus ``EXTRA``."""
    return {**causal_lm_mapping(), **EXTRA}


def _sub_configs(config):
    from transformers import PretrainedConfig

    for name in list(vars(config)):
        try:
            value = getattr(config, name, None)
        except Exception:  # noqa: BLE001
            continue
        if isinstance(value, PretrainedConfig):
            yield value


_HEAD_FIELDS = ("head_dim", "kv_channels", "attention_head_dim", "qk_head_dim", "v_head_dim", "qk_nope_head_dim",
                "qk_rope_head_dim", "global_head_dim", "q_lora_rank", "kv_lora_rank")
_HEAD_COUNT_FIELDS = ("num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads",
                      "num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num")
# Shrink levels tried in order: everything, then keep the head geometry, then also the head counts
# (some architectures tie head sizes to each other in ways a generic shrink cannot know).
# The second level also sizes Mamba-2 style mixers (heads * head_dim == expand * hidden_size).
# The last level also fills size fields a default config leaves as None.
LEVELS = (((), False), ((), True), (_HEAD_FIELDS, False), (_HEAD_FIELDS + _HEAD_COUNT_FIELDS, False), ((), "fill"))
_FILL = ("head_dim", "num_key_value_heads", "n_routed_experts", "num_experts_per_tok")
MAX_PARAMS = 100_000_000


def _shrink(config, depth=0, keep=(), mamba=False):
    for name, value in _SIZES.items():
        if name in keep:
            continue
        try:
            current = getattr(config, name, None)
        except Exception:  # noqa: BLE001 (e.g. a per-layer attribute that has no global value)
            continue
        if isinstance(current, bool) or not isinstance(current, int) or current <= 0:
            continue
        if name in ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num") and current == 1:
            continue  # multi-query attention stays multi-query
        try:
            setattr(config, name, value)
        except Exception:
            pass
    for name in _PER_LAYER:
        try:
            current = getattr(config, name, None)
        except Exception:  # noqa: BLE001
            continue
        if isinstance(current, (list, tuple)) and len(current) > LAYERS:
            try:
                setattr(config, name, type(current)(current[:LAYERS]))
            except Exception:
                pass
        elif isinstance(current, str) and len(current) > LAYERS:
            setattr(config, name, current[:LAYERS])
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        try:
            current = getattr(config, name, None)
        except Exception:  # noqa: BLE001
            continue
        if isinstance(current, int) and current >= VOCAB:
            setattr(config, name, min(current, VOCAB - 1) if name != "pad_token_id" else 0)
    if mamba == "fill":
        for name in _FILL:
            if name in vars(config) and getattr(config, name) is None:
                setattr(config, name, _SIZES[name])
    try:
        if getattr(config, "n_routed_experts", None) and getattr(config, "num_experts_per_tok", 0) is None:
            config.num_experts_per_tok = 2  # DeepSeek-V2's default config leaves it unset
        # Multi-head latent attention (DeepSeek-V2/V3 style) expands its latent K/V to every query head
        if getattr(config, "kv_lora_rank", None) and isinstance(getattr(config, "num_attention_heads", None), int):
            config.num_key_value_heads = config.num_attention_heads
    except Exception:  # noqa: BLE001 (e.g. per-layer attributes without a global value)
        pass
    # Mamba-2 style mixers need heads * head_dim == expand * hidden_size
    for heads, dim, expand in (("num_heads", "head_dim", "expand"), ("mamba_n_heads", "mamba_d_head", "mamba_expand")):
        if mamba is not True:
            break
        try:
            e, d, h = getattr(config, expand, None), getattr(config, dim, None), getattr(config, "hidden_size", None)
        except Exception:  # noqa: BLE001
            continue
        if all(isinstance(v, int) and not isinstance(v, bool) for v in (e, h)) and hasattr(config, heads):
            try:
                setattr(config, dim, HEAD_DIM)
                setattr(config, heads, e * h // HEAD_DIM)
                for groups in ("n_groups", "mamba_n_groups"):
                    if hasattr(config, groups):
                        setattr(config, groups, 1)
            except Exception:  # noqa: BLE001
                pass
    for flag in ("use_cache",):
        if hasattr(config, flag):
            setattr(config, flag, False)
    if hasattr(config, "attention_dropout"):
        config.attention_dropout = 0.0
    if depth < 3:
        for sub in _sub_configs(config):
            _shrink(sub, depth + 1, keep, mamba)


# Float config fields that may transform the logits (or feed a transform): moved off their default
# so that a transform dpo_fast does not apply shows up as a difference, not as a no-op at 1.0.
_TRANSFORM_FIELD = re.compile(r"logit|multiplier|softcap|soft_cap")
PERTURB = 1.37


def _perturb(config, depth=0):
    for name in list(vars(config)):
        if not _TRANSFORM_FIELD.search(name):
            continue
        try:
            value = getattr(config, name)
            if isinstance(value, float) and math.isfinite(value) and value > 0:
                setattr(config, name, value * PERTURB)
        except Exception:  # noqa: BLE001
            pass
    if depth < 3:
        for sub in _sub_configs(config):
            _perturb(sub, depth + 1)


def build_config(model_type: str, keep=(), mamba=False):
    from transformers import AutoConfig

    try:
        config = AutoConfig.for_model(model_type)
    except Exception as e:  # noqa: BLE001
        raise NotBuildable(f"config cannot be built: {type(e).__name__}: {str(e)[:160]}") from None
    _shrink(config, keep=keep, mamba=mamba)
    _perturb(config)
    for name in ("_attn_implementation",):
        try:
            config._attn_implementation = "eager"
        except Exception:  # noqa: BLE001
            pass
    return config


def build_tiny(model_type: str, seed: int = 0):
    """A tiny random ``*ForCausalLM`` of ``model_type`` in fp32, eval mode, logits of |z| ~ 10-30."""
    import transformers

    class_name = swept()[model_type]
    cls = getattr(transformers, class_name, None)
    if cls is None:
        raise NotBuildable(f"transformers has no class {class_name} (needs an extra package?)")
    failures = []
    for (keep, mamba), text_only in [(level, False) for level in LEVELS] + [(LEVELS[0], True)]:
        torch.manual_seed(seed)
        try:
            config = build_config(model_type, keep, mamba)
            if text_only:  # composite configs whose *ForCausalLM takes the text part
                get_text = getattr(config, "get_text_config", None)
                if not callable(get_text) or get_text() is config:
                    break
                config = get_text()
            n_params = _count_params(cls, config)
            if n_params > MAX_PARAMS:
                raise NotBuildable(f"the shrunk model still has {n_params / 1e6:.0f}M parameters "
                                   "(its size fields are not the usual ones)")
            model = cls._from_config(config, dtype=DTYPE)
            model = model.to(DTYPE).eval()
            _scale_head(model)
            return model
        except NotBuildable as e:
            failures.append(str(e))
        except Exception as e:  # noqa: BLE001
            failures.append(f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
    raise NotBuildable(f"no tiny random model could be built and run: {failures[0]}")


def _count_params(cls, config) -> int:
    """Parameters of the model, counted on the meta device (no memory, no init) when it can be built there."""
    try:
        with torch.device("meta"):
            model = cls._from_config(config, dtype=DTYPE)
    except Exception:  # noqa: BLE001 - counted on the real build instead
        return 0
    return sum(p.numel() for p in model.parameters())


def vocab_of(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def batch(model, seed=0, B=2, T=10):
    V = min(vocab_of(model), VOCAB)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    attention = torch.ones(B, T, dtype=torch.long)
    attention[1, 7:] = 0  # right padding
    completion = torch.zeros(B, T, dtype=torch.long)
    completion[0, 3:] = 1
    completion[1, 2:7] = 1
    return ids, attention, completion


@torch.no_grad()
def _scale_head(model):
    """Scale the lm_head (untied copy if tied) so the model's max |logit| is about 20."""
    head = model.get_output_embeddings()
    ids, attention, _ = batch(model)
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
    peak = float(logits.abs().max())
    if not math.isfinite(peak) or peak == 0:
        raise NotBuildable(f"random model gives non-finite or zero logits (max |z| = {peak})")
    input_emb = model.get_input_embeddings()
    if input_emb is not None and getattr(input_emb, "weight", None) is head.weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone())  # untie: scaling must not touch the inputs
    factor = 20.0 / peak
    for _ in range(4):
        head.weight.mul_(factor)
        if getattr(head, "bias", None) is not None:
            head.bias.mul_(factor)
        peak = float(model(input_ids=ids, attention_mask=attention, use_cache=False).logits.abs().max())
        if 10.0 <= peak <= 30.0 or peak == 0 or not math.isfinite(peak):
            break
        factor = 20.0 / peak


def compare(model, impl="torch") -> tuple[float, float]:
    """``(max |completion_logps - oracle|, max |logit|)`` on one padded batch, fp32."""
    from dpo_fast.integrations.hf import completion_logps
    from dpo_fast.reference import reference_logits_logprobs

    ids, attention, completion = batch(model)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
        labels = ids[:, 1:].masked_fill(completion[:, 1:] == 0, -100)
        expected = torch.zeros(ids.shape, dtype=torch.float32)
        expected[:, :-1] = reference_logits_logprobs(logits[:, :-1], labels)
        got = completion_logps(model, ids, attention, completion, impl=impl)
    return float((got - expected).abs().max()), float(logits.abs().max())
