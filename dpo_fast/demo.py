"""``dpo-fast demo``: DPO end to end on a synthetic controlled-sentiment task, in a few minutes on a CPU.

1. Data (:mod:`dpo_fast.synthetic`): preference pairs whose true reward is a known function of
   their words; SFT rows from the same base distribution; held-out pairs and prompts.
2. A small Llama-style model from a config, with a locally built word-level tokenizer.
3. SFT warm-up on the base distribution: this model is the reference policy.
4. The reference model is saved and its log-probs of every train and held-out pair are
   precomputed into a dpo_fast cache (:func:`dpo_fast.precompute.precompute`).
5. DPO with the fused path (:class:`dpo_fast.trainer.StandardTrainer`, ``impl="auto"``),
   reference log-probs from the cache, with a live table and progress bar.
6. The same steps with the standard trainer (``impl="reference"``: full logits, plain
   log_softmax): step time and peak memory against the fused run, and their loss agreement.
7. Held-out implicit-reward accuracy, and the reward/KL frontier in miniature: for a few
   beta values, the true reward of completions sampled from the trained policy against their
   KL to the reference (Monte-Carlo estimate ``E_y~pi[log pi(y|x) - log pi_ref(y|x)]``),
   saved as ``frontier.png`` and ``results.json`` in the output folder.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

from .memory import measure_peak

DEFAULT_OUT = os.path.join("out", "demo")


@dataclass
class DemoConfig:
    model_size: str = "small"
    vocab_size: int = 8192
    steps: int = 80                      # DPO steps per run
    sft_steps: int = 200
    beta: float = 0.1
    frontier_betas: tuple = (0.03, 0.3, 1.0)   # plus `beta`
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    batch_size: int = 32                 # pairs per DPO step
    sft_batch_size: int = 64
    learning_rate: float = 5e-4
    sft_learning_rate: float = 3e-3
    train_pairs: int = 1024
    heldout_pairs: int = 512
    sft_rows: int = 4096
    eval_prompts: int = 64
    samples_per_prompt: int = 4
    max_new_tokens: int = 10
    checkpoints: int = 4                 # frontier points per beta (evenly spaced over the run)
    compare_steps: int | None = None     # steps timed against the standard trainer (default: min(steps, 10))
    seed: int = 0
    device: str | None = None
    out: str = DEFAULT_OUT
    progress: bool = True

    def __post_init__(self):
        from .losses import LOSS_TYPES
        from .synthetic import MODEL_SIZES

        if self.model_size not in MODEL_SIZES:
            raise ValueError(f"model_size must be one of {sorted(MODEL_SIZES)}, got {self.model_size!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {sorted(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.loss_type == "simpo":
            raise ValueError("the demo measures rewards against the reference; loss_type 'simpo' is reference-free")
        for name in ("steps", "sft_steps", "batch_size", "train_pairs", "heldout_pairs", "eval_prompts",
                     "samples_per_prompt", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "sft_steps" else 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for b in (self.beta, *self.frontier_betas):
            if not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 0:
                raise ValueError(f"beta values must be finite numbers > 0, got {b!r}")

    @property
    def all_betas(self) -> list[float]:
        return sorted({float(self.beta), *(float(b) for b in self.frontier_betas)})


# ---------------------------------------------------------------------- output helpers

class Printer:
    """Lines to ``out``; a tqdm progress bar on stderr when ``progress`` and a terminal."""

    def __init__(self, out=None, progress=True):
        self.out = out or sys.stdout
        self.progress = progress and sys.stderr.isatty()
        self.bar = None

    def line(self, text=""):
        if self.bar is not None:
            self.bar.write(text, file=self.out)
        else:
            print(text, file=self.out, flush=True)

    def start_bar(self, total, desc):
        if self.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)

    def update_bar(self, postfix=None):
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(1)

    def close_bar(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---------------------------------------------------------------------- SFT

def _sft_batch(rows, tokenizer, device):
    """Pad prompt+completion+EOS sequences; completion_mask marks completion tokens and EOS."""
    import torch

    seqs, masks = [], []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        full = tokenizer(row["prompt"] + row["completion"] + tokenizer.eos_token)["input_ids"]
        if full[:len(prompt)] != prompt:
            raise ValueError(f"SFT row {row!r}: the tokenised prompt is not a prefix of prompt + completion")
        seqs.append(full)
        masks.append([0] * len(prompt) + [1] * (len(full) - len(prompt)))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    comp = torch.zeros_like(ids)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
        comp[i, :len(m)] = torch.tensor(m)
    return ids.to(device), attn.to(device), comp.to(device)


def sft(model, rows, tokenizer, *, steps, batch_size, lr, seed, printer):
    """Supervised fine-tuning on completions (mean token NLL through the fused path)."""
    import random

    import torch

    from .integrations.hf import completion_logps

    if steps == 0:
        return []
    device = next(model.parameters()).device
    rng = random.Random(f"sft-order-{seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.1, 1 - s / steps))
    model.train()
    order, losses = [], []
    printer.start_bar(steps, "SFT")
    for step in range(1, steps + 1):
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = list(range(len(rows)))
                rng.shuffle(order)
            batch.append(rows[order.pop()])
        ids, attn, comp = _sft_batch(batch, tokenizer, device)
        lp = completion_logps(model, ids, attn, comp)
        loss = -lp.sum() / comp[:, 1:].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        printer.update_bar(f"loss {losses[-1]:.3f}")
        if step == 1 or step % max(1, steps // 4) == 0 or step == steps:
            printer.line(f"  SFT step {step:>4}/{steps}  token NLL {losses[-1]:.3f}")
    printer.close_bar()
    return losses


# ---------------------------------------------------------------------- sampling and scoring

def last_logits(model, input_ids):
    """float32 logits of the next token after each row of ``input_ids`` (the lm_head runs on the
    last position only; scale and softcap as the model applies them)."""
    import torch

    from .integrations.hf import backbone_hidden_states, lm_head_spec

    spec = lm_head_spec(model)
    h = backbone_hidden_states(model, input_ids)[:, -1]
    z = h @ spec.weight.T
    if spec.bias is not None:
        z = z + spec.bias
    z = z.float() * spec.logit_scale
    if spec.softcap is not None:
        z = spec.softcap * torch.tanh(z / spec.softcap)
    return z


def sample_completions(model, prompt_ids, *, n, max_new_tokens, eos_id, pad_id, seed):
    """``n`` completions per prompt sampled at temperature 1 (stops at EOS, which is kept).

    Prompts are grouped by length so that no batch needs padding. Returns a list of
    ``(prompt_ids, completion_ids)`` in prompt order.
    """
    import torch

    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    by_len = {}
    for i, p in enumerate(prompt_ids):
        by_len.setdefault(len(p), []).append(i)
    out = [None] * len(prompt_ids)
    with torch.no_grad():
        for length in sorted(by_len):
            idx = by_len[length]
            x = torch.tensor([prompt_ids[i] for i in idx for _ in range(n)], device=device)
            done = torch.zeros(x.shape[0], dtype=torch.bool, device=device)
            for _ in range(max_new_tokens):
                logits = last_logits(model, x)
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).squeeze(1)
                nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
                x = torch.cat([x, nxt[:, None]], 1)
                done |= nxt == eos_id
                if bool(done.all()):
                    break
            rows = x[:, length:].tolist()
            for j, i in enumerate(idx):
                comps = []
                for row in rows[j * n:(j + 1) * n]:
                    comps.append(row[:row.index(eos_id) + 1] if eos_id in row else row)
                out[i] = [(list(prompt_ids[i]), c) for c in comps]
    model.train(was_training)
    return [pair for group in out for pair in group]


def score_sequences(model, pairs, *, pad_id, batch_size=256):
    """Summed log-probs of each completion given its prompt, ``[len(pairs)]`` (no grad)."""
    import torch

    from .integrations.hf import sequence_logps_from_model

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = []
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            width = max(len(p) + len(c) for p, c in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attn, comp = torch.zeros_like(ids), torch.zeros_like(ids)
            for j, (p, c) in enumerate(chunk):
                ids[j, :len(p) + len(c)] = torch.tensor(p + c)
                attn[j, :len(p) + len(c)] = 1
                comp[j, len(p):len(p) + len(c)] = 1
            s, _ = sequence_logps_from_model(model, ids.to(device), attn.to(device), comp.to(device))
            sums.append(s.double().cpu())
    model.train(was_training)
    return torch.cat(sums)


def completion_rewards(pairs, tokenizer):
    from .synthetic import true_reward

    return [true_reward(tokenizer.convert_ids_to_tokens(c)) for _, c in pairs]


def heldout_accuracy(model, examples, cache, *, beta, pad_id, batch_size=128):
    """Fraction of held-out pairs whose implicit reward ``beta * (log pi - log pi_ref)`` ranks
    the chosen completion above the rejected one (the reference sums come from the cache)."""
    import torch

    from .data import collate_preference
    from .trainer import sequence_sums

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct, margins = 0, []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        batch = {k: v.to(device) for k, v in collate_preference(chunk, pad_token_id=pad_id).items()}
        pc, pr = sequence_sums(model, batch, "auto")
        ref = cache.lookup(chunk, dtype=torch.float64)
        rc = beta * (pc.double().cpu() - ref["ref_chosen_logps"])
        rr = beta * (pr.double().cpu() - ref["ref_rejected_logps"])
        correct += int((rc > rr).sum())
        margins.append(rc - rr)
    model.train(was_training)
    return correct / len(examples), float(torch.cat(margins).mean())


# ---------------------------------------------------------------------- the demo

@dataclass
class DemoResult:
    config: dict
    device: str
    heldout_accuracy: float
    heldout_margin: float
    history: list
    frontier: list
    reference_point: dict
    comparison: dict
    seconds: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)


def _table_header():
    return (f"  {'step':>5} {'loss':>8} {'reward acc':>10} {'margin':>8} {'chosen r':>9} {'rejected r':>10} "
            f"{'tokens/s':>9}")


def _table_row(rec):
    m = rec.metrics
    return (f"  {rec.step:>5} {rec.loss:>8.4f} {m['rewards/accuracies']:>10.3f} {m['rewards/margins']:>8.4f} "
            f"{m['rewards/chosen']:>9.4f} {m['rewards/rejected']:>10.4f} {rec.tokens / rec.seconds:>9.0f}")


def run(config: DemoConfig, out=None) -> DemoResult:
    import torch

    from .cache import RefLogpsCache, remove_cache_files
    from .data import tokenize_rows
    from .precompute import precompute
    from .synthetic import build_model, build_tokenizer, make_preference_rows, make_sft_rows, sample_prompt
    from .trainer import StandardTrainer, TrainerConfig

    import transformers

    t_start = time.perf_counter()
    printer = Printer(out, config.progress)
    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bars between our lines
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    os.makedirs(config.out, exist_ok=True)
    seconds = {}

    # 1-2. data, tokenizer, model
    tokenizer = build_tokenizer(config.vocab_size)
    rows = make_preference_rows(config.train_pairs + config.heldout_pairs, config.seed)
    train_rows, heldout_rows = rows[:config.train_pairs], rows[config.train_pairs:]
    pref_columns = ("prompt", "chosen", "rejected")
    train_examples, _ = tokenize_rows([{k: r[k] for k in pref_columns} for r in train_rows], tokenizer)
    heldout_examples, _ = tokenize_rows([{k: r[k] for k in pref_columns} for r in heldout_rows], tokenizer)
    sft_rows = make_sft_rows(config.sft_rows, config.seed)
    import random

    prompt_rng = random.Random(f"eval-prompts-{config.seed}")
    eval_prompts = [tokenizer(sample_prompt(prompt_rng).text)["input_ids"] for _ in range(config.eval_prompts)]
    torch.manual_seed(config.seed)
    model = build_model(tokenizer, config.model_size, seed=config.seed).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    c = model.config
    printer.line(f"dpo-fast demo on {device}: Llama-style model '{config.model_size}' ({n_params / 1e6:.2f}M params, "
                 f"hidden {c.hidden_size}, {c.num_hidden_layers} layers, vocab {c.vocab_size}), "
                 f"loss {config.loss_type}, beta {config.beta}")
    printer.line(f"task: controlled sentiment in miniature: {len(train_examples)} train / {len(heldout_examples)} "
                 f"held-out pairs, true reward = mean word sentiment of the completion")

    # 3. SFT warm-up -> the reference policy
    t = time.perf_counter()
    printer.line(f"[1/5] SFT warm-up: {config.sft_steps} steps of {config.sft_batch_size} sequences")
    sft(model, sft_rows, tokenizer, steps=config.sft_steps, batch_size=config.sft_batch_size,
        lr=config.sft_learning_rate, seed=config.seed, printer=printer)
    seconds["sft"] = time.perf_counter() - t

    # 4. save the reference and precompute its log-probs into the cache
    t = time.perf_counter()
    ref_dir = os.path.join(config.out, "reference_model")
    model.save_pretrained(ref_dir)
    tokenizer.save_pretrained(ref_dir)
    cache_path = os.path.join(config.out, "ref_logps.sqlite")
    remove_cache_files(cache_path)
    all_rows = [{k: r[k] for k in pref_columns} for r in rows]
    summary = precompute(ref_dir, all_rows, cache_path, batch_size=128, device=str(device), progress=False)
    cache = RefLogpsCache.open(cache_path)
    seconds["precompute"] = time.perf_counter() - t
    printer.line(f"[2/5] reference log-probs of {summary.entries} pairs precomputed into {cache_path} "
                 f"({seconds['precompute']:.1f}s); DPO reads them from there (a frozen copy of the reference "
                 "only scores sampled completions for the KL)")
    reference_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)  # only to score samples for the KL

    def make_trainer(beta, impl):
        model.load_state_dict(reference_state)
        tc = TrainerConfig(beta=beta, loss_type=config.loss_type, label_smoothing=config.label_smoothing,
                           learning_rate=config.learning_rate, batch_size=config.batch_size, impl=impl,
                           seed=config.seed)
        return StandardTrainer(model, train_examples, tc, pad_token_id=tokenizer.pad_token_id, ref_cache=cache)

    # reference point of the frontier: samples from the reference itself (KL 0)
    ref_samples = sample_completions(ref_model, eval_prompts, n=config.samples_per_prompt,
                                     max_new_tokens=config.max_new_tokens, eos_id=tokenizer.eos_token_id,
                                     pad_id=tokenizer.pad_token_id, seed=config.seed)
    ref_rewards = completion_rewards(ref_samples, tokenizer)
    reference_point = {"beta": None, "reward": sum(ref_rewards) / len(ref_rewards), "kl": 0.0}

    def frontier_point(beta, step):
        samples = sample_completions(model, eval_prompts, n=config.samples_per_prompt,
                                     max_new_tokens=config.max_new_tokens, eos_id=tokenizer.eos_token_id,
                                     pad_id=tokenizer.pad_token_id, seed=config.seed + 1)
        kl = score_sequences(model, samples, pad_id=tokenizer.pad_token_id) - \
            score_sequences(ref_model, samples, pad_id=tokenizer.pad_token_id)
        rewards = completion_rewards(samples, tokenizer)
        return {"beta": beta, "step": step, "reward": sum(rewards) / len(rewards), "kl": float(kl.mean())}

    checkpoints = sorted({max(1, round(config.steps * k / config.checkpoints)) for k in range(1, config.checkpoints + 1)})

    # 5. DPO with the fused path, live table
    t = time.perf_counter()
    printer.line(f"[3/5] DPO, fused path (impl=auto), beta={config.beta}, {config.steps} steps of "
                 f"{config.batch_size} pairs, reference from the cache")
    printer.line(_table_header())
    trainer = make_trainer(config.beta, "auto")
    history, frontier = [], []
    every = max(1, config.steps // 10)
    printer.start_bar(config.steps, "DPO")
    for _ in range(config.steps):
        rec = trainer.train_step()
        history.append(rec)
        printer.update_bar(f"loss {rec.loss:.4f} acc {rec.metrics['rewards/accuracies']:.2f}")
        if rec.step == 1 or rec.step % every == 0 or rec.step == config.steps:
            printer.line(_table_row(rec))
        if rec.step in checkpoints:
            frontier.append(frontier_point(config.beta, rec.step))
    printer.close_bar()
    seconds["dpo"] = time.perf_counter() - t
    acc, margin = heldout_accuracy(model, heldout_examples, cache, beta=config.beta, pad_id=tokenizer.pad_token_id)
    printer.line(f"  held-out implicit-reward accuracy: {acc:.3f} on {len(heldout_examples)} pairs "
                 f"(chance 0.5), mean margin {margin:.4f}")

    # 6. the same steps: fused vs standard trainer, step time and peak memory
    t = time.perf_counter()
    n_cmp = config.compare_steps or min(config.steps, 10)
    printer.line(f"[4/5] fused vs standard trainer (full logits, plain log_softmax) on the same {n_cmp} steps")
    comparison = {"steps": n_cmp}
    for name, impl in (("fused", "auto"), ("standard", "reference")):
        tr = make_trainer(config.beta, impl)
        tr.train_step()  # warm-up step, not timed (Triton compilation on GPU)
        recs, peak, _ = measure_peak(lambda: [tr.train_step() for _ in range(n_cmp)], device)
        peak = float("nan") if peak is None else peak
        times = sorted(r.seconds for r in recs)
        median = times[len(times) // 2]
        comparison[name] = {"impl": impl, "median_step_s": median, "peak_extra_bytes": peak,
                            "losses": [r.loss for r in recs],
                            "tokens_per_s": sum(r.tokens for r in recs) / len(recs) / median}
    f, s = comparison["fused"], comparison["standard"]
    comparison["max_loss_diff"] = max(abs(a - b) for a, b in zip(f["losses"], s["losses"]))
    mem_kind = "peak CUDA memory" if device.type == "cuda" else "peak RSS"
    printer.line(f"  {'trainer':<10} {'step time':>10} {'tokens/s':>10} {mem_kind + ' above start':>24}")
    for name in ("fused", "standard"):
        r = comparison[name]
        printer.line(f"  {name:<10} {r['median_step_s'] * 1e3:>8.1f}ms {r['tokens_per_s']:>10.0f} "
                     f"{r['peak_extra_bytes'] / 2**20:>21.1f} MiB")
    printer.line(f"  max |loss difference| over the {n_cmp} steps: {comparison['max_loss_diff']:.2e}")
    seconds["compare"] = time.perf_counter() - t

    # 7. reward/KL frontier for the other betas
    t = time.perf_counter()
    others = [b for b in config.all_betas if b != float(config.beta)]
    printer.line(f"[5/5] reward/KL frontier: DPO with beta in {config.all_betas}, {config.steps} steps each, "
                 f"{config.eval_prompts}x{config.samples_per_prompt} sampled completions per checkpoint")
    for beta in others:
        tr = make_trainer(beta, "auto")
        for step in range(1, config.steps + 1):
            tr.train_step()
            if step in checkpoints:
                frontier.append(frontier_point(beta, step))
    seconds["frontier"] = time.perf_counter() - t
    printer.line(f"  {'beta':>6} {'step':>5} {'KL(pi||ref)':>12} {'true reward':>12}")
    printer.line(f"  {'ref':>6} {0:>5} {0.0:>12.3f} {reference_point['reward']:>12.3f}")
    for p in sorted(frontier, key=lambda p: (p["beta"], p["step"])):
        printer.line(f"  {p['beta']:>6g} {p['step']:>5} {p['kl']:>12.3f} {p['reward']:>12.3f}")

    result = DemoResult(
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        device=str(device), heldout_accuracy=acc, heldout_margin=margin,
        history=[{"step": r.step, "loss": r.loss, **r.metrics, "tokens_per_s": r.tokens / r.seconds} for r in history],
        frontier=frontier, reference_point=reference_point, comparison=comparison, seconds=seconds)
    result.paths = {"json": os.path.join(config.out, "results.json"), "plot": os.path.join(config.out, "frontier.png"),
                    "cache": cache_path, "reference_model": ref_dir}
    plot_frontier(result, result.paths["plot"])
    seconds["total"] = time.perf_counter() - t_start
    with open(result.paths["json"], "w") as fh:
        json.dump(asdict(result), fh, indent=2)
    printer.line(f"done in {seconds['total']:.0f}s: held-out implicit-reward accuracy {acc:.3f}; "
                 f"fused step {f['median_step_s'] * 1e3:.1f}ms vs standard {s['median_step_s'] * 1e3:.1f}ms, "
                 f"{mem_kind} {f['peak_extra_bytes'] / 2**20:.1f} vs {s['peak_extra_bytes'] / 2**20:.1f} MiB")
    printer.line(f"plot: {result.paths['plot']}   results: {result.paths['json']}")
    cache.close()
    return result


def plot_frontier(result: DemoResult, path: str):
    """Scatter of (KL, true reward) per beta, the checkpoints of one beta joined by a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    ref = result.reference_point
    ax.scatter([0.0], [ref["reward"]], marker="*", s=140, color="black", label="reference (SFT)", zorder=3)
    betas = sorted({p["beta"] for p in result.frontier})
    cmap = plt.get_cmap("viridis")
    for i, beta in enumerate(betas):
        pts = sorted((p for p in result.frontier if p["beta"] == beta), key=lambda p: p["step"])
        color = cmap(i / max(1, len(betas) - 1))
        ax.plot([0.0] + [p["kl"] for p in pts], [ref["reward"]] + [p["reward"] for p in pts], "-o", color=color,
                label=f"DPO beta={beta:g}", markersize=5)
    kls = [p["kl"] for p in result.frontier]
    if kls and max(kls) > 10:  # an over-optimised run (tiny beta) would squash the others: symlog axis
        ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("KL(policy || reference)  [nats per completion]")
    ax.set_ylabel("true reward of sampled completions")
    ax.set_title(f"reward/KL frontier (loss {result.config['loss_type']}, {result.config['steps']} steps)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------- CLI

def register(sub):
    p = sub.add_parser("demo", help="DPO end to end on a synthetic sentiment task: SFT, cached reference, fused "
                                    "DPO, reward/KL frontier (a few minutes on a CPU)")
    p.add_argument("--model-size", default="small", choices=["tiny", "small", "base"],
                   help="Llama-style model size (default small)")
    p.add_argument("--vocab-size", type=int, default=8192, help="tokenizer/lm_head vocabulary size (default 8192)")
    p.add_argument("--steps", type=int, default=80, help="DPO steps per run (default 80)")
    p.add_argument("--sft-steps", type=int, default=200, help="SFT warm-up steps (default 200)")
    p.add_argument("--beta", type=float, default=0.1, help="beta of the main run (default 0.1)")
    p.add_argument("--frontier-betas", default="0.03,0.3,1.0",
                   help="comma-separated extra betas for the reward/KL frontier (default 0.03,0.3,1.0; '' for none)")
    p.add_argument("--loss-type", default="sigmoid", help="DPO loss type (default sigmoid)")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per DPO step (default 32)")
    p.add_argument("--lr", type=float, default=5e-4, help="DPO learning rate (default 5e-4)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    def error(message):
        print(f"dpo-fast demo: error: {message}", file=sys.stderr)
        return 2

    try:
        betas = tuple(float(b) for b in args.frontier_betas.split(",") if b.strip())
    except ValueError:
        return error(f"--frontier-betas must be comma-separated numbers, got {args.frontier_betas!r}")
    if args.device is not None:
        import torch

        try:
            device = torch.device(args.device)
        except RuntimeError:
            return error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            return error(f"--device {args.device}: CUDA is not available here")
    try:
        config = DemoConfig(model_size=args.model_size, vocab_size=args.vocab_size, steps=args.steps,
                            sft_steps=args.sft_steps, beta=args.beta, frontier_betas=betas, loss_type=args.loss_type,
                            batch_size=args.batch_size, learning_rate=args.lr, out=args.out, device=args.device,
                            seed=args.seed, progress=not args.no_progress)
    except ValueError as e:
        return error(str(e))
    run(config)
    return 0
