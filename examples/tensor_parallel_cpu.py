"""DPO log-probs through a tensor-parallel (vocabulary-split) lm_head, on a CPU box with gloo.

    torchrun --nproc-per-node 2 examples/tensor_parallel_cpu.py

Builds a tiny Llama (random weights, no download), loads it with transformers' tensor-parallel
plan (``tp_plan="auto"``: every rank keeps its own rows of the lm_head, a DTensor Shard(0)),
and computes one DPO loss two ways on every rank: dpo_fast's vocabulary-parallel path
(``completion_logps`` detects the split head; no rank builds the logits or gathers the head)
and the model's own gathered logits. It prints the loss difference and the largest lm_head
gradient difference; with a real model, pass its path instead of building one.
"""
from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.distributed as dist


def main(model_dir=None):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from dpo_fast import dpo_loss
    from dpo_fast.integrations.hf import completion_logps, lm_head_spec

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tmp = None
    if model_dir is None:  # rank 0 writes a tiny random model, the others wait for it
        tmp = tempfile.mkdtemp() if rank == 0 else None
        box = [tmp]
        dist.broadcast_object_list(box, src=0)
        model_dir = box[0]
        if rank == 0:
            torch.manual_seed(0)
            config = LlamaConfig(vocab_size=1001, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
            LlamaForCausalLM(config).save_pretrained(model_dir)
        dist.barrier()
    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=torch.float32)
    spec = lm_head_spec(model)
    head = spec.weight
    print(f"rank {rank}: lm_head {tuple(head.shape)} split by rows, this rank holds {tuple(head.to_local().shape)}; "
          f"vocabulary-parallel path: {spec.vocab_parallel}", flush=True)

    g = torch.Generator().manual_seed(0)  # the same batch on every rank (tensor parallel)
    ids = torch.randint(0, model.config.vocab_size, (4, 24), generator=g)  # rows 0,1 chosen; 2,3 rejected
    attention = torch.ones_like(ids)
    completion = torch.zeros_like(ids)
    completion[:, 10:] = 1

    def loss_of(fused):
        model.zero_grad(set_to_none=True)
        if fused:
            logps = completion_logps(model, ids, attention, completion).sum(-1)
        else:
            logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits  # [B, T, V] gathered
            lp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
            logps = (lp * completion[:, 1:]).sum(-1)
        out = dpo_loss(logps[:2], logps[2:], torch.full((2,), -200.0), torch.full((2,), -200.0), beta=0.1)
        out.loss.backward()
        return out.loss.detach(), head.grad.full_tensor()

    (loss_f, grad_f), (loss_p, grad_p) = loss_of(True), loss_of(False)
    if rank == 0:
        print(f"loss fused {loss_f.item():.6f}  plain logits {loss_p.item():.6f}  |diff| {abs(loss_f - loss_p).item():.2e}")
        print(f"lm_head gradient max |diff| {(grad_f - grad_p).abs().max().item():.2e} "
              f"(max |grad| {grad_p.abs().max().item():.2e})")
    dist.barrier()
    if tmp is not None:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    if "RANK" not in os.environ:
        sys.exit("run with: torchrun --nproc-per-node 2 examples/tensor_parallel_cpu.py [model_dir]")
    main(sys.argv[1] if len(sys.argv) > 1 else None)
