"""The whole DPO step with shared prompts and packing, on a realistic length distribution.

Providers (one optimizer step each: forward of every pair's chosen and rejected completion,
sigmoid DPO loss against cached reference log-probs, backward, AdamW):

* ``trl-padded``: TRL 1.16 ``DPOTrainer`` as shipped (``padding_free`` is disabled for DPO in
  TRL 1.16: it pads), ``precompute_ref_log_probs=True``;
* ``dpo_fast-padded``: :class:`dpo_fast.trainer.StandardTrainer`, ``packing=None``;
* ``dpo_fast-shared``: ``packing="shared_prompt"`` (one ``[prompt|chosen|rejected]`` row per pair);
* ``dpo_fast-packed``: ``packing="shared_prompt_packed"`` (those rows packed, first-fit
  decreasing, no row longer than the batch's longest pair row).

Model: the demo's ``small`` Llama (:func:`dpo_fast.synthetic.build_model`, hidden 64, 2 layers,
vocabulary 8192, eager attention, float32), with ``max_position_embeddings`` raised to cover
the lengths below. Every provider starts from the same weights; reference log-probs come from
a second model (seed 1), so the losses are not the trivial log 2 of policy == reference.

Length distribution (:func:`length_rows`, a generator shipped with its parameters): token
counts are log-normal, ``round(exp(N(log median, sigma)))`` clipped to ``[lo, hi]``:
prompt median 192 (sigma 0.6, 8..768), chosen and rejected drawn independently with median 160
(sigma 0.8, 4..768), ``max_length`` 1024 with ``keep_start`` (TRL's default). This mimics chat
preference data (prompts of a few hundred tokens, completions of widely varying length); the
parameters are chosen, not fitted to a dataset. Token ids are uniform over the vocabulary
(the step's cost does not depend on them), written as words of the synthetic word-level
tokenizer so that TRL tokenises the same rows to the same ids. Each timed round runs ``STEPS_CACHED`` optimizer steps on the
same batches of ``PAIRS`` pairs (so every round does the same work); every provider sees the
same pairs in the same order.

Recorded per provider (``extra_info``): ``trunk_tokens_per_pair`` (positions the trunk runs
over, padding included, per pair), ``real_tokens_per_pair`` (without padding), the loss of
the first step (before any update, the same batch for all), and the peak memory.
Before timing, each provider's first-step loss must equal ``dpo_fast-padded``'s to 1e-5
relative (else the test fails: a wrong provider's timings mean nothing).
"""
import math
import random
import tempfile

import pytest

PAIRS = {"cpu": 8, "gpu": 32, "smoke": 2}
STEPS_CACHED = {"cpu": 2, "gpu": 4, "smoke": 1}  # optimizer steps per timed round (the same batches each round)
VOCAB = 8192
MAX_LENGTH = {"cpu": 1024, "gpu": 1024, "smoke": 64}
# (median, sigma, lo, hi) of the log-normal token counts; "smoke" scales them down for CI.
LENGTHS = {
    "cpu": dict(prompt=(192, 0.6, 8, 768), completion=(160, 0.8, 4, 768)),
    "smoke": dict(prompt=(12, 0.6, 2, 24), completion=(10, 0.8, 1, 24)),
}
LENGTHS["gpu"] = LENGTHS["cpu"]
PROVIDERS = ["trl-padded", "dpo_fast-padded", "dpo_fast-shared", "dpo_fast-packed"]
PACKING = {"dpo_fast-padded": None, "dpo_fast-shared": "shared_prompt", "dpo_fast-packed": "shared_prompt_packed"}
NOTES = {
    "trl-padded": "trl.DPOTrainer 1.16 as shipped (pads: padding_free is disabled for DPO), precompute_ref_log_probs",
    "dpo_fast-padded": "dpo_fast StandardTrainer(packing=None): [prompt|chosen] and [prompt|rejected] rows, padded",
    "dpo_fast-shared": "StandardTrainer(packing='shared_prompt'): one [prompt|chosen|rejected] row per pair, 4-D mask",
    "dpo_fast-packed": "StandardTrainer(packing='shared_prompt_packed'): pair rows packed (first-fit decreasing, "
                       "capacity = longest pair row), block-diagonal 4-D mask",
}


