"""packing= through the trainer, dpo-fast verify, the reference pass and dpo-fast precompute."""
import copy

import pytest
import torch

pytest.importorskip("transformers")

from dpo_fast.cache import RefLogpsCache  # noqa: E402
from dpo_fast.cli import main  # noqa: E402
from dpo_fast.data import tokenize_rows  # noqa: E402
from dpo_fast.integrations.packing import PackingUnsupportedError  # noqa: E402
from dpo_fast.precompute import precompute  # noqa: E402
from dpo_fast.synthetic import build_model, build_tokenizer, make_preference_rows  # noqa: E402
from dpo_fast.trainer import StandardTrainer, TrainerConfig, verify  # noqa: E402
from tests._models import make_rows, tiny_model_dir, write_jsonl  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
MODES = ("shared_prompt", "shared_prompt_packed")


@pytest.mark.parametrize("packing", MODES)
def test_verify_with_packing_matches_the_padded_oracle(packing):
    report = verify(2, packing=packing)
    assert report.ok, report.format()
    assert report.packing == packing and f"packing={packing}" in report.format()
    assert report.max_loss_diff <= 1e-5 and report.max_param_change > 100 * report.max_param_diff


def test_verify_cli_packing(capsys):
    assert main(["verify", "--steps", "1", "--packing", "shared_prompt_packed"]) == 0
    out = capsys.readouterr().out
    assert "packing=shared_prompt_packed" in out and "PASS" in out


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_trainer_packing_equals_padded_and_forwards_fewer_tokens():
    tokenizer = build_tokenizer(128)
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in make_preference_rows(12, 1)]
    examples, _ = tokenize_rows(rows, tokenizer)
    base = build_model(tokenizer, "tiny", seed=4)
    runs = {}
    for packing in (None,) + MODES:
        for ref in ("table", "ref_model"):
            model = copy.deepcopy(base)
            kw = {"ref_model": copy.deepcopy(base).eval()} if ref == "ref_model" else {}
            cfg = TrainerConfig(learning_rate=1e-3, batch_size=6, seed=0)
            trainer = StandardTrainer(model, examples, cfg, pad_token_id=tokenizer.pad_token_id, packing=packing, **kw)
            assert trainer.config.packing == packing
            runs[packing, ref] = (trainer.train(2), _params(model))
    base_records, base_params = runs[None, "table"]
    for key, (records, params) in runs.items():
        for a, b in zip(base_records, records):
            assert abs(a.loss - b.loss) <= 1e-5 * max(1.0, abs(a.loss)), key
            for name, value in a.metrics.items():
                assert abs(value - b.metrics[name]) <= 1e-5 * max(1.0, abs(value)), (key, name)
        assert max(float((base_params[n] - params[n]).abs().max()) for n in params) < 1e-5, key
        if key[0] is not None:  # each prompt once, no padding between pairs
            assert all(b.tokens < a.tokens for a, b in zip(base_records, records)), key


def test_bad_packing_config_and_unsupported_model():
    with pytest.raises(ValueError, match="packing must be"):
        TrainerConfig(packing="pack")
    with pytest.raises(ValueError, match="packing needs the fused path"):
        TrainerConfig(packing="shared_prompt", impl="reference")
    import transformers as T

    tokenizer = build_tokenizer(128)
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in make_preference_rows(4, 2)]
    mpt = T.MptForCausalLM(T.MptConfig(vocab_size=len(tokenizer), d_model=32, n_layers=1, n_heads=4))
    with pytest.raises(PackingUnsupportedError, match="MptForCausalLM.*packing=None"):
        StandardTrainer(mpt, rows, TrainerConfig(packing="shared_prompt_packed"), tokenizer=tokenizer)


def _entries(path):
    with RefLogpsCache.open(path) as cache:
        return cache.fingerprint, {e.key: e for e in cache.entries()}


