"""The standard DPO trainer: a short, readable training loop and the oracle for the whole pipeline.

One optimizer step::

    for each micro-batch (grad_accum_steps of them, batch_size pairs each):
        input_ids = [chosen rows; rejected rows]          # one forward for both (TRL's layout)
        per-token log p(next token) on completion positions
            impl="reference": model(...).logits -> float32 log_softmax -> gather   (full logits)
            otherwise:        backbone hidden states -> dpo_fast.linear_logprobs  (fused, no logits)
        sequence sums -> DPO loss against the reference sums
        (loss * pairs_in_micro_batch / pairs_in_step).backward()
    clip (optional) -> AdamW step

With equal micro-batches the scaling is ``1 / grad_accum_steps``; in general each micro-batch
is weighted by its share of the step's pairs, so the accumulated gradient is the gradient of
the mean over all pairs of the step, exactly as one big batch would give (for every loss type
whose loss is a mean of per-pair terms: all but ``aot``/``aot_unpaired``, which sort across the
batch, and ``sft``, a token mean). Metrics are computed over the whole step's pairs and tokens.

With ``TrainerConfig(packing="shared_prompt"|"shared_prompt_packed")`` the fused forward (and
the reference pass) runs each prompt once and packs the pairs
(:mod:`dpo_fast.integrations.packing`); the per-token outputs, and so everything after them,
are the same to fp32 rounding.

Tokenisation and collation are TRL's (:mod:`dpo_fast.data`). Reference log-probs come from a
dpo_fast cache (:mod:`dpo_fast.cache`), a reference model, or, by default, are computed once
from the initial policy before the first step (so no reference model stays in memory).

``impl="reference"`` is deliberately naive: it uses the model's own logits and
:func:`dpo_fast.reference.reference_dpo_loss`, sharing no code with the fused path beyond the
data pipeline. :func:`verify` (``dpo-fast verify``) runs both from the same seed on the same
batches and reports the largest divergence.
"""
from __future__ import annotations

import copy
import dataclasses
import random
import sys
import time
from dataclasses import dataclass, field

import torch

from . import reference
from .data import PreferenceExample, collate_preference, tokenize_rows
from .losses import LOSS_TYPES, dpo_loss
from .ops import IMPLS, check_impl

# Per-token outputs the trainer asks for: log-probs carry the gradient, the rest feed metrics.
TOKEN_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
METRIC_NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "entropy",
                "mean_token_accuracy")


@dataclass
class TrainerConfig:
    """Options of :class:`StandardTrainer` (names follow TRL's DPOConfig where they overlap)."""

    beta: float = 0.1
    loss_type: str | list = "sigmoid"
    loss_weights: list | None = None
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    discopop_tau: float = 0.05
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    batch_size: int = 8                 # pairs per micro-batch
    grad_accum_steps: int = 1           # micro-batches per optimizer step
    max_grad_norm: float | None = None
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    impl: str = "auto"                  # "reference" = full logits, else the fused path
    seed: int = 0
    shuffle: bool = True
    disable_dropout: bool = True
    # None: padded [prompt|chosen] and [prompt|rejected] rows; "shared_prompt": one
    # [prompt|chosen|rejected] row per pair; "shared_prompt_packed": those rows packed
    # (dpo_fast.integrations.packing). Same numbers, fewer trunk tokens.
    packing: str | None = None

    def __post_init__(self):
        check_trainer_config(self)

    @property
    def loss_types(self) -> list[str]:
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @property
    def reference_free(self) -> bool:
        return self.loss_types == ["simpo"]


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")


