"""The standard trainer (dpo_fast.trainer): the oracle, `dpo-fast verify`, accumulation, references, bad input.

Tolerance of `verify` (float32, CPU, tiny Llama, 4 AdamW steps at lr 1e-3): |loss diff| <= 1e-5,
every metric <= 1e-4 (absolute; logps are sums of ~30 tokens), every parameter <= 1e-5 while
training moves parameters by ~4e-3. The fused and oracle paths differ only by float32 rounding
(blockwise online log-sum-exp vs a full log_softmax), which Adam can amplify for parameters
whose gradient is near 0; 1e-5 leaves a 5-10x margin over the observed ~1e-6.
"""
import copy

import pytest
import torch

from dpo_fast.cli import main
from dpo_fast.data import DatasetError, tokenize_rows
from dpo_fast.synthetic import build_model, build_tokenizer, make_preference_rows
from dpo_fast.trainer import (DEFAULT_TOLERANCE, ReferenceTable, StandardTrainer, TrainerConfig, token_outputs,
                              verify)

TEXT = ("prompt", "chosen", "rejected")


def _rows(n=16, seed=0):
    return [{k: r[k] for k in TEXT} for r in make_preference_rows(n, seed)]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(128)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _max_diff(a, b):
    return max(float((a[n] - b[n]).abs().max()) for n in a)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sft"])
def test_verify_fused_matches_the_oracle_within_tolerance(loss_type):
    report = verify(4, loss_type=loss_type)
    assert report.ok, report.format()
    assert report.max_loss_diff <= DEFAULT_TOLERANCE["loss"]
    assert report.max_param_diff <= DEFAULT_TOLERANCE["params"]
    assert report.max_param_change > 100 * report.max_param_diff  # training really moved the weights
    assert set(report.max_metric_diff) >= {"rewards/accuracies", "entropy", "mean_token_accuracy", "logits/chosen"}


def test_verify_triton_kernels_match_the_oracle():
    """The Triton kernels in the whole pipeline (the CPU interpreter here, compiled on CUDA)."""
    pytest.importorskip("triton", reason="triton not installed")
    from dpo_fast.ops import triton_available

    if not triton_available():
        pytest.skip("triton cannot run here (no CUDA and TRITON_INTERPRET unset)")
    report = verify(2, impl="triton")
    assert report.ok, report.format()


