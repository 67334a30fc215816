"""Every architecture of transformers' causal-LM auto mapping against its own logits (issue 10, defect 7).

For each ``model_type`` of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (plus MuseSpark and MuseGlimmer,
which transform their logits in their own way), a tiny random model is built offline
(:mod:`tests._arch_sweep`: sizes shrunk, logit-transform config fields moved off their defaults,
lm_head scaled so that max |logit| is about 20) and ``completion_logps`` is compared with a
float32 ``log_softmax`` of the model's own logits (1e-5). Every entry of the mapping is in
exactly one of:

- tested: matches (CI runs all but ``SLOW``, which run under ``-m slow``);
- ``REFUSED``: the head is not ``transform(lm_head(backbone(x)))`` with a transform dpo_fast
  knows; ``check_lm_head_spec`` (run once by the trainers and the TRL integration) raises a
  ValueError naming the model type, so these are never trained with wrong log-probs;
- ``NOT_BUILDABLE``: no tiny random model can be built offline by the generic shrink (the
  reason is the error it gives); re-checked under ``-m slow``.

Fixed by this sweep: ``muse_spark``/``muse_glimmer`` (``output_multiplier`` multiplies the
logits before the softcap), ``llama4``/``llama4_text``/``mllama`` (their ``base_model`` is the
model itself: the backbone is found through ``get_decoder()`` / ``.model``).
"""
import pytest
import torch

pytest.importorskip("transformers")

from dpo_fast.integrations.hf import check_lm_head_once, check_lm_head_spec, lm_head_spec  # noqa: E402
from tests import _arch_sweep as sweep  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

_HEAD_TRANSFORM = "prediction-head transform (dense + activation + LayerNorm) between the backbone and the lm_head"
_HEAD_WIDTH = "the lm_head takes a projected hidden state of another width (embedding_size), not the backbone output"
REFUSED = {
    "bert": _HEAD_TRANSFORM, "big_bird": _HEAD_TRANSFORM, "camembert": _HEAD_TRANSFORM,
    "data2vec-text": _HEAD_TRANSFORM, "ernie": _HEAD_TRANSFORM, "megatron-bert": _HEAD_TRANSFORM,
    "modernbert-decoder": _HEAD_TRANSFORM, "roberta": _HEAD_TRANSFORM, "roberta-prelayernorm": _HEAD_TRANSFORM,
    "roc_bert": _HEAD_TRANSFORM, "xlm-roberta": _HEAD_TRANSFORM, "xlm-roberta-xl": _HEAD_TRANSFORM,
    "prophetnet": "ProphetNet decoder: the lm_head reads the main stream of an n-stream decoder, not last_hidden_state",
    "electra": _HEAD_WIDTH, "rembert": _HEAD_WIDTH, "roformer": _HEAD_WIDTH,
}

_SHRINK = "the generic shrink breaks an architecture-specific size constraint"
_CONFIG = "the default config cannot be instantiated as a model offline"
NOT_BUILDABLE = {
    "blt": f"{_SHRINK} (byte-latent patcher/encoder widths): size mismatch 32 vs 64",
    "xlstm": f"{_SHRINK} (mLSTM projection widths): size mismatch 4096 vs 32",
    "zamba2": f"{_SHRINK} (Mamba-2 mixer inside shared attention blocks): reshape of 1280 elements",
    "gemma4": f"{_SHRINK}: per-layer configs keep their default sizes (134M parameters after the shrink)",
    "gemma4_text": f"{_SHRINK}: per-layer configs keep their default sizes (134M parameters after the shrink)",
    "gemma3n_text": f"{_SHRINK}: KV-sharing layer types no longer match after cutting the layers",
    "gemma4_unified_assistant": f"{_SHRINK}: KV-sharing layer types no longer match after cutting the layers",
    "cohere_compass_text": f"{_SHRINK}: layer_types name 'full_attention' the model has no mask for (KeyError)",
    "gemma3n": "needs the extra package timm (TimmWrapperModel vision tower)",
    "gemma4_assistant": f"{_CONFIG}: config validation requires hidden_size_per_layer_input == 0",
    "dbrx": f"{_CONFIG}: DbrxAttentionConfig has no rope_theta",
    "lfm2_moe": f"{_CONFIG}: a per-layer field is None (NoneType not subscriptable)",
    "dots1": f"{_CONFIG}: a size field is None (torch.empty with None)",
    "musicgen": "not a plain decoder: the composite config has no top-level decoder fields (no attribute 'dropout')",
    "musicgen_melody": "not a plain decoder: the composite config has no top-level decoder fields (no attribute 'dropout')",
    "reformer": "not decoder-style by default: ReformerModelWithLMHead needs is_decoder=True",
    "xmod": "needs a language adapter chosen first (XmodPreTrainedModel.set_default_language)",
}