def check_trainer_config(c: TrainerConfig):
    """Reject every invalid :class:`TrainerConfig` field with an error naming it (run by ``__post_init__``)."""
    from .data import TRUNCATION_MODES
    from .options import check_loss_options, check_real

    check_loss_options(c.loss_type, c.loss_weights, c.beta, c.label_smoothing, c.simpo_gamma, c.discopop_tau)
    check_impl(c.impl)
    check_real("learning_rate", c.learning_rate, low=0.0, low_open=True)
    check_real("weight_decay", c.weight_decay, low=0.0)
    check_real("adam_eps", c.adam_eps, low=0.0, low_open=True)
    if not isinstance(c.adam_betas, (tuple, list)) or len(c.adam_betas) != 2:
        raise ValueError(f"adam_betas must be a pair (beta1, beta2), got {c.adam_betas!r}")
    for i, b in enumerate(c.adam_betas):
        check_real(f"adam_betas[{i}]", b, low=0.0, high=1.0, high_open=True)
    _check_int("batch_size", c.batch_size, 1)
    _check_int("grad_accum_steps", c.grad_accum_steps, 1)
    if c.max_grad_norm is not None:  # <= 0 would flip or zero the update; NaN would poison it
        check_real("max_grad_norm", c.max_grad_norm, low=0.0, low_open=True)
    if c.max_length is not None:
        _check_int("max_length", c.max_length, 2)
    if c.truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {c.truncation_mode!r}")
    _check_int("seed", c.seed, 0)
    for name in ("shuffle", "disable_dropout"):
        if not isinstance(getattr(c, name), bool):
            raise TypeError(f"{name} must be a bool, got {type(getattr(c, name)).__name__} {getattr(c, name)!r}")
    from .integrations.packing import check_packing

    check_packing(c.packing)
    if c.packing is not None and c.impl == "reference":
        raise ValueError("packing needs the fused path (impl != 'reference'); impl='reference' is the unshared "
                         "full-logits oracle")


@dataclass
class StepRecord:
    """What one optimizer step reports."""

    step: int
    loss: float
    metrics: dict
    pairs: int
    tokens: int                         # non-padding tokens forwarded
    seconds: float
    chosen_rewards: list = field(default_factory=list)
    rejected_rewards: list = field(default_factory=list)


def token_outputs(model, batch, impl, outputs=TOKEN_OUTPUTS, packing=None, layout=None):
    """Per-token outputs ``[N, T]`` of a collated batch: position t scores ``input_ids[:, t+1]``
    where ``completion_mask[:, t+1]``, 0 elsewhere (the last column is always 0).

    ``impl="reference"`` takes the model's own logits and runs a plain float32 log_softmax;
    any other impl runs the backbone and :func:`dpo_fast.integrations.hf.completion_logps`
    (:func:`dpo_fast.integrations.packing.packed_completion_logps` with ``packing``, over
    ``layout`` when given). Returns a dict keyed by ``outputs``.
    """
    input_ids, attention_mask, completion_mask = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    if packing is not None:
        from .integrations.packing import packed_completion_logps

        result = packed_completion_logps(model, input_ids, attention_mask, completion_mask, packing=packing,
                                         impl=impl, outputs=outputs, layout=layout)
        return result if isinstance(result, dict) else {"log_probs": result}
    if impl != "reference":
        from .integrations.hf import completion_logps

        result = completion_logps(model, input_ids, attention_mask, completion_mask, impl=impl, outputs=outputs)
        return result if isinstance(result, dict) else {"log_probs": result}
    from .integrations.hf import lm_head_spec

    lm_head_spec(model)  # the same clear error as the fused path for a model without an lm_head
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, -100)
    z = logits.to(reference.compute_dtype(logits.dtype))
    valid = labels != -100
    log_p = torch.log_softmax(z, dim=-1)
    result = {"log_probs": log_p.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid}
    with torch.no_grad():
        if "entropy" in outputs:
            result["entropy"] = -(log_p.exp() * log_p).sum(-1) * valid
        if "mean_logits" in outputs:
            result["mean_logits"] = z.mean(-1) * valid
        if "is_top1" in outputs:
            result["is_top1"] = (z.argmax(-1) == labels) & valid
        if "log_sum_sq_probs" in outputs:
            result["log_sum_sq_probs"] = torch.logsumexp(2 * log_p, -1) * valid
    return result