def _lognormal(rng, median, sigma, lo, hi):
    return int(min(hi, max(lo, round(math.exp(rng.gauss(math.log(median), sigma))))))


def length_rows(n, size="cpu", seed=0, tokenizer=None):
    """``n`` text preference rows with log-normal token counts (see the module docstring).

    Words are drawn uniformly from the word-level vocabulary of :func:`dpo_fast.synthetic.build_tokenizer`
    (special tokens excluded), so each word is one token: TRL-style tokenisation (EOS appended
    to the completions) gives exactly the drawn counts, plus the EOS.
    """
    from dpo_fast import synthetic

    tokenizer = tokenizer or synthetic.build_tokenizer(vocab_size=VOCAB)
    words = tokenizer.convert_ids_to_tokens(list(range(len(synthetic.SPECIAL_TOKENS), len(tokenizer))))
    rng = random.Random(f"packing-bench-{seed}")
    p, c = LENGTHS[size]["prompt"], LENGTHS[size]["completion"]
    text = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    return [{"prompt": text(_lognormal(rng, *p)), "chosen": " " + text(_lognormal(rng, *c)),
             "rejected": " " + text(_lognormal(rng, *c))} for _ in range(n)]


def _missing():
    for mod, pip in (("trl", "trl==1.16.0"), ("datasets", "datasets"), ("transformers", "transformers")):
        try:
            __import__(mod)
        except ImportError:
            return f"{mod} is not installed (pip install {pip})"
    return None


def _models(size, device):
    from dpo_fast import synthetic

    tokenizer = synthetic.build_tokenizer(vocab_size=VOCAB)
    policy = synthetic.build_model(tokenizer, "small", seed=0)
    reference = synthetic.build_model(tokenizer, "small", seed=1)
    for m in (policy, reference):
        m.config.max_position_embeddings = 2 * MAX_LENGTH[size]
    return tokenizer, policy.to(device), reference.to(device).eval()


def _dpo_fast_step_fn(provider, size, device, rows):
    from dpo_fast.data import tokenize_rows
    from dpo_fast.trainer import ReferenceTable, StandardTrainer, TrainerConfig

    tokenizer, model, ref = _models(size, device)
    examples, _ = tokenize_rows(rows, tokenizer, max_length=MAX_LENGTH[size])
    table = ReferenceTable.from_model(ref, examples, impl="auto", batch_size=PAIRS[size],
                                      pad_token_id=tokenizer.pad_token_id, max_length=MAX_LENGTH[size])
    config = TrainerConfig(batch_size=PAIRS[size], learning_rate=1e-4, beta=0.1, loss_type="sigmoid", impl="auto",
                           max_length=MAX_LENGTH[size], shuffle=False, seed=0, packing=PACKING[provider])
    trainer = StandardTrainer(model, examples, config, pad_token_id=tokenizer.pad_token_id, ref_cache=table)
    batches = [examples[i * PAIRS[size]:(i + 1) * PAIRS[size]] for i in range(STEPS_CACHED[size])]
    first_loss = float(trainer.micro_batch(batches[0])[0].detach())
    trunk, real = [], []
    for b in batches:
        collated = trainer.collate(b)
        if config.packing is None:
            trunk.append(collated["input_ids"].numel())
            real.append(int(collated["attention_mask"].sum()))
        else:
            from dpo_fast.integrations.packing import build_layout

            layout = build_layout(collated["input_ids"], collated["attention_mask"], collated["completion_mask"],
                                  packing=config.packing)
            trunk.append(layout.forwarded)
            real.append(layout.tokens)

    def step():
        for examples in batches:
            trainer.train_step([examples])

    return step, batches, trunk, real, first_loss, model


