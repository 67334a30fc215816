"""TRL parity: DPOTrainer with dpo_fast's fused head trains exactly like unpatched TRL.

Each case trains a tiny randomly initialised Llama (float32, CPU) for 2 optimizer steps on a
small synthetic preference dataset twice, from the same seed: once with TRL 1.16's own
DPOTrainer, once with dpo_fast's (:class:`FusedDPOTrainer`, or ``patch()``). Every logged
value (loss, grad_norm, rewards/*, logps/*, logits/*, entropy, mean_token_accuracy, ...) and
every parameter after training must agree to float32 accuracy. Both runs compute the same
math in a different order (TRL: chunked logits; dpo_fast: blockwise online log-sum-exp), so
the agreement is rounding-level, not bitwise: logged values to 2e-5 relative, parameters to
2e-6 absolute after Adam steps of size lr=1e-3 (3e-5 against TRL 1.15, see PARAM_ATOL).
"""
import copy
import math

import pytest

trl = pytest.importorskip("trl", reason="TRL is an optional extra (pip install 'dpo_fast[trl]'); parity tests skipped")
datasets = pytest.importorskip("datasets", reason="TRL needs the datasets package")

from dpo_fast.integrations import trl as fused_trl  # noqa: E402

if not (fused_trl._MIN <= fused_trl._version_tuple(trl.__version__)[:3] < fused_trl._MAX_EXCLUSIVE):
    pytest.skip(f"TRL {trl.__version__} is outside the supported range {fused_trl.SUPPORTED_TRL}",
                allow_module_level=True)

import torch  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from dpo_fast.synthetic import build_model, build_tokenizer, make_preference_rows  # noqa: E402

LOSS_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
LABEL_SMOOTHING = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1, "aot_unpaired": 0.1}
LOG_RTOL, LOG_ATOL, PARAM_ATOL = 2e-5, 1e-6, 2e-6
if fused_trl._version_tuple(trl.__version__) < (1, 16, 0):
    # TRL 1.15 runs its own Triton kernels even on CPU (the interpreter here); unpatched TRL 1.15
    # and unpatched TRL 1.16 already differ by 1.2e-5 in a parameter after these 2 steps, while
    # dpo_fast's side is bitwise the same under both versions.
    PARAM_ATOL = 3e-5


def _rows(n=8, seed=0):
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in make_preference_rows(n, seed)]


def _model(tokenizer, seed=0):
    model = build_model(tokenizer, "tiny", seed=seed)
    with torch.no_grad():
        # Make EOS the argmax at some positions so that mean_token_accuracy (is_top1) is not
        # trivially 0 on a random model.
        model.lm_head.weight[tokenizer.eos_token_id] *= 4.0
    return model


def _args(tmp_path, **overrides):
    kw = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
              logging_steps=1, report_to="none", use_cpu=True, seed=0, save_strategy="no", disable_tqdm=True,
              bf16=False, max_length=64)
    kw.update(overrides)
    return DPOConfig(**kw)


def _train(trainer_cls, tmp_path, *, with_ref=True, trainer_kwargs=None, model=None, tokenizer=None, ref_model=None,
           **overrides):
    tokenizer = tokenizer or build_tokenizer(128)
    model = model if model is not None else _model(tokenizer)
    kwargs = dict(trainer_kwargs or {})
    if with_ref:
        kwargs["ref_model"] = ref_model if ref_model is not None else copy.deepcopy(model)
    trainer = trainer_cls(model=model, args=_args(tmp_path, **overrides),
                          train_dataset=datasets.Dataset.from_list(_rows()), processing_class=tokenizer, **kwargs)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return trainer, logs, params


def _assert_same(expected, got):
    exp_logs, exp_params = expected
    got_logs, got_params = got
    assert len(exp_logs) == len(got_logs) == 2
    for step, (a, b) in enumerate(zip(exp_logs, got_logs), 1):
        assert set(a) == set(b), f"step {step}: logged keys differ: {set(a) ^ set(b)}"
        for key, value in a.items():
            assert math.isclose(value, b[key], rel_tol=LOG_RTOL, abs_tol=LOG_ATOL), \
                f"step {step}: {key} = {b[key]} with dpo_fast, {value} with TRL"
    assert set(exp_params) == set(got_params)
    worst = max(float((exp_params[n] - got_params[n]).abs().max()) for n in exp_params)
    assert worst <= PARAM_ATOL, f"parameters differ by up to {worst:.3g} after 2 steps"


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory):
    return tmp_path_factory.mktemp("trl")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_parity_every_loss_type(loss_type, tmp_module):
    overrides = dict(loss_type=[loss_type], label_smoothing=LABEL_SMOOTHING.get(loss_type, 0.0))
    _, *expected = _train(DPOTrainer, tmp_module, **overrides)
    trainer, *got = _train(fused_trl.FusedDPOTrainer, tmp_module, **overrides)
    assert getattr(trainer.model, "_dpo_fast_fused_head", None) == "auto"
    assert getattr(trainer.ref_model, "_dpo_fast_fused_head", None) == "auto"
    _assert_same(expected, got)
    if loss_type == "sigmoid":  # the metrics that read is_top1 / mean_logits / entropy are live, not zeros
        logs = got[0]
        assert any(0 < h["mean_token_accuracy"] < 1 for h in logs)
        assert all(h["entropy"] > 0 and h["logits/chosen"] != 0 for h in logs)