# Slowest to build and run on a 2-core CPU (5-40 s each): run with -m slow (the full sweep).
SLOW = {"afmoe", "axk1", "bailing_hybrid", "dots3_note", "dots3_note_text", "falcon_h1", "glm4_moe_lite", "hrm_text",
        "hy_v4", "jamba", "kimi_linear", "nemotron_h"}
FIXED = {"muse_spark", "muse_glimmer", "llama4", "llama4_text", "mllama"}
TESTED = sorted(set(sweep.swept()) - set(REFUSED) - set(NOT_BUILDABLE))


def test_every_mapping_entry_is_tested_refused_or_listed_with_a_reason():
    mapping = set(sweep.causal_lm_mapping())
    assert set(sweep.EXTRA) <= set(sweep.swept()) and mapping <= set(sweep.swept())
    for table in (REFUSED, NOT_BUILDABLE):
        stale = set(table) - set(sweep.swept())
        assert not stale, f"entries no longer in transformers' mapping: {sorted(stale)}"
        assert all(isinstance(reason, str) and len(reason) > 10 for reason in table.values())
    assert not set(REFUSED) & set(NOT_BUILDABLE)
    assert set(TESTED) | set(REFUSED) | set(NOT_BUILDABLE) == set(sweep.swept())
    assert SLOW <= set(TESTED) and FIXED <= set(TESTED)
    print(f"\nswept {len(sweep.swept())} architectures ({len(mapping)} in the causal-LM mapping + {len(sweep.EXTRA)}): "
          f"{len(TESTED)} tested ({len(FIXED)} fixed), {len(REFUSED)} refused by check_lm_head_spec, "
          f"{len(NOT_BUILDABLE)} not buildable offline")


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


@pytest.mark.parametrize("model_type", _params(TESTED))
def test_completion_logps_match_the_models_own_logits(model_type):
    model = sweep.build_tiny(model_type)
    diff, peak = sweep.compare(model)
    assert 10.0 <= peak <= 30.0, f"{model_type}: max |logit| {peak:.3g} is outside the realistic range"
    assert diff <= 1e-5, f"{model_type}: completion_logps differ from the model's own logits by {diff:.3g}"
    check_lm_head_spec(model)  # and the guard does not refuse a supported architecture


@pytest.mark.parametrize("model_type", _params(sorted(REFUSED)))
def test_unsupported_heads_are_refused_naming_the_model_type(model_type):
    model = sweep.build_tiny(model_type)
    with pytest.raises(ValueError) as err:
        check_lm_head_spec(model)
    assert repr(sweep.build_config(model_type).model_type) in str(err.value) or model_type in str(err.value)
    with pytest.raises(ValueError, match="does not support"):
        check_lm_head_once(model)
    with pytest.raises(ValueError, match="does not support"):  # not remembered as checked after a failure
        check_lm_head_once(model)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(NOT_BUILDABLE))
def test_not_buildable_entries_are_still_not_buildable(model_type):
    with pytest.raises(sweep.NotBuildable):
        sweep.build_tiny(model_type)


@pytest.mark.parametrize("model_type", ["muse_spark", "muse_glimmer"])
def test_output_multiplier_is_part_of_the_head_transform(model_type):
    model = sweep.build_tiny(model_type)
    text = model.config.get_text_config()
    assert text.output_multiplier != 1.0 and text.final_logit_softcapping is not None
    spec = lm_head_spec(model)
    assert spec.logit_scale == pytest.approx(text.output_multiplier)
    assert spec.softcap == pytest.approx(text.final_logit_softcapping)


def test_trainers_run_the_head_check_once(monkeypatch):
    """StandardTrainer and the TRL head refuse an unsupported head before any training; the check
    runs once per model object."""
    from dpo_fast.data import PreferenceExample
    from dpo_fast.integrations import hf
    from dpo_fast.trainer import StandardTrainer, TrainerConfig

    examples = [PreferenceExample((1, 2), (3, 4), (5, 6))]
    bert = sweep.build_tiny("bert")
    with pytest.raises(ValueError, match="model_type='bert'"):
        StandardTrainer(bert, examples, TrainerConfig(batch_size=1), pad_token_id=0)
    trl = pytest.importorskip("dpo_fast.integrations.trl", exc_type=ImportError)
    with pytest.raises(ValueError, match="model_type='bert'"):
        trl.add_fused_lm_head(bert)

    calls = []
    real = hf.check_lm_head_spec
    monkeypatch.setattr(hf, "check_lm_head_spec", lambda m, *a, **k: calls.append(1) or real(m, *a, **k))
    llama = sweep.build_tiny("llama")
    for _ in range(3):
        check_lm_head_once(llama)
    trl.add_fused_lm_head(llama)
    assert calls == [1]