def sequence_sums(model, batch, impl, packing=None, layout=None):
    """``(chosen_sums [B], rejected_sums [B])`` of completion log-probs, without gradient (``layout``:
    the batch's packed layout when already built)."""
    with torch.no_grad():
        lp = token_outputs(model, batch, impl, outputs=("log_probs",), packing=packing,
                           layout=layout)["log_probs"].sum(-1)
    b = lp.shape[0] // 2
    return lp[:b], lp[b:]


def disable_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def data_parallel_group(model, data_parallel=None) -> tuple[int, int]:
    """``(rank, world)`` over which :class:`StandardTrainer` splits its batches; ``(0, 1)`` when not split."""
    if data_parallel is False or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        if data_parallel:
            raise ValueError("data_parallel=True needs an initialised torch.distributed process group")
        return 0, 1
    world = torch.distributed.get_world_size()
    if data_parallel is None:
        ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        fsdp = any(callable(getattr(m, "_get_fsdp_state", None)) for m in model.modules())
        if world == 1 or not (ddp or fsdp):
            return 0, 1
    return torch.distributed.get_rank(), world


def _gather_over_ranks(step_loss, all_stats):
    """The step loss summed and every micro-batch's statistics gathered over all ranks."""
    dist = torch.distributed
    mine = [{k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in s.items()} for s in all_stats]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (step_loss, mine))
    return sum(g[0] for g in gathered), [s for g in gathered for s in g[1]]


def reshard_fsdp(model):
    """Reshard every FSDP2 unit of ``model`` (a no-grad forward leaves the root unit unsharded,
    holding its full parameters, until a backward that never comes); no-op for other models."""
    for module in model.modules():
        if callable(getattr(module, "reshard", None)) and callable(getattr(module, "_get_fsdp_state", None)):
            module.reshard()


def model_device(model) -> torch.device:
    return next(model.parameters()).device


class ReferenceTable:
    """Reference sequence log-probs by example key, filled once from a frozen model."""

    def __init__(self):
        self.values: dict[bytes, tuple[float, float]] = {}

    @classmethod
    def from_model(cls, model, examples, *, impl, batch_size, pad_token_id, max_length=None,
                   truncation_mode="keep_start", packing=None):
        table = cls()
        was_training = model.training
        model.eval()
        device = model_device(model)
        try:
            for i in range(0, len(examples), batch_size):
                chunk = examples[i:i + batch_size]
                batch = collate_preference(chunk, pad_token_id=pad_token_id, max_length=max_length,
                                           truncation_mode=truncation_mode)
                batch = {k: v.to(device) for k, v in batch.items()}
                rc, rr = sequence_sums(model, batch, impl, packing)
                for ex, c, r in zip(chunk, rc.tolist(), rr.tolist()):
                    table.values[ex.key] = (c, r)
        finally:
            model.train(was_training)
            reshard_fsdp(model)
        return table

    def lookup(self, examples):
        missing = [i for i, ex in enumerate(examples) if ex.key not in self.values]
        if missing:
            raise KeyError(f"no reference log-probs for example(s) {missing[:8]} of this batch")
        pairs = [self.values[ex.key] for ex in examples]
        return torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])


def open_reference_cache(cache, examples, *, max_length, truncation_mode, model=None):
    """Open a dpo_fast cache (path or :class:`~dpo_fast.cache.RefLogpsCache`) for these examples.

    Checks every fingerprint field the trainer knows (else ``StaleCacheError`` naming them):
    truncation (``max_length``, ``truncation_mode``), plain sums (``ld_alpha=None``),
    ``temperature=1.0`` (the trainer's log-probs are untempered) and, given ``model``, the
    logit scale and softcap of its lm_head; and that it holds every example (else ``KeyError``
    with the count), before any training step.
    """
    from .cache import RefLogpsCache

    if not isinstance(cache, RefLogpsCache):
        cache = RefLogpsCache.open(cache)
    head = {}
    if model is not None:
        from .integrations.hf import lm_head_spec

        spec = lm_head_spec(model)
        head = dict(logit_scale=float(spec.logit_scale), softcap=None if spec.softcap is None else float(spec.softcap))
    cache.check(max_length=max_length, truncation_mode=truncation_mode, ld_alpha=None, temperature=1.0, **head)
    keys = [ex.key for ex in examples]
    present = cache.present(keys)
    missing = [i for i, k in enumerate(keys) if k not in present]
    if missing:
        raise KeyError(f"the reference cache {cache.path} has no entry for {len(missing)} of {len(keys)} training "
                       f"examples (e.g. example {missing[0]}); run `dpo-fast precompute` on this dataset")
    return cache


