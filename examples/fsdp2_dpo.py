"""DPO with dpo_fast's fused head on an FSDP2-sharded causal LM (own training loop).

Runs anywhere torchrun does: on a CPU box with gloo, on GPUs with NCCL::

    torchrun --nproc-per-node 2 examples/fsdp2_dpo.py                       # CPU, tiny random Llama
    torchrun --nproc-per-node 8 examples/fsdp2_dpo.py --model /path/to/model --dtype bfloat16
    torchrun --nproc-per-node 2 examples/fsdp2_dpo.py --memory              # per-rank peak memory

Each rank takes its share of every batch; ``fully_shard`` wraps every decoder layer, the
lm_head (its own unit, unless ``--head-in-root``) and the root. The log-probs come from
:func:`dpo_fast.integrations.hf.completion_logps`, which runs the model's own forward with the
lm_head computing the fused log-probs inside its FSDP unit: no ``[B, T, V]`` logits, and FSDP
unshards the head, and reduce-scatters its gradient, as for any module. ``--check`` also
computes the first step in one process on the whole batch from the model's plain logits (rank 0)
and prints the largest relative difference of any gathered gradient (fp32). ``--memory`` prints
each rank's peak extra memory for one forward+backward, fused vs plain logits.
"""
from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="local Hugging Face causal-LM folder (default: a tiny random Llama)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16: FSDP MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--pairs", type=int, default=8, help="preference pairs per step, split across ranks")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary of the tiny random model")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--head-in-root", action="store_true", help="leave lm_head in the root FSDP unit")
    p.add_argument("--check", action="store_true", help="compare with one process on plain logits (rank 0)")
    p.add_argument("--memory", action="store_true", help="report per-rank peak memory, fused vs plain logits")
    return p.parse_args()


def build_model(args, vocab):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def make_batch(step, pairs, seq_len, vocab, device):
    """Synthetic pairs: [chosen rows; rejected rows], prompt = first quarter, right padding."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(3, vocab, (2 * pairs, seq_len), generator=g)
    attention = torch.ones_like(ids)
    completion = torch.zeros_like(ids)
    for i in range(2 * pairs):
        length = int(torch.randint(seq_len // 2, seq_len + 1, (1,), generator=g))
        attention[i, length:] = 0
        completion[i, seq_len // 4:length] = 1
    ref = torch.randn(2 * pairs, generator=g) - 2.0 * seq_len
    return {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=attention, completion_mask=completion,
                                             ref=ref).items()}


def my_rows(batch, rank, world):
    pairs = batch["input_ids"].shape[0] // 2
    per = pairs // world
    idx = list(range(rank * per, (rank + 1) * per))
    rows = torch.tensor(idx + [pairs + i for i in idx], device=batch["input_ids"].device)
    return {k: v[rows] for k, v in batch.items()}


def dpo_step_loss(model, batch, beta, fused=True):
    from dpo_fast import dpo_loss
    from dpo_fast.integrations.hf import completion_logps

    if fused:
        sums = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]).sum(-1)
    else:  # the model's own logits, for comparison
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        labels = batch["input_ids"][:, 1:]
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        sums = (logp * batch["completion_mask"][:, 1:]).sum(-1)
    b = sums.shape[0] // 2
    ref = batch["ref"]
    return dpo_loss(sums[:b], sums[b:], ref[:b], ref[b:], beta=beta).loss


def shard_model(model, args, mesh):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {"mesh": mesh}
    if args.dtype == "bfloat16":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    if not args.head_in_root:
        fully_shard(model.lm_head, **kw)
    fully_shard(model, **kw)
    return model


def main():
    args = parse_args()
    from torch.distributed.device_mesh import init_device_mesh

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.pairs % world:
        raise SystemExit(f"--pairs ({args.pairs}) must be a multiple of the number of ranks ({world})")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    mesh = init_device_mesh(device.type, (world,))

    base = build_model(args, args.vocab)
    vocab = base.config.vocab_size
    single = copy.deepcopy(base).to(device) if (args.check and rank == 0) else None
    model = shard_model(base.to(device), args, mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)  # before any forward (see README)

    if args.memory:
        report_memory(model, args, vocab, device, rank, world)

    batches = [make_batch(s, args.pairs, args.seq_len, vocab, device) for s in range(args.steps)]
    def backward_and_step(loss, gather):
        loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()} if gather else None  # collective
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grads

    train(model, batches, backward_and_step, single, args, rank, world)
    dist.destroy_process_group()


def train(model, batches, backward_and_step, single, args, rank, world):
    """The DPO steps on this rank's rows; with ``single`` (rank 0, --check) compare the first
    step's gathered gradients with one process on the whole batch from plain logits."""
    for step, batch in enumerate(batches):
        loss = dpo_step_loss(model, my_rows(batch, rank, world), args.beta)
        grads = backward_and_step(loss, gather=args.check and step == 0)  # the same on every rank
        first_grads = grads if step == 0 else first_grads
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        if rank == 0:
            print(f"step {step}: loss {float(mean) / world:.6f}", flush=True)
    if single is not None:
        loss = dpo_step_loss(single, batches[0], args.beta, fused=False)
        loss.backward()
        diffs = {n: float((first_grads[n] - p.grad).abs().max() / p.grad.abs().max())
                 for n, p in single.named_parameters()}
        name = max(diffs, key=diffs.get)
        print(f"--check: step 0 loss {loss.item():.6f} in one process on plain logits; largest relative "
              f"gradient difference {diffs[name]:.3e} ({name})")


def report_memory(model, args, vocab, device, rank, world):
    """Peak extra memory of one forward+backward on this rank's rows, fused vs plain logits."""
    from dpo_fast.memory import measure_peak

    batch = my_rows(make_batch(99, args.pairs, args.seq_len, vocab, device), rank, world)
    head = model.lm_head.weight
    full_head = head.numel() * head.element_size()  # a DTensor's numel is the global one

    def step(fused):
        def run():
            dpo_step_loss(model, batch, args.beta, fused=fused).backward()
            model.zero_grad(set_to_none=True)
        return run

    results = {}
    for kind in ("plain", "fused", "plain", "fused"):  # second round counts (warm allocator)
        dist.barrier()
        _, peak, seconds = measure_peak(step(kind == "fused"), device)
        results[kind] = (peak, seconds)
    tokens = int(batch["attention_mask"].sum())
    logits_bytes = tokens * vocab * 4
    line = (f"rank {rank}: peak extra memory for one forward+backward on {tokens} tokens, V={vocab}: "
            f"plain logits {results['plain'][0] / 2**20:.1f} MiB, fused {results['fused'][0] / 2**20:.1f} MiB "
            f"(full lm_head {full_head / 2**20:.1f} MiB, fp32 logits of these tokens {logits_bytes / 2**20:.1f} MiB)")
    lines = [None] * world
    dist.all_gather_object(lines, line)
    if rank == 0:
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