@pytest.mark.parametrize("overrides", [
    dict(loss_type=["sigmoid", "sft"], loss_weights=[0.8, 0.2]),             # MPO-style mixture
    dict(loss_type=["sigmoid"], use_weighting=True),                          # WPO: log_sum_sq_probs
    dict(loss_type=["sigmoid"], f_divergence_type="js_divergence"),
    dict(loss_type=["sigmoid"], ld_alpha=0.5),
    dict(loss_type=["sigmoid"], gradient_accumulation_steps=2, per_device_train_batch_size=2),
], ids=["mpo", "wpo", "js_divergence", "ld_alpha", "grad_accum"])
def test_parity_trainer_options(overrides, tmp_module):
    _, *expected = _train(DPOTrainer, tmp_module, **overrides)
    _, *got = _train(fused_trl.FusedDPOTrainer, tmp_module, **overrides)
    _assert_same(expected, got)


def test_patch_makes_plain_dpotrainer_use_dpo_fast(tmp_module):
    _, *expected = _train(DPOTrainer, tmp_module)
    fused_trl.patch()
    try:
        assert fused_trl.is_patched()
        trainer, *got = _train(DPOTrainer, tmp_module)
    finally:
        fused_trl.unpatch()
    assert not fused_trl.is_patched()
    assert trainer.model._dpo_fast_fused_head == "auto"
    _assert_same(expected, got)
    trainer, *_ = _train(DPOTrainer, tmp_module)
    assert not hasattr(trainer.model, "_dpo_fast_fused_head")


def test_parity_with_peft_lora(tmp_module):
    peft = pytest.importorskip("peft", reason="peft not installed")
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    _, *expected = _train(DPOTrainer, tmp_module, with_ref=False,
                          trainer_kwargs=dict(peft_config=peft.LoraConfig(**config)), learning_rate=1e-2)
    trainer, *got = _train(fused_trl.FusedDPOTrainer, tmp_module, with_ref=False,
                           trainer_kwargs=dict(peft_config=peft.LoraConfig(**config)), learning_rate=1e-2)
    assert trainer.model.get_base_model()._dpo_fast_fused_head == "auto"
    assert any("lora_" in n for n in got[1])
    _assert_same(expected, got)


def test_reference_logps_from_the_dpo_fast_cache(tmp_path):
    """Reference log-probs read from a `dpo-fast precompute` cache, no reference model: same run.

    The reference differs from the initial policy (another seed), so that no reward is tied at
    0 at the first step (a tie would make rewards/accuracies depend on rounding noise).
    """
    from dpo_fast.precompute import precompute

    tokenizer = build_tokenizer(128)
    reference, model = _model(tokenizer, seed=1), _model(tokenizer, seed=0)
    folder = tmp_path / "ref_model"
    reference.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cache = tmp_path / "ref.sqlite"
    precompute(str(folder), _rows(), str(cache), batch_size=4, max_length=64, progress=False)

    _, *expected = _train(DPOTrainer, tmp_path, model=copy.deepcopy(model), tokenizer=tokenizer, ref_model=reference)
    trainer, *got = _train(fused_trl.FusedDPOTrainer, tmp_path, model=model, tokenizer=tokenizer, with_ref=False,
                           trainer_kwargs=dict(ref_logps_cache=str(cache)))
    assert trainer.ref_model is None
    assert "ref_chosen_logps" in trainer.train_dataset.column_names
    _assert_same(expected, got)


def test_cache_for_another_truncation_is_rejected(tmp_path):
    from dpo_fast.cache import StaleCacheError
    from dpo_fast.precompute import precompute

    tokenizer = build_tokenizer(128)
    model = _model(tokenizer)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    cache = tmp_path / "ref.sqlite"
    precompute(str(tmp_path / "m"), _rows(), str(cache), batch_size=4, max_length=None, progress=False)
    with pytest.raises(StaleCacheError, match="max_length"):
        fused_trl.FusedDPOTrainer(model=model, args=_args(tmp_path, max_length=64),
                                  train_dataset=datasets.Dataset.from_list(_rows()), processing_class=tokenizer,
                                  ref_logps_cache=str(cache))
    with pytest.raises(ValueError, match="either ref_model or ref_logps_cache"):
        fused_trl.FusedDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=_args(tmp_path, max_length=None),
                                  train_dataset=datasets.Dataset.from_list(_rows()), processing_class=tokenizer,
                                  ref_logps_cache=str(cache))