class StandardTrainer:
    """DPO on a Hugging Face causal LM with AdamW and gradient accumulation.

    Args:
        model: a transformers causal LM, trained in place.
        examples: tokenised :class:`~dpo_fast.data.PreferenceExample` list, or text rows
            (``prompt``/``chosen``/``rejected``) together with ``tokenizer``.
        config: :class:`TrainerConfig`.
        tokenizer: needed for text rows; its pad token (else EOS) pads the batches.
        ref_cache: reference log-probs: a dpo_fast cache (path or opened cache, see
            :mod:`dpo_fast.cache`) or a :class:`ReferenceTable`. None: a ``ref_model`` if
            given, else the initial policy, evaluated once before training.
        ref_model: a frozen reference model, run on every batch (no_grad).
        pad_token_id: overrides the tokenizer's.
        data_parallel: split every micro-batch across the ranks of the default process group
            (rank r takes pairs r, r + world, ...), each rank's loss weighted so that the
            gradient the framework averages over ranks is the whole micro-batch's. None (default):
            on when ``torch.distributed`` runs with several ranks and ``model`` is FSDP2-sharded
            or DistributedDataParallel (frameworks that average gradients); False: every rank
            runs every pair. Metrics are gathered over all ranks.
        packing: overrides ``config.packing`` (None, ``"shared_prompt"`` or ``"shared_prompt_packed"``);
            the model (and ``ref_model``) must pass
            :func:`~dpo_fast.integrations.packing.check_packing_support`, run here, before anything else.
    """

    def __init__(self, model, examples, config: TrainerConfig | None = None, *, tokenizer=None, ref_cache=None,
                 ref_model=None, pad_token_id=None, packing=None, data_parallel=None):
        if config is not None and not isinstance(config, TrainerConfig):
            raise TypeError(f"config must be a TrainerConfig (or None), got {type(config).__name__}")
        config = config or TrainerConfig()
        if packing is not None:
            config = dataclasses.replace(config, packing=packing)
        self.config = config
        if type(model).__name__ == "DeepSpeedEngine":
            raise ValueError("StandardTrainer runs its own backward and AdamW, which a DeepSpeed engine must do itself "
                             "(engine.backward, engine.step): use dpo_fast.integrations.hf.completion_logps in your "
                             "loop (examples/deepspeed_zero3_dpo.py) or FusedDPOTrainer under accelerate")
        self.model = model
        self.rank, self.world = data_parallel_group(model, data_parallel)
        if self.world > config.batch_size:
            raise ValueError(f"batch_size={config.batch_size} pairs cannot be split over {self.world} data-parallel "
                             "ranks: use batch_size >= the number of ranks (or data_parallel=False)")
        if ref_cache is not None and ref_model is not None:
            raise ValueError("pass either ref_cache or ref_model, not both")
        if examples is None or len(examples) == 0:
            raise ValueError("examples is empty: the trainer needs at least one preference pair")
        if not isinstance(examples[0], PreferenceExample):
            examples, _ = tokenize_rows(list(examples), tokenizer, max_length=config.max_length,
                                        truncation_mode=config.truncation_mode, source="examples")
        self.examples = list(examples)
        if pad_token_id is None:
            if tokenizer is None:
                raise ValueError("pass tokenizer= or pad_token_id= (the id that pads the batches)")
            pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            if pad_token_id is None:
                raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an EOS token")
        self.pad_token_id = int(pad_token_id)
        from .integrations.hf import check_lm_head_once, lm_head_spec

        lm_head_spec(model)  # a model without an output embedding fails here, naming the problem
        # Built before any forward: after a forward FSDP2's root unit stays unsharded until its
        # backward, and model.parameters() would then list the unsharded tensors, not the shards.
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=tuple(config.adam_betas),
                                           eps=config.adam_eps, weight_decay=config.weight_decay)
        if config.impl != "reference":  # the fused path rebuilds the logits from the lm_head: check it can
            check_lm_head_once(model)  # a forward: on a sharded model every rank runs it
        if config.packing is not None:
            from .integrations.packing import check_packing_support

            for m in (model,) if ref_model is None else (model, ref_model):
                check_packing_support(m, config.packing)  # refuses, naming the fallback, before any step
        reshard_fsdp(model)  # after the checks' no-grad forwards
        if config.disable_dropout:
            disable_dropout(model)
        self.device = model_device(model)
        self.ref_model = ref_model
        self.ref_table = None
        if not config.reference_free and ref_model is None:
            if ref_cache is None:
                self.ref_table = ReferenceTable.from_model(
                    model, self.examples, impl=config.impl, batch_size=config.batch_size,
                    pad_token_id=self.pad_token_id, max_length=config.max_length,
                    truncation_mode=config.truncation_mode, packing=config.packing)
            elif isinstance(ref_cache, ReferenceTable):
                self.ref_table = ref_cache
            else:
                self.ref_table = open_reference_cache(ref_cache, self.examples, max_length=config.max_length,
                                                      truncation_mode=config.truncation_mode, model=model)
        self.rng = random.Random(config.seed)
        self._order: list[int] = []
        self.step = 0

    # ------------------------------------------------------------------ batches

    def next_examples(self, n: int) -> list[PreferenceExample]:
        """The next ``n`` examples of the epoch order (reshuffled each epoch when ``shuffle``)."""
        out = []
        while len(out) < n:
            if not self._order:
                self._order = list(range(len(self.examples)))
                if self.config.shuffle:
                    self.rng.shuffle(self._order)
            out.append(self.examples[self._order.pop(0)])
        return out

    def collate(self, examples):
        c = self.config
        batch = collate_preference(examples, pad_token_id=self.pad_token_id, max_length=c.max_length,
                                   truncation_mode=c.truncation_mode)
        return {k: v.to(self.device) for k, v in batch.items()}

    def reference_logps(self, examples, batch, layout=None):
        if self.config.reference_free:
            return None, None
        if self.ref_model is not None:
            rc, rr = sequence_sums(self.ref_model, batch, self.config.impl, self.config.packing, layout)
            reshard_fsdp(self.ref_model)
        elif isinstance(self.ref_table, ReferenceTable):
            rc, rr = self.ref_table.lookup(examples)
        else:
            found = self.ref_table.lookup(examples)
            rc, rr = found["ref_chosen_logps"], found["ref_rejected_logps"]
        return rc.to(self.device), rr.to(self.device)

    # ------------------------------------------------------------------ one micro-batch

    def micro_batch(self, examples):
        """Loss and the raw per-pair/per-token statistics of one micro-batch (one forward)."""
        c = self.config
        batch = self.collate(examples)
        layout = None
        if c.packing is not None:
            from .integrations.packing import build_layout

            layout = build_layout(batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                  packing=c.packing, pad_token_id=self.pad_token_id)
        tok = token_outputs(self.model, batch, c.impl, packing=c.packing, layout=layout)
        b = len(examples)
        shift_mask = torch.zeros_like(batch["completion_mask"])
        shift_mask[:, :-1] = batch["completion_mask"][:, 1:]
        lengths = shift_mask.sum(-1)
        if bool((lengths == 0).any()):
            bad = (lengths == 0).nonzero().flatten().tolist()
            raise ValueError(f"sequence(s) {bad} of the batch have no completion token to score (empty completion, "
                             "or truncated away by max_length)")
        sums = tok["log_probs"].sum(-1)
        pc, pr = sums[:b], sums[b:]
        rc, rr = self.reference_logps(examples, batch, layout)
        kw = dict(beta=c.beta, loss_type=c.loss_type, loss_weights=c.loss_weights, label_smoothing=c.label_smoothing,
                  chosen_lengths=lengths[:b], rejected_lengths=lengths[b:], simpo_gamma=c.simpo_gamma,
                  discopop_tau=c.discopop_tau)
        if c.impl == "reference":
            loss, chosen_rewards, rejected_rewards = reference.reference_dpo_loss(
                pc, pr, rc, rr, **{**kw, "chosen_lengths": lengths[:b].to(pc.dtype),
                                   "rejected_lengths": lengths[b:].to(pc.dtype)})
        else:
            out = dpo_loss(pc, pr, rc, rr, **kw)
            loss, chosen_rewards, rejected_rewards = out.loss, out.chosen_rewards, out.rejected_rewards
        m = shift_mask.bool()
        with torch.no_grad():
            stats = {
                "chosen_rewards": chosen_rewards.detach().double(),
                "rejected_rewards": rejected_rewards.detach().double(),
                "chosen_logps": pc.detach().double(),
                "rejected_logps": pr.detach().double(),
                "entropy_sum": (tok["entropy"] * m).sum().double(),
                "tokens": m.sum(),
                "chosen_logits_sum": (tok["mean_logits"][:b] * m[:b]).sum().double(),
                "chosen_tokens": m[:b].sum(),
                "rejected_logits_sum": (tok["mean_logits"][b:] * m[b:]).sum().double(),
                "rejected_tokens": m[b:].sum(),
                "chosen_top1": (tok["is_top1"][:b] & m[:b]).sum(),
                "forwarded_tokens": int(batch["attention_mask"].sum()) if layout is None else layout.tokens,
            }
        return loss, stats

    # ------------------------------------------------------------------ one optimizer step

    def train_step(self, micro_batches=None) -> StepRecord:
        """One optimizer step over ``grad_accum_steps`` micro-batches (the next ones by default)."""
        c = self.config
        if micro_batches is None:
            micro_batches = [self.next_examples(c.batch_size) for _ in range(c.grad_accum_steps)]
        total_pairs = sum(len(mb) for mb in micro_batches)
        start = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        step_loss, all_stats = 0.0, []
        for examples in micro_batches:
            local = examples[self.rank::self.world]
            if not local:
                raise ValueError(f"a micro-batch of {len(examples)} pairs leaves rank {self.rank} of {self.world} "
                                 "without a pair")
            loss, stats = self.micro_batch(local)
            share = len(local) / total_pairs
            # FSDP/DDP average gradients over ranks: weight by world so the average is the batch's gradient.
            (loss * (share * self.world)).backward()
            step_loss += float(loss.detach()) * share
            all_stats.append(stats)
        if self.world > 1:
            step_loss, all_stats = _gather_over_ranks(step_loss, all_stats)
        if c.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.max_grad_norm)
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        self.step += 1
        metrics = aggregate_metrics(all_stats)
        metrics["loss"] = step_loss
        cr = torch.cat([s["chosen_rewards"] for s in all_stats])
        rr = torch.cat([s["rejected_rewards"] for s in all_stats])
        return StepRecord(step=self.step, loss=step_loss, metrics=metrics, pairs=total_pairs,
                          tokens=sum(s["forwarded_tokens"] for s in all_stats), seconds=seconds,
                          chosen_rewards=cr.tolist(), rejected_rewards=rr.tolist())

    def train(self, steps: int, callback=None) -> list[StepRecord]:
        """Run ``steps`` optimizer steps; ``callback(record)`` after each. Returns the records."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an int >= 0, got {steps!r}")
        history = []
        for _ in range(steps):
            record = self.train_step()
            history.append(record)
            if callback is not None:
                callback(record)
        return history


def aggregate_metrics(all_stats) -> dict:
    """TRL's DPO metric names over every pair and completion token of a step."""
    cat = lambda k: torch.cat([s[k] for s in all_stats])  # noqa: E731
    tot = lambda k: sum(float(s[k]) for s in all_stats)  # noqa: E731
    cr, rr = cat("chosen_rewards"), cat("rejected_rewards")
    ratio = lambda a, b: tot(a) / tot(b) if tot(b) > 0 else 0.0  # noqa: E731
    return {
        "rewards/chosen": float(cr.mean()),
        "rewards/rejected": float(rr.mean()),
        "rewards/accuracies": float((cr > rr).double().mean()),
        "rewards/margins": float((cr - rr).mean()),
        "logps/chosen": float(cat("chosen_logps").mean()),
        "logps/rejected": float(cat("rejected_logps").mean()),
        "logits/chosen": ratio("chosen_logits_sum", "chosen_tokens"),
        "logits/rejected": ratio("rejected_logits_sum", "rejected_tokens"),
        "entropy": ratio("entropy_sum", "tokens"),
        "mean_token_accuracy": ratio("chosen_top1", "chosen_tokens"),
    }


