"""DPO with dpo_fast's fused head on a DeepSpeed ZeRO-3 engine (own training loop, raw deepspeed.initialize).

    DS_ACCELERATOR=cpu torchrun --nproc-per-node 2 examples/deepspeed_zero3_dpo.py   # CPU + gloo
    torchrun --nproc-per-node 8 examples/deepspeed_zero3_dpo.py --model /path/to/hf-model --tied

:func:`dpo_fast.integrations.hf.completion_logps` is called on the engine: the model's own
forward runs through it, the lm_head's forward computes the fused log-probs, and ZeRO-3 gathers
the partitioned head for that forward and again for the recomputing backward, on every rank,
whatever its token count; tied embeddings are the engine's usual shared parameter. ``--stage 2``
runs ZeRO-2. ``--check`` computes the first step in one process on the whole batch from plain
logits (rank 0) and prints the largest relative gradient difference.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.distributed as dist


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="local Hugging Face causal-LM folder (default: a tiny random Llama)")
    p.add_argument("--stage", type=int, default=3, choices=[2, 3])
    p.add_argument("--tied", action="store_true", help="tiny model: tie lm_head to the input embedding")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--pairs", type=int, default=8, help="preference pairs per step, split across ranks")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--check", action="store_true")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from fsdp2_dpo import make_batch, train  # the same data, loss and --check as the FSDP2 example

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")

    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    else:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=512,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             tie_word_embeddings=args.tied))
    single = copy.deepcopy(model).to(device) if (args.check and rank == 0) else None
    config = {"train_micro_batch_size_per_gpu": args.pairs // world, "train_batch_size": args.pairs,
              "gradient_accumulation_steps": 1, "zero_optimization": {"stage": args.stage},
              "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=args.lr),
                                      config=config)
    vocab = engine.module.config.vocab_size
    batches = [make_batch(s, args.pairs, args.seq_len, vocab, device) for s in range(args.steps)]
    def backward_and_step(loss, gather):
        engine.backward(loss)
        grads = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()} if gather else None
        engine.step()
        return grads

    train(engine, batches, backward_and_step, single, args, rank, world)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