def test_missing_cache_rows_are_an_error(tmp_path):
    from dpo_fast.precompute import precompute

    tokenizer = build_tokenizer(128)
    model = _model(tokenizer)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    cache = tmp_path / "ref.sqlite"
    precompute(str(tmp_path / "m"), _rows()[:4], str(cache), batch_size=4, max_length=64, progress=False)
    with pytest.raises(KeyError, match="4 of 8 examples are not in the cache"):
        fused_trl.FusedDPOTrainer(model=model, args=_args(tmp_path), train_dataset=datasets.Dataset.from_list(_rows()),
                                  processing_class=tokenizer, ref_logps_cache=str(cache))


@pytest.mark.parametrize("version", ["1.14.2", "1.17.0", "0.19.1", "2.0.0"])
def test_unsupported_trl_versions_name_the_range(version):
    with pytest.raises(ImportError, match=r"supports TRL >=1\.15\.0,<1\.17.*" + version.replace(".", r"\.")):
        fused_trl.check_trl_version(version)
    assert fused_trl.check_trl_version("1.15.0") == "1.15.0"
    assert fused_trl.check_trl_version("1.16.0") == "1.16.0"


def test_model_without_output_embedding_is_a_clear_error():
    from transformers import LlamaConfig, LlamaModel

    backbone = LlamaModel(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="no output embedding"):
        fused_trl.add_fused_lm_head(backbone)


def test_fused_head_contract_matches_trl_head():
    """The patched forward returns the same FusedCausalLMOutput fields as TRL's own head,
    for plain labels and pre-shifted shift_labels, and leaves the ordinary forward alone."""
    from trl.trainer.utils import add_fused_lm_head as trl_add

    tokenizer = build_tokenizer(128)
    ours, theirs = _model(tokenizer), _model(tokenizer)
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    fused_trl.add_fused_lm_head(ours, outputs=outputs, temperature=0.7)
    trl_add(theirs, outputs=outputs, temperature=0.7)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 60, (3, 9), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    labels[2, :] = -100  # a row with nothing to score
    for kw in (dict(labels=labels), dict(shift_labels=labels)):
        a = ours(input_ids=ids, fused_lm_head=True, **kw)
        b = theirs(input_ids=ids, fused_lm_head=True, **kw)
        for name in outputs + ("label_mask", "loss"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.shape == y.shape, name
            if x.dtype == torch.bool:
                assert torch.equal(x, y), name
            else:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=name)
        a.loss.backward()
    assert ours.lm_head.weight.grad is not None
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_bf16_autocast_stays_close_to_trl(tmp_module):
    """Under bf16 autocast both heads take bf16 operands; TRL rounds each logits tile to bf16,
    dpo_fast keeps them in float32, so the two agree to bf16 accuracy, not bitwise."""
    _, exp_logs, _ = _train(DPOTrainer, tmp_module, bf16=True)
    _, got_logs, got_params = _train(fused_trl.FusedDPOTrainer, tmp_module, bf16=True)
    assert all(p.dtype == torch.float32 for p in got_params.values())
    for a, b in zip(exp_logs, got_logs):
        for key in ("loss", "logps/chosen", "logps/rejected", "entropy", "grad_norm"):
            assert math.isclose(a[key], b[key], rel_tol=2e-2, abs_tol=1e-3), (key, a[key], b[key])


def _family(name):
    import transformers as tf

    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    if name == "gemma2":  # final_logit_softcapping
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(**common, head_dim=8, final_logit_softcapping=5.0))
    if name == "gpt2":  # tied embeddings, lm_head bias-free, backbone "transformer"
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                                eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    if name == "mixtral":  # MoE load-balancing aux loss in the fused forward
        return tf.MixtralForCausalLM(tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2,
                                                      output_router_logits=True, router_aux_loss_coef=0.02))
    if name == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    raise AssertionError(name)


@pytest.mark.parametrize("family", ["gemma2", "gpt2", "mixtral", "qwen2"])
def test_fused_head_contract_other_families(family):
    from trl.trainer.utils import add_fused_lm_head as trl_add

    torch.manual_seed(0)
    ours = _family(family)
    theirs = copy.deepcopy(ours)
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
    fused_trl.add_fused_lm_head(ours, outputs=outputs)
    trl_add(theirs, outputs=outputs)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, -3:] = 0
    labels = ids.masked_fill(attention_mask == 0, -100)
    labels[:, :3] = -100
    a = ours(input_ids=ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    b = theirs(input_ids=ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    for name in outputs + ("loss",) + (("aux_loss",) if family == "mixtral" else ()):
        x, y = getattr(a, name), getattr(b, name)
        if x.dtype == torch.bool:
            assert torch.equal(x, y), name
        else:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=name)
    a.loss.backward()
    b.loss.backward()
    for (n, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
