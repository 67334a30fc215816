"""dpo_fast.integrations.hf against each model's own logits, on tiny random configs (no downloads)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from dpo_fast.integrations.hf import (check_lm_head_spec, completion_logps, lm_head_spec,  # noqa: E402
                                      resolve_backbone, sequence_logps_from_model)
from dpo_fast.reference import reference_logits_logprobs  # noqa: E402

V = 96


pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)


def _families():
    T = transformers
    return {
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**COMMON)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**COMMON)),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**COMMON)),
        # softcap small enough that the tanh bites on these logits
        "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=1.5)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                       initializer_range=0.2, bos_token_id=1, eos_token_id=2)),
        "cohere_logit_scale": lambda: T.CohereForCausalLM(T.CohereConfig(**COMMON, logit_scale=0.5)),
        "granite_logits_scaling": lambda: T.GraniteForCausalLM(T.GraniteConfig(**COMMON, logits_scaling=4.0)),
    }


def _with_bias():
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))
    model.lm_head = torch.nn.Linear(32, V, bias=True)
    torch.nn.init.normal_(model.lm_head.bias, std=1.0)
    torch.nn.init.normal_(model.lm_head.weight, std=0.2)
    return model


def _batch(seed=0, B=3, T=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    attention = torch.ones(B, T, dtype=torch.long)
    attention[1, 8:] = 0          # right padding
    attention[2, 6:] = 0
    completion = torch.zeros(B, T, dtype=torch.long)
    completion[0, 4:] = 1
    completion[1, 3:8] = 1
    completion[2, 5:6] = 1         # a single completion token
    return ids, attention, completion


def _oracle(model, ids, attention, completion, temperature=1.0):
    """log_softmax of the model's own logits, gathered at the next token, completion positions only."""
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
    labels = ids[:, 1:].masked_fill(completion[:, 1:] == 0, -100)
    out = torch.zeros(ids.shape, dtype=torch.float32)
    out[:, :-1] = reference_logits_logprobs(logits[:, :-1], labels, temperature=temperature)
    return out


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", list(_families()) + ["lm_head_bias"])
def test_matches_model_logits_forward_and_backward(family):
    torch.manual_seed(0)
    model = _with_bias() if family == "lm_head_bias" else _families()[family]()
    model.eval()
    ids, attention, completion = _batch()
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(1))

    expected = _oracle(model, ids, attention, completion)
    (expected * weights).sum().backward()
    expected_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    got = completion_logps(model, ids, attention, completion)
    (got * weights).sum().backward()
    got_grads = _grads(model)

    assert got.shape == ids.shape and got.dtype == torch.float32
    assert (got[:, -1] == 0).all()
    scored = torch.zeros_like(completion, dtype=torch.bool)
    scored[:, :-1] = completion[:, 1:].bool()
    assert (got[~scored] == 0).all()
    assert (got[scored] < 0).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5)
    assert set(got_grads) == set(expected_grads)
    for name in expected_grads:
        torch.testing.assert_close(got_grads[name], expected_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_spec_fields():
    fam = _families()
    gemma = fam["gemma2"]()
    assert lm_head_spec(gemma).softcap == 1.5
    gpt2 = fam["gpt2"]()
    spec = lm_head_spec(gpt2)
    assert spec.weight is gpt2.transformer.wte.weight, "tied: the shared parameter, not a copy"
    assert resolve_backbone(gpt2) is gpt2.transformer
    assert lm_head_spec(fam["cohere_logit_scale"]()).logit_scale == 0.5
    assert lm_head_spec(fam["granite_logits_scaling"]()).logit_scale == 0.25
    assert lm_head_spec(_with_bias()).bias is not None
    for name in ("gemma2", "gpt2", "cohere_logit_scale", "granite_logits_scaling"):
        check_lm_head_spec(fam[name]())


def test_temperature_and_extra_outputs():
    model = _families()["qwen2"]().eval()
    ids, attention, completion = _batch(seed=3)
    got = completion_logps(model, ids, attention, completion, temperature=0.7,
                           outputs=("log_probs", "entropy"))
    assert set(got) == {"log_probs", "entropy"}
    torch.testing.assert_close(got["log_probs"], _oracle(model, ids, attention, completion, 0.7), rtol=1e-5, atol=2e-5)
    assert (got["entropy"][:, :-1][completion[:, 1:].bool()] > 0).all()


def test_sequence_logps_from_model():
    model = _families()["llama"]().eval()
    ids, attention, completion = _batch(seed=4)
    sums, counts = sequence_logps_from_model(model, ids, attention, completion)
    expected = _oracle(model, ids, attention, completion)
    torch.testing.assert_close(sums, expected.sum(-1), rtol=1e-5, atol=1e-4)
    assert counts.tolist() == completion[:, 1:].sum(-1).tolist() == [7, 5, 1]


def test_bf16_autocast_matches_model_under_autocast():
    model = _families()["llama"]().eval()
    ids, attention, completion = _batch(seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _oracle(model, ids, attention, completion)
        got = completion_logps(model, ids, attention, completion)
    scored = torch.zeros_like(completion, dtype=torch.bool)
    scored[:, :-1] = completion[:, 1:].bool()
    # Both use a bf16 lm_head matmul; the model rounds its logits to bf16, the fused path does not.
    torch.testing.assert_close(got[scored], expected[scored], rtol=0, atol=0.03)
    fp32 = completion_logps(model, ids, attention, completion)
    assert not torch.equal(got, fp32), "autocast must change the computation like it changes the model's"


def test_no_output_embedding_is_a_clear_error():
    backbone = transformers.LlamaModel(transformers.LlamaConfig(**COMMON))
    ids, attention, completion = _batch()
    with pytest.raises(ValueError, match="no output embedding"):
        completion_logps(backbone, ids, attention, completion)
    with pytest.raises(ValueError, match="no output embedding"):
        lm_head_spec(backbone)


def test_bad_masks_are_named():
    model = _families()["llama"]().eval()
    ids, attention, completion = _batch()
    with pytest.raises(ValueError, match="completion_mask"):
        completion_logps(model, ids, attention, completion[:, :-1])
    with pytest.raises(ValueError, match="attention_mask"):
        completion_logps(model, ids, attention[:2], completion)
    bad = completion.clone()
    bad[1, -1] = 1  # a completion token on padding
    with pytest.raises(ValueError, match="padding"):
        completion_logps(model, ids, attention, bad)
    with pytest.raises(ValueError, match="outputs"):
        completion_logps(model, ids, attention, completion, outputs=("nope",))


def test_unknown_logit_transform_is_detected():
    model = _families()["llama"]().eval()
    # Llama ignores this field, so the spec (which honours it) no longer matches the model's logits.
    model.config.final_logit_softcapping = 0.5
    with pytest.raises(ValueError, match="computes its logits differently"):
        check_lm_head_spec(model)


def test_peft_lora_model():
    peft = pytest.importorskip("peft", reason="peft is not installed")
    torch.manual_seed(0)
    model = _families()["llama"]()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      lora_dropout=0.0, init_lora_weights=False))
    lora.eval()
    ids, attention, completion = _batch(seed=6)
    expected = _oracle(lora, ids, attention, completion)
    got = completion_logps(lora, ids, attention, completion)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5)
    with lora.disable_adapter():
        base = completion_logps(lora, ids, attention, completion)
    assert not torch.allclose(base, got), "the adapter must be active in the fused path"
    got.sum().backward()
    lora_grads = [p.grad for n, p in lora.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)


def test_peft_lora_on_lm_head_is_refused():
    peft = pytest.importorskip("peft", reason="peft is not installed")
    model = _families()["llama"]()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
    ids, attention, completion = _batch()
    with pytest.raises(ValueError, match="LoRA adapter"):
        completion_logps(lora, ids, attention, completion)