# ---------------------------------------------------------------------- dpo-fast verify

DEFAULT_TOLERANCE = {"loss": 1e-5, "metrics": 1e-4, "params": 1e-5}


@dataclass
class VerifyReport:
    steps: int
    loss_type: str
    impl: str
    max_loss_diff: float
    max_metric_diff: dict
    max_param_diff: float
    max_param_name: str
    max_param_change: float              # how far training moved the parameters (for scale)
    tolerance: dict
    packing: str | None = None

    @property
    def worst_metric(self) -> tuple[str, float]:
        name = max(self.max_metric_diff, key=self.max_metric_diff.get)
        return name, self.max_metric_diff[name]

    @property
    def ok(self) -> bool:
        t = self.tolerance
        return (self.max_loss_diff <= t["loss"] and self.worst_metric[1] <= t["metrics"]
                and self.max_param_diff <= t["params"])

    def format(self) -> str:
        name, worst = self.worst_metric
        lines = [
            f"dpo-fast verify: {self.steps} steps, loss_type={self.loss_type}, fused impl={self.impl}"
            + (f", packing={self.packing}" if self.packing else "")
            + " vs standard (padded, full logits, plain log_softmax), float32, same seed and batches",
            f"  max |loss diff|              {self.max_loss_diff:.3e}   (tolerance {self.tolerance['loss']:.0e})",
            f"  max |metric diff|            {worst:.3e}   ({name}; tolerance {self.tolerance['metrics']:.0e})",
        ]
        for k, v in sorted(self.max_metric_diff.items()):
            lines.append(f"      {k:<24} {v:.3e}")
        lines += [
            f"  max |parameter diff|         {self.max_param_diff:.3e}   ({self.max_param_name}; "
            f"tolerance {self.tolerance['params']:.0e})",
            f"  max |parameter change|       {self.max_param_change:.3e}   (how far training moved them)",
            f"  {'PASS' if self.ok else 'FAIL'}",
        ]
        return "\n".join(lines)