def test_precompute_with_and_without_packing_is_interchangeable(tmp_path):
    rows = make_rows(24, seed=5)
    data = str(write_jsonl(tmp_path / "prefs.jsonl", rows))
    model = tiny_model_dir()
    plain, packed, mixed = (str(tmp_path / f"{n}.sqlite") for n in ("plain", "packed", "mixed"))
    common = dict(batch_size=4, max_length=12, device="cpu", progress=False)
    precompute(model, data, plain, **common)
    assert main(["precompute", "--model", model, "--dataset", data, "--cache", packed, "--batch-size", "4",
                 "--max-length", "12", "--device", "cpu", "--no-progress", "--packing", "shared_prompt_packed"]) == 0
    # half the dataset padded, then the rest with shared prompts, into the same cache
    half = precompute(model, str(write_jsonl(tmp_path / "half.jsonl", rows[:12])), mixed, **common)
    summary = precompute(model, data, mixed, packing="shared_prompt", **common)
    assert summary.already_cached == half.unique > 0 and summary.computed == summary.unique - half.unique > 0
    fp_plain, a = _entries(plain)
    for path in (packed, mixed):
        fp, b = _entries(path)
        assert fp == fp_plain, "the fingerprint must not depend on packing"
        assert set(a) == set(b)
        for key, e in a.items():
            f = b[key]
            assert (e.chosen_tokens, e.rejected_tokens, e.truncated) == (f.chosen_tokens, f.rejected_tokens, f.truncated)
            for x, y in ((e.chosen_logps, f.chosen_logps), (e.rejected_logps, f.rejected_logps)):
                assert abs(x - y) <= 1e-5 * abs(x), (x, y)
    # a trainer with packing reads the padded cache (and vice versa: the keys and values are the same)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    examples, _ = tokenize_rows(rows, tok, max_length=12)
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    trainer = StandardTrainer(policy, examples, TrainerConfig(batch_size=4, max_length=12), tokenizer=tok,
                              ref_cache=packed, packing="shared_prompt_packed")
    assert torch.isfinite(torch.tensor(trainer.train_step().loss))


@pytest.mark.parametrize("packing", ["shared_prompt_packed"])  # "shared_prompt" is the same code with one pair per row
def test_trl_fused_dpo_trainer_with_packing_matches_padded(packing, tmp_path):
    pytest.importorskip("trl")
    from dpo_fast.integrations import trl as fused_trl
    from tests.test_trl_integration import _assert_same, _train

    # Plain SGD: AdamW divides by sqrt(v), which turns float32 rounding differences of near-zero
    # gradients (the prompt's two gradient copies are summed in another order) into ~1e-5
    # parameter differences; SGD keeps the parameter check a check of the gradients.
    opts = dict(optim="sgd", learning_rate=0.5)
    _, *expected = _train(fused_trl.FusedDPOTrainer, tmp_path, **opts)
    trainer, *got = _train(fused_trl.FusedDPOTrainer, tmp_path, trainer_kwargs={"packing": packing}, **opts)
    assert trainer.model._dpo_fast_packing == packing and trainer.ref_model._dpo_fast_packing == packing
    _assert_same(expected, got)  # every logged metric (loss, rewards, logps, entropy, accuracy) and the parameters
    start = build_model(build_tokenizer(128), "tiny")
    moved = max(float((p.detach() - got[1][n]).abs().max()) for n, p in start.named_parameters() if n in got[1])
    assert moved > 1e-3  # training moved the weights far beyond the tolerance


def test_trl_packing_refuses_inputs_it_does_not_handle():
    pytest.importorskip("trl")
    from dpo_fast.integrations import trl as fused_trl

    tokenizer = build_tokenizer(128)
    model = build_model(tokenizer, "tiny")
    fused_trl.add_fused_lm_head(model, packing="shared_prompt")
    ids = torch.randint(4, 100, (4, 6))
    labels = ids.masked_fill(torch.arange(6) < 3, -100)
    with pytest.raises(ValueError, match="shift_labels.*packing=None"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), shift_labels=labels, fused_lm_head=True)
    with pytest.raises(ValueError, match="position_ids"):
        model(input_ids=ids, position_ids=torch.arange(6)[None], labels=labels, fused_lm_head=True)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, fused_lm_head=True)
    assert out.log_probs.shape == (4, 5)
    with pytest.raises(ValueError, match="packing must be"):
        fused_trl.add_fused_lm_head(build_model(tokenizer, "tiny"), packing="yes")
