"""Multi-rank checks of the fused head (run by tests/test_distributed.py under torchrun, gloo, CPU).

``python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests._distributed GROUP OUT``
runs every check of GROUP (``fsdp2``, ``ddp``, ``deepspeed``) in one process group and rank 0
writes ``OUT`` (JSON): per check, the relative differences against ONE process that computes
the same objective on the whole batch from the model's plain logits (``model(...).logits`` ->
float32 log_softmax -> gather): the loss of each step, every parameter's gradient after the
first backward (gathered), every parameter after the last optimizer step. Relative difference
of a tensor: ``max |a - b| / max |b|``. Each rank takes its own slice of every batch (data
parallel), so the frameworks' gradient averaging must give the whole-batch gradient.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

V, H = 64, 32
PAIRS, T = 4, 12          # per batch; split across ranks by pair
BETA, LR = 1.0, 0.5


# ----------------------------------------------------------------------------- model and data

def build_model(*, tied=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def make_batch(seed, pairs=PAIRS):
    """Rows ``[chosen_0..chosen_{P-1}, rejected_0..]`` with right padding, and reference sums."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (2 * pairs, T), generator=g)
    attention = torch.ones(2 * pairs, T, dtype=torch.long)
    completion = torch.zeros(2 * pairs, T, dtype=torch.long)
    for i in range(2 * pairs):
        length = int(torch.randint(T // 2, T + 1, (1,), generator=g))
        prompt = int(torch.randint(2, T // 2, (1,), generator=g))
        attention[i, length:] = 0
        completion[i, prompt:length] = 1
    ref = torch.randn(2 * pairs, generator=g) * 3 - 30
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion, "ref": ref}


def shared_prompt_batch(seed, pairs=PAIRS):
    """:func:`make_batch` whose rejected row of each pair starts with its chosen row's prompt (the
    shared prefix the ``shared_prompt`` layouts forward once)."""
    batch = make_batch(seed, pairs)
    ids, attention, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    for i in range(pairs):
        prompt = int(completion[i].nonzero()[0])
        j = pairs + i
        length = int(attention[j].sum())
        ids[j, :prompt] = ids[i, :prompt]
        completion[j] = 0
        completion[j, prompt:length] = 1
    return batch


def shard(batch, rank, world):
    """This rank's pairs (chosen and rejected rows of each)."""
    pairs = batch["input_ids"].shape[0] // 2
    per = pairs // world
    idx = list(range(rank * per, (rank + 1) * per))
    rows = torch.tensor(idx + [pairs + i for i in idx])
    return {k: v[rows] for k, v in batch.items()}


def labels_of(batch):
    ids, completion = batch["input_ids"], batch["completion_mask"]
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:].masked_fill(completion[:, 1:] == 0, -100)
    return labels


def plain_sums(model, batch):
    """Sequence log-prob sums from the model's own logits (no dpo_fast code)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = labels_of(batch)
    logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * (labels != -100)).sum(-1)


def fused_sums(model, batch, entry="completion_logps"):
    from dpo_fast.integrations import hf

    args = (model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    if entry == "completion_logps":
        return hf.completion_logps(*args).sum(-1)
    if entry == "sequence_logps_from_model":
        return hf.sequence_logps_from_model(*args)[0]
    if entry == "packed":  # padding-free packing of shared-prompt pairs (first use runs the probe check)
        from dpo_fast.integrations.packing import packed_sequence_logps

        r = packed_sequence_logps(*args, packing="shared_prompt_packed", max_tokens=4 * T)  # this rank's pairs in 1 row
        return torch.cat([r["chosen_logps"], r["rejected_logps"]])
    if entry == "trl":  # the patched TRL forward, as DPOTrainer calls it
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=_trl_labels(batch), fused_lm_head=True)
        return out.log_probs.sum(-1)
    raise ValueError(entry)


def _trl_labels(batch):
    """TRL's unshifted labels: the token id at completion positions, -100 elsewhere."""
    return batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)


def dpo_objective(sums, ref):
    b = sums.shape[0] // 2
    margin = (sums[:b] - ref[:b]) - (sums[b:] - ref[b:])
    return -F.logsigmoid(BETA * margin).mean()


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


# ----------------------------------------------------------------------------- one process, plain logits

def single_run(model, batches, steps=2, dtype=torch.float32, micro=1, objective=None, sums_fn=plain_sums, shards=1):
    """Losses per step, gradients after the first step's backward, parameters after the last step.

    With ``shards > 1`` each batch is split as :func:`shard` splits it over that many ranks and the
    per-shard objectives are averaged (the same objective as the whole batch; for a ``sums_fn``
    whose numbers depend on which sequences are forwarded together, e.g. a packed layout)."""
    objective = objective or (lambda sums, b: dpo_objective(sums, b["ref"].to(dtype)))
    model = model.to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses, grads = [], None
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for m in range(micro):
            whole = batches[step * micro + m]
            for b in [whole] if shards == 1 else [shard(whole, r, shards) for r in range(shards)]:
                loss = objective(sums_fn(model, b), b) / (micro * shards)
                loss.backward()
                total += float(loss.detach())
        losses.append(total)
        if grads is None:
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
    return {"losses": losses, "grads": grads, "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def compare(name, single, multi, **extra):
    out = {"name": name, "loss": max(abs(a - b) / abs(b) for a, b in zip(multi["losses"], single["losses"]))}
    missing = sorted(set(single["grads"]) ^ set(multi["grads"]))
    if missing:
        raise AssertionError(f"{name}: parameter names differ: {missing[:4]}")
    g = {n: rel(multi["grads"][n], single["grads"][n]) for n in single["grads"]}
    p = {n: rel(multi["params"][n], single["params"][n]) for n in single["params"]}
    out["grad"], out["grad_worst"] = max(g.values()), max(g, key=g.get)
    out["param"], out["param_worst"] = max(p.values()), max(p, key=p.get)
    out["n_params"] = len(g)
    out.update(extra)
    return out


def mean_over_ranks(value):
    t = torch.tensor([float(value.detach() if isinstance(value, torch.Tensor) else value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def named(model):
    """Parameters by name, without a DDP / DeepSpeed engine ``module.`` prefix."""
    return [(n.removeprefix("module."), p) for n, p in model.named_parameters()]


def rank_spread(params):
    """Largest difference between this rank's and rank 0's copy of any (replicated) parameter."""
    worst = torch.zeros(1, dtype=torch.float64)
    for p in params.values():
        ref = p.clone()
        dist.broadcast(ref, 0)
        worst = torch.maximum(worst, (p - ref).abs().max().double().reshape(1))
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ----------------------------------------------------------------------------- FSDP2

def fsdp_wrap(model, layout, mesh, mp_policy=None):
    from torch.distributed.fsdp import fully_shard

    kw = {"mesh": mesh}
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    if layout != "root_only":
        for layer in model.model.layers:
            fully_shard(layer, **kw)
    if layout == "own_head":
        fully_shard(model.lm_head, **kw)
    fully_shard(model, **kw)
    return model


def count_pre_backward(module, counts, key):
    """Count the FSDP2 pre-backward hook calls of ``module``'s unit (bound at post-forward)."""
    state = module._get_fsdp_state()
    inner = state._pre_backward

    def counted(grad):
        counts[key] = counts.get(key, 0) + 1
        return inner(grad)

    state._pre_backward = counted


def fsdp_run(model, batches, rank, world, *, steps=2, micro=1, entry="completion_logps", sums_fn=None):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses, grads = [], None
    sums_fn = sums_fn or (lambda m, b: fused_sums(m, b, entry))
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for m in range(micro):
            b = shard(batches[step * micro + m], rank, world)
            if micro > 1:
                model.set_requires_gradient_sync(m == micro - 1)
            loss = dpo_objective(sums_fn(model, b), b["ref"]) / micro
            loss.backward()
            total += mean_over_ranks(loss)
        losses.append(total)
        if grads is None:
            grads = {n: full(p.grad).detach().clone() for n, p in named(model)}
        opt.step()
    return {"losses": losses, "grads": grads,
            "params": {n: full(p).detach().clone() for n, p in named(model)}}


def group_fsdp2(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mesh = init_device_mesh("cpu", (world,))
    results = []
    batches = [make_batch(s) for s in (1, 2, 3, 4)]
    shared = [shared_prompt_batch(s) for s in (1, 2)]

    # lm_head in the root unit / its own unit / tied / only a root unit; a different entry point each;
    # packing="shared_prompt_packed" on pairs that share their prompt, lm_head its own unit / tied
    for name, layout, tied, entry in (("fsdp2_head_in_root", "root", False, "completion_logps"),
                                      ("fsdp2_head_own_unit", "own_head", False, "sequence_logps_from_model"),
                                      ("fsdp2_tied", "root", True, "completion_logps"),
                                      ("fsdp2_root_only", "root_only", False, "completion_logps"),
                                      ("fsdp2_tied_root_only", "root_only", True, "completion_logps"),
                                      ("fsdp2_packed_head_own_unit", "own_head", False, "packed"),
                                      ("fsdp2_packed_tied", "root", True, "packed")):
        data = shared if entry == "packed" else batches
        single = single_run(build_model(tied=tied), data) if rank == 0 else None
        model = fsdp_wrap(build_model(tied=tied), layout, mesh)
        counts = {}
        count_pre_backward(model, counts, "root")
        if layout == "own_head":
            count_pre_backward(model.lm_head, counts, "lm_head")
        multi = fsdp_run(model, data, rank, world, entry=entry)
        if rank == 0 and entry == "packed":
            # The packed layout sums attention over other keys than the padded batch (fp32 rounding
            # that 2 steps at LR 0.5 grow to ~1e-5 in the parameters, in one process alone), so the
            # 1e-5 reference is one process running the same packed layouts (the same pairs forwarded
            # together, no FSDP); the plain-logits difference is recorded as vs_plain.
            packed = single_run(build_model(tied=tied), data, sums_fn=lambda m, b: fused_sums(m, b, "packed"),
                                shards=world)
            results.append(compare(name, packed, multi, entry=entry, pre_backward_calls=counts,
                                   vs_plain=compare(name + "_vs_plain", single, multi)))
        elif rank == 0:
            results.append(compare(name, single, multi, entry=entry, pre_backward_calls=counts))

    # HSDP: a 2-D (replicate, shard) mesh; 2 ranks give replicate=2 x shard=1, so the gradient is
    # reduce-scattered within a shard group and all-reduced across replicas
    single = single_run(build_model(), batches) if rank == 0 else None
    hsdp_mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
    model = fsdp_wrap(build_model(), "own_head", hsdp_mesh)
    multi = fsdp_run(model, batches, rank, world)
    if rank == 0:
        results.append(compare("fsdp2_hsdp_head_own_unit", single, multi, entry="completion_logps"))

    # the patched TRL forward on an FSDP2 model whose lm_head is its own unit
    from dpo_fast.integrations.trl import add_fused_lm_head

    single = single_run(build_model(), batches) if rank == 0 else None
    model = build_model()
    add_fused_lm_head(model)
    model = fsdp_wrap(model, "own_head", mesh)
    multi = fsdp_run(model, batches, rank, world, entry="trl")
    if rank == 0:
        results.append(compare("fsdp2_trl_patch_head_own_unit", single, multi, entry="trl add_fused_lm_head"))

    # gradient accumulation: no reduce-scatter on the first micro-batch, lm_head its own unit
    single = single_run(build_model(), batches, micro=2) if rank == 0 else None
    model = fsdp_wrap(build_model(), "own_head", mesh)
    multi = fsdp_run(model, batches, rank, world, micro=2)
    if rank == 0:
        results.append(compare("fsdp2_grad_accum_no_sync", single, multi, entry="completion_logps"))

    # mixed precision: fused and plain logits under the same policy, both against float64 truth
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    truth = single_run(build_model(), batches, dtype=torch.float64) if rank == 0 else None
    runs, seen = {}, {}
    for kind in ("fused", "plain"):
        model = fsdp_wrap(build_model(), "own_head", mesh, policy)
        model.lm_head.register_forward_pre_hook(lambda m, a, kind=kind: seen.update({kind: str(m.weight.dtype)}))
        fn = (lambda m, b: fused_sums(m, b)) if kind == "fused" else plain_sums
        runs[kind] = fsdp_run(model, batches, rank, world, sums_fn=fn)
    if rank == 0:
        fused, plain = compare("mp_fused", truth, runs["fused"]), compare("mp_plain", truth, runs["plain"])
        results.append({"name": "fsdp2_mixed_precision_bf16_fp32", "head_weight_dtype_in_forward": seen,
                        "fused_vs_truth": fused, "plain_vs_truth": plain,
                        "fused_vs_plain": compare("mp_fused_vs_plain", runs["plain"], runs["fused"])})

    # precompute's reference pass and check_lm_head_spec on a sharded model (no grad)
    from dpo_fast.integrations.hf import check_lm_head_spec
    from dpo_fast.precompute import compute_entries

    rows = _examples()
    model = fsdp_wrap(build_model(), "own_head", mesh)
    model.eval()
    worst_head = check_lm_head_spec(model)
    entries, _ = compute_entries(model, rows, max_length=None, truncation_mode="keep_start")
    if rank == 0:
        plain_model = build_model().eval()
        ref_entries, _ = compute_entries(plain_model, rows, max_length=None, truncation_mode="keep_start",
                                         impl="reference")
        with torch.no_grad():
            from dpo_fast.data import collate_preference

            cols = collate_preference(rows, pad_token_id=0)
            plain = plain_sums(plain_model, cols)
        got = torch.tensor([[e.chosen_logps, e.rejected_logps] for e in entries]).T.reshape(-1)
        results.append({"name": "fsdp2_precompute_compute_entries", "logps": rel(got, plain.double()),
                        "check_lm_head_spec_worst": worst_head,
                        "vs_impl_reference": rel(got, torch.tensor([[e.chosen_logps, e.rejected_logps]
                                                                    for e in ref_entries]).T.reshape(-1))})

    # StandardTrainer (fused, reference pass from the initial policy) vs one process (plain logits)
    results.extend(_trainer_check(rank, world, lambda m: fsdp_wrap(m, "own_head", mesh), "fsdp2_standard_trainer"))
    return results


def _examples(n=6, seed=7):
    """Distinct preference pairs of token ids (BOS-led prompts)."""
    from dpo_fast.data import PreferenceExample

    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return tuple(torch.randint(3, V, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist())

    return [PreferenceExample((1,) + ids(2, 6), ids(1, 7), ids(1, 7)) for _ in range(n)]


def _trainer_check(rank, world, wrap, name):
    """StandardTrainer, data parallel (each rank half of every micro-batch, 2 micro-batches per
    step, reference pass from the initial policy), against one process on plain logits."""
    from dpo_fast.trainer import StandardTrainer, TrainerConfig

    examples = _examples(8, seed=11)
    # AdamW turns fp32 rounding noise in near-zero gradient components into lr-sized steps; a
    # large eps keeps the parameter comparison about the gradients.
    cfg = dict(batch_size=4, grad_accum_steps=2, learning_rate=1e-3, shuffle=False, adam_eps=1e-3)

    def train(model, impl):
        trainer = StandardTrainer(model, examples, TrainerConfig(impl=impl, **cfg), pad_token_id=0)
        assert (trainer.rank, trainer.world) == ((rank, world) if impl != "reference" else (0, 1))
        records, grads = [], None
        for _ in range(2):
            records.append(trainer.train_step())
            if grads is None:
                grads = {n: full(p.grad).detach().clone() for n, p in named(model)}
        return {"losses": [r.loss for r in records], "grads": grads, "metrics": [r.metrics for r in records],
                "pairs": [r.pairs for r in records],
                "params": {n: full(p).detach().clone() for n, p in named(model)}}

    single = train(build_model(), "reference") if rank == 0 else None
    multi = train(wrap(build_model()), "torch")
    if rank != 0:
        return []
    metric_diff = max(abs(a[k] - b[k]) for a, b in zip(single["metrics"], multi["metrics"]) for k in a)
    return [compare(name, single, multi, entry="StandardTrainer (reference pass + data-parallel train_step)",
                    metrics=metric_diff, pairs=multi["pairs"])]


# ----------------------------------------------------------------------------- DDP

def group_ddp(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    results = []
    batches = [make_batch(s) for s in (1, 2)]
    for tied in (False, True):
        single = single_run(build_model(tied=tied), batches) if rank == 0 else None
        model = DDP(build_model(tied=tied))
        multi = fsdp_run(model, batches, rank, world)
        spread = rank_spread(multi["params"])
        if rank == 0:
            results.append(compare(f"ddp{'_tied' if tied else ''}", single, multi, entry="completion_logps",
                                   rank_spread=spread))
    results.extend(_trainer_check(rank, world, DDP, "ddp_standard_trainer"))
    return results


# ----------------------------------------------------------------------------- DeepSpeed

def group_deepspeed(rank, world):
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce extension on first use
    # (about 3 minutes on a 2-core box); without it DeepSpeed uses torch.distributed (gloo),
    # which is what these checks are about.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None

    def run(stage, tied, batches, objective, entry="completion_logps", extra=None):
        model = build_model(tied=tied)
        if entry == "trl":
            from dpo_fast.integrations.trl import add_fused_lm_head

            add_fused_lm_head(model)
        config = {"train_micro_batch_size_per_gpu": PAIRS // world, "gradient_accumulation_steps": 1,
                  "train_batch_size": PAIRS, "zero_optimization": {"stage": stage},
                  "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9, "wall_clock_breakdown": False,
                  "gradient_clipping": 0.0}  # DeepSpeed 0.19 clips at 1.0 by default
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                          config=config)
        losses, grads = [], None
        for step in range(2):
            b = shard(batches[step], rank, world)
            loss = objective(fused_sums(engine, b, entry), b)
            engine.backward(loss)
            losses.append(mean_over_ranks(loss))
            if grads is None:
                grads = {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()}
            engine.step()
        params = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}
        if extra is not None:
            extra(engine)
        return {"losses": losses, "grads": grads, "params": params}

    results = []
    batches = [make_batch(s) for s in (1, 2)]
    for stage in (2, 3):
        for tied in (False, True):
            single = single_run(build_model(tied=tied), batches) if rank == 0 else None
            multi = run(stage, tied, batches, lambda sums, b: dpo_objective(sums, b["ref"]))
            if rank == 0:
                results.append(compare(f"deepspeed_zero{stage}{'_tied' if tied else ''}", single, multi,
                                       entry="completion_logps"))

    # packing="shared_prompt_packed" on ZeRO-3 (the head's weight is empty outside its forward, the
    # first-use probe included); reference: one process running the same packed layouts (see group_fsdp2)
    shared = [shared_prompt_batch(s) for s in (1, 2)]
    single = single_run(build_model(), shared) if rank == 0 else None
    multi = run(3, False, shared, lambda sums, b: dpo_objective(sums, b["ref"]), entry="packed")
    if rank == 0:
        packed = single_run(build_model(), shared, sums_fn=lambda m, b: fused_sums(m, b, "packed"), shards=world)
        results.append(compare("deepspeed_zero3_packed", packed, multi, entry="packed",
                               vs_plain=compare("deepspeed_zero3_packed_vs_plain", single, multi)))

    # the patched TRL forward, and the precompute reference pass, on a ZeRO-3 engine with a tied head
    from dpo_fast.integrations.hf import check_lm_head_spec
    from dpo_fast.precompute import compute_entries

    rows, found = _examples(), {}

    def reference_pass(engine):  # after training: compare with the trained parameters in one process
        engine.eval()
        found["head"] = check_lm_head_spec(engine)
        entries, _ = compute_entries(engine, rows, max_length=None, truncation_mode="keep_start")
        found["logps"] = torch.tensor([[e.chosen_logps, e.rejected_logps] for e in entries]).T.reshape(-1)

    single = single_run(build_model(tied=True), batches) if rank == 0 else None
    multi = run(3, True, batches, lambda sums, b: dpo_objective(sums, b["ref"]), entry="trl", extra=reference_pass)
    if rank == 0:
        results.append(compare("deepspeed_zero3_tied_trl_patch", single, multi, entry="trl add_fused_lm_head"))
        from dpo_fast.data import collate_preference

        trained = build_model(tied=True)  # the one-process model after the same 2 steps
        trained.load_state_dict(single["params"], strict=False)  # lm_head.weight is embed_tokens.weight
        with torch.no_grad():
            plain = plain_sums(trained.eval(), collate_preference(rows, pad_token_id=0))
        results.append({"name": "deepspeed_zero3_tied_precompute_compute_entries",
                        "logps": rel(found["logps"], plain.double()), "check_lm_head_spec_worst": found["head"]})

    # ZeRO-3 where rank 1 has no completion token at all: it must still make the same gathers
    # (else every rank hangs) and contribute a zero gradient. Objective: the token-summed log-prob.
    batches = [make_batch(s) for s in (5, 6)]
    for b in batches:
        pairs = b["input_ids"].shape[0] // 2
        for i in list(range(pairs // 2, pairs)) + list(range(pairs + pairs // 2, 2 * pairs)):
            b["completion_mask"][i] = 0
    tokens = [int(b["completion_mask"][:, 1:].sum()) for b in batches]
    single = single_run(build_model(), batches, objective=lambda sums, b: -sums.sum() / tokens[0]) \
        if rank == 0 else None
    multi = run(3, False, batches, lambda sums, b: -sums.sum() * world / tokens[0])
    if rank == 0:
        results.append(compare("deepspeed_zero3_rank_without_tokens", single, multi, entry="completion_logps"))
    return results


GROUPS = {"fsdp2": group_fsdp2, "ddp": group_ddp, "deepspeed": group_deepspeed}


def main(argv):
    group, out_path = argv
    torch.set_num_threads(1)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        results = GROUPS[group](rank, world)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        with contextlib.suppress(Exception):
            dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