def verify(steps: int = 4, *, loss_type: str = "sigmoid", beta: float = 0.1, impl: str = "auto",
           model_size: str = "tiny", vocab_size: int = 512, pairs: int = 32, batch_size: int = 4,
           grad_accum_steps: int = 2, learning_rate: float = 1e-3, seed: int = 0, label_smoothing: float = 0.0,
           tolerance: dict | None = None, device: str | None = None, packing: str | None = None) -> VerifyReport:
    """Train ``steps`` steps with the standard oracle (``impl="reference"``) and the fused path
    from the same initial weights on the same batches, in float32; report the largest divergence
    in loss, every metric, and every parameter. With ``packing``, the fused side runs the
    shared-prompt (packed) layout, reference pass included; the oracle stays padded."""
    from .synthetic import build_model, build_tokenizer, make_preference_rows

    if impl == "reference":
        raise ValueError("impl is the fused implementation to check against the reference; got 'reference'")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = build_tokenizer(vocab_size)
    rows = make_preference_rows(pairs, seed)
    examples, _ = tokenize_rows(rows, tokenizer)
    base = build_model(tokenizer, model_size, seed=seed).to(device=device, dtype=torch.float32)
    results = {}
    for which in ("reference", impl):
        model = copy.deepcopy(base)
        config = TrainerConfig(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                               learning_rate=learning_rate, batch_size=batch_size,
                               grad_accum_steps=grad_accum_steps, impl=which, seed=seed,
                               packing=None if which == "reference" else packing)
        trainer = StandardTrainer(model, examples, config, pad_token_id=tokenizer.pad_token_id)
        history = trainer.train(steps)
        results[which] = (history, {n: p.detach().clone() for n, p in model.named_parameters()})
    (h_ref, p_ref), (h_fused, p_fused) = results["reference"], results[impl]
    loss_diff = max(abs(a.loss - b.loss) for a, b in zip(h_ref, h_fused))
    metric_diff = {k: max(abs(a.metrics[k] - b.metrics[k]) for a, b in zip(h_ref, h_fused))
                   for k in h_ref[0].metrics if k != "loss"}
    param_diff, param_name, change = 0.0, "", 0.0
    initial = dict(base.named_parameters())
    for name, p in p_ref.items():
        d = float((p - p_fused[name]).abs().max())
        change = max(change, float((p - initial[name].detach()).abs().max()))
        if d >= param_diff:
            param_diff, param_name = d, name
    return VerifyReport(steps=steps, loss_type=loss_type, impl=impl, packing=packing, max_loss_diff=loss_diff,
                        max_metric_diff=metric_diff, max_param_diff=param_diff, max_param_name=param_name,
                        max_param_change=change, tolerance=dict(tolerance or DEFAULT_TOLERANCE))