def _trl_step_fn(size, device, rows, tmp):
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tokenizer, model, ref = _models(size, device)
    args = DPOConfig(output_dir=tmp, per_device_train_batch_size=PAIRS[size], learning_rate=1e-4,
                     precompute_ref_log_probs=True, precompute_ref_batch_size=PAIRS[size], beta=0.1,
                     loss_type=["sigmoid"], report_to=[], save_strategy="no", logging_steps=10**9, disable_tqdm=True,
                     use_cpu=device.type == "cpu", dataloader_num_workers=0, max_length=MAX_LENGTH[size], seed=0,
                     bf16=False, fp16=False)
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop, bypassed to time single steps
    data = trainer.train_dataset
    batches = []
    for i in range(STEPS_CACHED[size]):
        features = [data[j] for j in range(i * PAIRS[size], (i + 1) * PAIRS[size])]  # the same pairs, in order
        batch = trainer.data_collator(features)
        batches.append({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    with torch.no_grad():
        trainer.model.train()
        first_loss = float(trainer.compute_loss(trainer.model, batches[0]))
    trunk = [b["input_ids"].numel() for b in batches]
    real = [int(b["attention_mask"].sum()) for b in batches]

    def step():
        for batch in batches:
            trainer.model.train()
            trainer.training_step(trainer.model, batch)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)

    return step, batches, trunk, real, first_loss, trainer.model


class _Shape:
    def __init__(self, size, tokens, hidden, vocab):
        self.model, self.tokens, self.hidden, self.vocab = "synthetic-llama-small", tokens, hidden, vocab
        self.softcap, self.scale, self.series = None, 1, ()
        self.name, self.id = self.model, f"{self.model}-lognormal-{size}"


_FIRST_LOSS = {}


@pytest.mark.parametrize("provider_name", PROVIDERS)
def test_packing_step(benchmark, harness, provider_name, request):
    request.node.user_properties.append(("provider", provider_name))
    reason = _missing()
    if reason:
        pytest.skip(f"{provider_name}: {reason}")
    size = harness.size if harness.enabled else "smoke"  # --benchmark-disable: one tiny step
    rows = length_rows(PAIRS[size] * STEPS_CACHED[size], size)
    with tempfile.TemporaryDirectory() as tmp:
        if provider_name == "trl-padded":
            step, batches, trunk, real, first_loss, model = _trl_step_fn(size, harness.device, rows, tmp)
        else:
            step, batches, trunk, real, first_loss, model = _dpo_fast_step_fn(provider_name, size, harness.device,
                                                                              rows)
        if provider_name == "dpo_fast-padded":
            _FIRST_LOSS[size] = first_loss
        else:  # the padded dpo_fast loss is the yardstick (computed here if that test did not run first)
            if size not in _FIRST_LOSS:
                _FIRST_LOSS[size] = _dpo_fast_step_fn("dpo_fast-padded", size, harness.device, rows)[4]
            ref_loss = _FIRST_LOSS[size]
            if not abs(first_loss - ref_loss) <= 1e-5 * abs(ref_loss):
                pytest.fail(f"{provider_name}: first-step loss {first_loss!r} differs from dpo_fast-padded's "
                            f"{ref_loss!r} by more than 1e-5 relative")
        assert abs(first_loss - math.log(2)) > 1e-3, "reference == policy: the loss comparison would have no teeth"
        pairs = PAIRS[size] * len(batches)
        shape = _Shape(size, int(sum(trunk) / len(trunk)), model.config.hidden_size, model.config.vocab_size)

        class _P:
            name, note = provider_name, NOTES[provider_name]

        harness.run(benchmark, bench="packing_step", provider=_P, shape=shape, target=step,
                    setup=lambda: (),
                    extra={"what": f"{len(batches)} optimizer steps of {PAIRS[size]} pairs each (log-normal lengths), "
                                   "sigmoid DPO loss on cached reference log-probs, backward, AdamW",
                           "pairs": pairs, "steps_per_round": len(batches), "params": sum(p.numel() for p in model.parameters()),
                           "trunk_tokens_per_pair": sum(trunk) / pairs, "real_tokens_per_pair": sum(real) / pairs,
                           "first_step_loss": first_loss, "max_length": MAX_LENGTH[size],
                           "dtype": str(next(model.parameters()).dtype).replace("torch.", "")})