def test_verify_cli_prints_the_figures(capsys):
    assert main(["verify", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "max |loss diff|" in out and "max |parameter diff|" in out and "PASS" in out


@pytest.mark.parametrize("argv, message", [
    (["verify", "--steps", "0"], "--steps must be >= 1"),
    (["verify", "--beta", "-1"], "beta must be a finite number > 0"),
    (["example", "--pairs", "0"], "--pairs must be >= 1"),
])
def test_cli_user_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dpo-fast {argv[0]}: error: ") and message in err and "Traceback" not in err


def test_reference_impl_is_the_models_own_logits(tokenizer):
    """impl="reference" == log_softmax of model(...).logits written out here; fused == reference."""
    model = build_model(tokenizer, "tiny", seed=3)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] *= 4.0  # EOS is the argmax somewhere: is_top1 not all False
    examples, _ = tokenize_rows(_rows(4), tokenizer)
    from dpo_fast.data import collate_preference

    batch = collate_preference(examples, pad_token_id=tokenizer.pad_token_id)
    ref = token_outputs(model, batch, "reference")
    fused = token_outputs(model, batch, "torch")
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    lp = lp * batch["completion_mask"][:, 1:]
    torch.testing.assert_close(ref["log_probs"][:, :-1].double(), lp, rtol=1e-5, atol=1e-5)
    for name in ("log_probs", "entropy", "mean_logits"):
        torch.testing.assert_close(fused[name], ref[name], rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(fused["is_top1"], ref["is_top1"]) and bool(ref["is_top1"].any())


def test_gradient_accumulation_scales_the_loss_correctly(tokenizer):
    """8 pairs in one micro-batch == 4 x 2 == 2 x 4 (and 3 + 3 + 2 with uneven micro-batches)."""
    examples, _ = tokenize_rows(_rows(8), tokenizer)
    base = build_model(tokenizer, "tiny", seed=1)
    results = []
    for split in ([8], [4, 4], [2, 2, 2, 2], [3, 3, 2]):
        model = copy.deepcopy(base)
        trainer = StandardTrainer(model, examples, TrainerConfig(learning_rate=1e-3, batch_size=8, shuffle=False),
                                  pad_token_id=tokenizer.pad_token_id)
        records = []
        for _ in range(2):
            chunks, i = [], 0
            for n in split:
                chunks.append(examples[i:i + n])
                i += n
            records.append(trainer.train_step(chunks))
        results.append((records, _params(model)))
    (ref_records, ref_params), others = results[0], results[1:]
    for records, params in others:
        assert _max_diff(ref_params, params) < 1e-6
        for a, b in zip(ref_records, records):
            assert abs(a.loss - b.loss) < 1e-6
            for k, v in a.metrics.items():
                assert abs(v - b.metrics[k]) < 1e-5, k
    # and without the scaling (summing micro-batch means) the result would differ: the check has teeth
    assert abs(ref_records[1].loss - ref_records[0].loss) > 1e-4


def test_reference_sources_agree(tokenizer, tmp_path):
    """Initial-policy table (default) == frozen ref_model == dpo-fast precompute cache."""
    from dpo_fast.precompute import precompute

    rows = _rows(8)
    examples, _ = tokenize_rows(rows, tokenizer)
    base = build_model(tokenizer, "tiny", seed=2)
    folder = tmp_path / "ref"
    base.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cache = tmp_path / "ref.sqlite"
    precompute(str(folder), rows, str(cache), batch_size=4, progress=False)
    cfg = TrainerConfig(learning_rate=1e-3, batch_size=4, seed=0)
    runs = {}
    for name, kw in (("table", {}), ("ref_model", {"ref_model": copy.deepcopy(base).eval()}),
                     ("cache", {"ref_cache": str(cache)})):
        model = copy.deepcopy(base)
        trainer = StandardTrainer(model, examples, cfg, pad_token_id=tokenizer.pad_token_id, **kw)
        if name == "table":
            assert isinstance(trainer.ref_table, ReferenceTable)
        runs[name] = ([r.loss for r in trainer.train(2)], _params(model))
    for name in ("ref_model", "cache"):
        assert max(abs(a - b) for a, b in zip(runs["table"][0], runs[name][0])) < 1e-6, name
        assert _max_diff(runs["table"][1], runs[name][1]) < 1e-6, name


def test_cache_made_for_another_truncation_is_rejected(tokenizer, tmp_path):
    from dpo_fast.cache import StaleCacheError
    from dpo_fast.precompute import precompute

    rows = _rows(4)
    model = build_model(tokenizer, "tiny")
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    precompute(str(tmp_path / "m"), rows, str(tmp_path / "c.sqlite"), max_length=None, progress=False)
    with pytest.raises(StaleCacheError, match="max_length"):
        StandardTrainer(model, rows, TrainerConfig(max_length=8), tokenizer=tokenizer,
                        ref_cache=str(tmp_path / "c.sqlite"))
    with pytest.raises(KeyError, match="no entry for 4 of 8"):
        StandardTrainer(model, _rows(8)[4:] + rows, TrainerConfig(), tokenizer=tokenizer,
                        ref_cache=str(tmp_path / "c.sqlite"))


# ---------------------------------------------------------------------- bad input, each a clear error

def test_dataset_row_missing_a_column(tokenizer):
    rows = _rows(3)
    del rows[1]["rejected"]
    model = build_model(tokenizer, "tiny")
    with pytest.raises(DatasetError, match=r"row 1 is missing column\(s\) 'rejected'"):
        StandardTrainer(model, rows, tokenizer=tokenizer)


def test_empty_completion(tokenizer):
    rows = _rows(3)
    rows[2]["chosen"] = ""
    with pytest.raises(DatasetError, match="row 2: empty completion: column 'chosen'"):
        StandardTrainer(build_model(tokenizer, "tiny"), rows, tokenizer=tokenizer)


def test_model_without_output_embedding(tokenizer):
    from transformers import LlamaConfig, LlamaModel

    backbone = LlamaModel(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="has no output embedding"):
        StandardTrainer(backbone, _rows(2), tokenizer=tokenizer)


def test_tokenizer_without_eos(tokenizer):
    no_eos = copy.deepcopy(tokenizer)
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="has no EOS token"):
        StandardTrainer(build_model(tokenizer, "tiny"), _rows(2), tokenizer=no_eos)


def test_sequence_with_nothing_to_score_is_an_error(tokenizer):
    """A completion whose only token is the first of the sequence has no prefix to be scored from."""
    rows = [{"prompt": "", "chosen": "</s>", "rejected": " bad"}]
    trainer = StandardTrainer(build_model(tokenizer, "tiny"), rows, TrainerConfig(batch_size=1), tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"sequence\(s\) \[0\] of the batch have no completion token"):
        trainer.train_step()
    with pytest.raises(DatasetError, match="every example was dropped"):
        StandardTrainer(build_model(tokenizer, "tiny"), _rows(2), TrainerConfig(max_length=3), tokenizer=tokenizer)


@pytest.mark.parametrize("kwargs, match", [
    (dict(impl="fast"), "impl must be one of"),
    (dict(loss_type="dpo"), "unknown loss_type 'dpo'"),
    (dict(batch_size=0), "batch_size must be an int >= 1"),
    (dict(grad_accum_steps=1.5), "grad_accum_steps must be an int >= 1"),
    (dict(learning_rate=-1.0), "learning_rate must be a finite number > 0"),
    (dict(beta=0.0), "beta must be a finite number > 0"),
])
def test_bad_trainer_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainerConfig(**kwargs)


def test_bad_trainer_arguments(tokenizer):
    model = build_model(tokenizer, "tiny")
    with pytest.raises(ValueError, match="examples is empty"):
        StandardTrainer(model, [], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="either ref_cache or ref_model"):
        StandardTrainer(model, _rows(2), tokenizer=tokenizer, ref_cache="x", ref_model=model)
    examples, _ = tokenize_rows(_rows(2), tokenizer)
    with pytest.raises(ValueError, match="pass tokenizer= or pad_token_id="):
        StandardTrainer(model, examples)
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        StandardTrainer(model, examples, pad_token_id=0).train(-1)
