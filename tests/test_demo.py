"""`dpo-fast demo` end to end (tiny model, few steps) and the synthetic task it runs on.

Held-out criterion: after 12 DPO steps the implicit reward ``beta * (log pi - log pi_ref)``
must rank the chosen completion first on at least 65% of 512 held-out pairs. Under the null
(no learning) the accuracy is Binomial(512, 0.5)/512, sd 0.022, so 0.65 is ~7 sd above chance;
seeds are fixed, so the run is deterministic (observed ~0.8).
"""
import json
import math

import pytest

from dpo_fast.cli import main
from dpo_fast.synthetic import (NEGATIVE, POSITIVE, build_tokenizer, make_preference_rows, make_sft_rows, true_reward)

HELDOUT_MIN_ACCURACY = 0.65


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    pytest.importorskip("matplotlib", reason="the demo plots with matplotlib")
    out = tmp_path_factory.mktemp("demo")
    args = ["demo", "--model-size", "tiny", "--vocab-size", "256", "--steps", "12", "--sft-steps", "40",
            "--frontier-betas", "1.0", "--lr", "3e-3", "--out", str(out), "--no-progress"]
    return main(args), out


def test_demo_runs_end_to_end(demo_run, capsys):
    rc, out = demo_run
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    png = (out / "frontier.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (out / "ref_logps.sqlite").exists() and (out / "reference_model" / "config.json").exists()
    history = result["history"]
    assert [h["step"] for h in history] == list(range(1, 13))
    assert history[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at step 1
    assert all(math.isfinite(h["loss"]) and h["tokens_per_s"] > 0 for h in history)
    assert history[-1]["loss"] < history[0]["loss"]
    # fused vs standard trainer on the same steps: the same losses, both measured
    cmp = result["comparison"]
    assert cmp["max_loss_diff"] < 1e-5
    for name in ("fused", "standard"):
        assert cmp[name]["median_step_s"] > 0 and cmp[name]["peak_extra_bytes"] >= 0
    # frontier: both betas at every checkpoint, KL >= 0 up to Monte-Carlo noise
    betas = sorted({p["beta"] for p in result["frontier"]})
    assert betas == [0.1, 1.0]
    assert all(p["kl"] > -0.5 for p in result["frontier"])
    assert result["reference_point"]["kl"] == 0.0


def test_demo_heldout_accuracy_is_a_real_signal(demo_run):
    _, out = demo_run
    result = json.loads((out / "results.json").read_text())
    assert result["heldout_accuracy"] >= HELDOUT_MIN_ACCURACY, result["heldout_accuracy"]
    assert result["heldout_margin"] > 0
    # DPO moved the policy toward higher true reward than the reference's own samples
    last = [p for p in result["frontier"] if p["step"] == 12]
    assert max(p["reward"] for p in last) > result["reference_point"]["reward"] + 0.05


def test_demo_prints_the_live_table_and_summary(tmp_path, capsys):
    from dpo_fast.demo import DemoConfig, run

    run(DemoConfig(model_size="tiny", vocab_size=128, steps=2, sft_steps=2, frontier_betas=(), train_pairs=64,
                   heldout_pairs=32, eval_prompts=4, samples_per_prompt=1, compare_steps=1, checkpoints=1,
                   out=str(tmp_path), progress=False))
    text = capsys.readouterr().out
    for needle in ("step", "loss", "reward acc", "margin", "tokens/s", "held-out implicit-reward accuracy",
                   "fused", "standard", "peak", "KL(pi||ref)", "frontier.png"):
        assert needle in text, needle


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss_type="nope"), "loss_type must be one of"),
    (dict(loss_type="simpo"), "reference-free"),
    (dict(model_size="huge"), "model_size must be one of"),
    (dict(steps=0), "steps must be a positive int"),
    (dict(beta=-1.0), "beta values must be finite numbers > 0"),
    (dict(frontier_betas=(0.1, float("nan"))), "beta values must be finite numbers > 0"),
])
def test_demo_bad_config(kwargs, match):
    from dpo_fast.demo import DemoConfig

    with pytest.raises(ValueError, match=match):
        DemoConfig(**kwargs)


def test_demo_cli_rejects_bad_arguments(tmp_path, capsys):
    assert main(["demo", "--frontier-betas", "0.1,x", "--out", str(tmp_path)]) == 2
    assert "dpo-fast demo: error: --frontier-betas must be comma-separated numbers" in capsys.readouterr().err
    assert main(["demo", "--loss-type", "dpo", "--out", str(tmp_path)]) == 2
    assert "dpo-fast demo: error: loss_type must be one of" in capsys.readouterr().err


# ---------------------------------------------------------------------- the synthetic task

def test_task_is_deterministic_and_labelled_by_the_true_reward():
    rows = make_preference_rows(300, seed=7)
    assert rows == make_preference_rows(300, seed=7)
    assert rows != make_preference_rows(300, seed=8)
    for r in rows:
        assert r["chosen_reward"] == true_reward(r["chosen"].split()) > r["rejected_reward"] \
            == true_reward(r["rejected"].split())
    assert make_sft_rows(10, 1) == make_sft_rows(10, 1)


def test_true_reward_is_the_mean_word_sentiment():
    assert true_reward(["great", "movie", "bad"]) == pytest.approx((1.0 + 0.0 - 0.5) / 3)
    assert true_reward([]) == 0.0
    assert true_reward(["</s>"]) == 0.0
    assert all(v > 0 for v in POSITIVE.values()) and all(v < 0 for v in NEGATIVE.values())


def test_tokenizer_is_local_and_word_level():
    tok = build_tokenizer(300)
    assert len(tok) == 300 and tok.eos_token == "</s>" and tok.pad_token_id == 0
    row = make_preference_rows(1, 0)[0]
    ids = tok(row["prompt"] + row["chosen"] + tok.eos_token)["input_ids"]
    assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(ids[:-1]) == (row["prompt"] + row["chosen"]).split()
    with pytest.raises(ValueError, match="vocab_size must be >="):
        build_tokenizer(10)


def test_sampled_completions_stop_at_eos():
    import torch

    from dpo_fast.demo import sample_completions
    from dpo_fast.synthetic import build_model

    tok = build_tokenizer(128)
    model = build_model(tok, "tiny", seed=0)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] *= 30.0  # EOS very likely: short completions
    prompts = [tok("the plot was")["input_ids"], tok("sadly the film is")["input_ids"]]
    pairs = sample_completions(model, prompts, n=3, max_new_tokens=6, eos_id=tok.eos_token_id,
                               pad_id=tok.pad_token_id, seed=0)
    assert [p for p, _ in pairs] == [prompts[0]] * 3 + [prompts[1]] * 3
    for _, c in pairs:
        assert 1 <= len(c) <= 6
        assert tok.eos_token_id not in c[:-1]
    assert pairs == sample_completions(model, prompts, n=3, max_new_tokens=6, eos_id=tok.eos_token_id,
                                       pad_id=tok.pad_token_id, seed=0)


def test_last_logits_are_the_models_own():
    import torch

    from dpo_fast.demo import last_logits
    from dpo_fast.synthetic import build_model

    tok = build_tokenizer(128)
    model = build_model(tok, "tiny", seed=1)
    x = torch.randint(4, 60, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(last_logits(model, x), model(input_ids=x).logits[:, -1].float())
