"""End-to-end DPO training step on a small Hugging Face model (a randomly initialised Llama
from :mod:`dpo_fast.synthetic` with a large vocabulary, so that the lm_head dominates as it
does in real models):

* ``trl``: TRL's ``DPOTrainer`` as shipped (its own chunked fused lm_head),
* ``trl+dpo_fast``: the same ``DPOTrainer`` after ``dpo_fast.integrations.trl.patch()``,
* ``dpo_fast-trainer``: :class:`dpo_fast.trainer.StandardTrainer`.

All three read cached reference log-probs (TRL ``precompute_ref_log_probs=True``; the
dpo_fast trainer a :class:`~dpo_fast.trainer.ReferenceTable` computed before timing), run
the same pairs, batch size, AdamW and learning rate, and one step = forward of chosen +
rejected, sigmoid DPO loss, backward, optimizer step. Both trainers also compute their
logged per-token metrics (entropy, mean logits, token accuracy), as in real training.
"""
import itertools
import tempfile

import pytest

PAIRS_PER_STEP = {"cpu": 8, "gpu": 32, "smoke": 2}
VOCAB = {"cpu": 16000, "gpu": 128256, "smoke": 4096}
MODEL_SIZE = "base"
STEPS_CACHED = 4  # distinct batches rotated through


def _missing():
    for mod, pip in (("trl", "trl==1.16.0"), ("datasets", "datasets"), ("transformers", "transformers")):
        try:
            __import__(mod)
        except ImportError:
            return f"{mod} is not installed (pip install {pip})"
    for mod in ("dpo_fast.trainer", "dpo_fast.integrations.trl", "dpo_fast.synthetic"):
        try:
            __import__(mod)
        except ImportError as e:
            return f"{mod} is not available: {e}"
    return None


PROVIDERS = ["trl", "trl+dpo_fast", "dpo_fast-trainer"]
NOTES = {
    "trl": "trl.DPOTrainer as shipped (TRL's chunked fused lm_head), precompute_ref_log_probs=True",
    "trl+dpo_fast": "trl.DPOTrainer after dpo_fast.integrations.trl.patch(impl='auto'), precompute_ref_log_probs=True",
    "dpo_fast-trainer": "dpo_fast.trainer.StandardTrainer(impl='auto') with a precomputed ReferenceTable",
}


class _Shape:
    def __init__(self, size, tokens, hidden, vocab):
        self.model, self.tokens, self.hidden, self.vocab = f"synthetic-llama-{MODEL_SIZE}", tokens, hidden, vocab
        self.softcap, self.scale, self.series = None, 1, ()
        self.name, self.id = self.model, f"{self.model}-V{vocab}"


def _setup_data(size):
    from dpo_fast import synthetic

    tokenizer = synthetic.build_tokenizer(vocab_size=VOCAB[size])
    rows = synthetic.make_preference_rows(PAIRS_PER_STEP[size] * STEPS_CACHED, seed=0)
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    return tokenizer, rows


def _build_model(tokenizer, device):
    from dpo_fast import synthetic

    return synthetic.build_model(tokenizer, MODEL_SIZE, seed=0).to(device)


def _trl_step_fn(provider, tokenizer, rows, device, size, tmp):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from dpo_fast.integrations import trl as dpo_trl

    model = _build_model(tokenizer, device)
    args = DPOConfig(output_dir=tmp, per_device_train_batch_size=PAIRS_PER_STEP[size], learning_rate=1e-4,
                     precompute_ref_log_probs=True, beta=0.1, loss_type=["sigmoid"], report_to=[],
                     save_strategy="no", logging_steps=10**9, disable_tqdm=True, use_cpu=device.type == "cpu",
                     dataloader_num_workers=0, max_length=64, seed=0, bf16=False, fp16=False)
    if provider == "trl+dpo_fast":
        dpo_trl.patch(impl="auto")
    try:
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer)
    finally:
        if provider == "trl+dpo_fast":
            dpo_trl.unpatch()
    trainer.create_optimizer()
    # set by Trainer's own training loop, which is bypassed here to time single steps
    trainer.current_gradient_accumulation_steps = 1
    batches = list(itertools.islice(iter(trainer.get_train_dataloader()), STEPS_CACHED))
    tokens = [int(b["attention_mask"].sum()) for b in batches]

    def step(batch):
        trainer.model.train()
        trainer.training_step(trainer.model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step, batches, tokens, trainer.model


def _dpo_fast_step_fn(tokenizer, rows, device, size):
    from dpo_fast.trainer import ReferenceTable, StandardTrainer, TrainerConfig

    model = _build_model(tokenizer, device)
    config = TrainerConfig(batch_size=PAIRS_PER_STEP[size], learning_rate=1e-4, beta=0.1, loss_type="sigmoid",
                           impl="auto", max_length=64, shuffle=False, seed=0)
    trainer = StandardTrainer(model, rows, config, tokenizer=tokenizer)
    assert isinstance(trainer.ref_table, ReferenceTable)  # computed once, before timing
    batches = [trainer.next_examples(config.batch_size) for _ in range(STEPS_CACHED)]
    tokens = [int(trainer.collate(b)["attention_mask"].sum()) for b in batches]

    def step(examples):
        trainer.train_step([examples])

    return step, batches, tokens, model


@pytest.mark.parametrize("provider_name", PROVIDERS)
def test_train_step(benchmark, harness, provider_name, request):
    request.node.user_properties.append(("provider", provider_name))
    reason = _missing()
    if reason:
        pytest.skip(f"{provider_name}: {reason}")
    size = harness.size if harness.enabled else "smoke"  # --benchmark-disable: one tiny step
    tokenizer, rows = _setup_data(size)
    with tempfile.TemporaryDirectory() as tmp:
        if provider_name == "dpo_fast-trainer":
            step, batches, tokens, model = _dpo_fast_step_fn(tokenizer, rows, harness.device, size)
        else:
            step, batches, tokens, model = _trl_step_fn(provider_name, tokenizer, rows, harness.device, size, tmp)
        order = itertools.cycle(range(len(batches)))
        shape = _Shape(size, int(sum(tokens) / len(tokens)), model.config.hidden_size, model.config.vocab_size)

        class _P:
            name, note = provider_name, NOTES[provider_name]

        harness.run(benchmark, bench="train_step", provider=_P, shape=shape, target=step,
                    setup=lambda: (batches[next(order)],),
                    extra={"what": f"one optimizer step: {PAIRS_PER_STEP[size]} pairs, forward chosen+rejected, "
                                   "sigmoid DPO loss on cached reference log-probs, backward, AdamW",
                           "pairs": PAIRS_PER_STEP[size], "params": sum(p.numel() for p in model.parameters()),
                           "dtype": str(next(model.parameters()).dtype).replace("torch.", "")})
