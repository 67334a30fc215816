"""TRL's DPOTrainer with dpo_fast's fused head (FusedDPOTrainer), for accelerate-launched runs.

    python examples/trl_fused_dpo.py --model PATH --dataset prefs.jsonl                # one device
    accelerate launch --config_file examples/accelerate_zero3.yaml examples/trl_fused_dpo.py --model PATH ...
    accelerate launch --config_file examples/accelerate_fsdp2.yaml examples/trl_fused_dpo.py --model PATH ...

The policy and reference log-probs come from the fused head, which runs inside the model's own
forward, so accelerate's FSDP2 or DeepSpeed ZeRO-3 wrapping handles the lm_head like any module.
``--ref-cache`` reads the reference log-probs from a ``dpo-fast precompute`` cache instead of
building a reference model.
"""
from __future__ import annotations

import argparse


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="local Hugging Face causal-LM folder")
    p.add_argument("--dataset", required=True, help="JSONL/Parquet preference file (prompt/chosen/rejected)")
    p.add_argument("--output-dir", default="dpo-fused-out")
    p.add_argument("--ref-cache", help="dpo-fast precompute cache (no reference model is built)")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args()

    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    from dpo_fast.integrations.trl import FusedDPOTrainer

    kind = "json" if args.dataset.endswith((".jsonl", ".json")) else "parquet"
    train = load_dataset(kind, data_files=args.dataset, split="train")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model)
    config = DPOConfig(output_dir=args.output_dir, max_length=args.max_length,
                       per_device_train_batch_size=args.batch_size, max_steps=args.max_steps, bf16=args.bf16,
                       logging_steps=1, report_to="none", save_strategy="no")
    trainer = FusedDPOTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer,
                              ref_logps_cache=args.ref_cache)
    trainer.train()


if __name__ == "__main__":
    main()