def register_verify(sub):
    p = sub.add_parser("verify", help="train k steps with the standard oracle and the fused path; report divergence")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps (default 4)")
    p.add_argument("--loss-type", default="sigmoid", choices=sorted(LOSS_TYPES))
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--impl", default="auto", choices=[i for i in IMPLS if i != "reference"],
                   help="fused implementation to check (default auto: triton on CUDA, torch elsewhere)")
    p.add_argument("--model-size", default="tiny", choices=["tiny", "small", "base"],
                   help="tiny, small or base (default tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--packing", default=None, choices=["shared_prompt", "shared_prompt_packed"],
                   help="run the fused side with the shared-prompt (packed) layout (default: padded)")
    p.set_defaults(func=_run_verify)


def _run_verify(args) -> int:
    from .ops import triton_available

    if args.steps < 1:
        return _cli_error("verify", f"--steps must be >= 1, got {args.steps}")
    if args.impl == "triton" and not triton_available():
        return _cli_error("verify", "--impl triton needs the triton package and a CUDA device "
                                    "(or TRITON_INTERPRET=1 for the CPU interpreter)")
    try:
        report = verify(args.steps, loss_type=args.loss_type, beta=args.beta, impl=args.impl,
                        model_size=args.model_size, seed=args.seed, label_smoothing=args.label_smoothing,
                        packing=args.packing)
    except ValueError as e:  # e.g. a bad --beta or --label-smoothing
        return _cli_error("verify", str(e))
    print(report.format())
    return 0 if report.ok else 1


def _cli_error(command: str, message: str) -> int:
    """A user error as one line on stderr, exit status 2 (as argparse and the other subcommands do)."""
    print(f"dpo-fast {command}: error: {message}", file=sys.stderr)
    return 2
