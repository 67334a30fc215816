"""``dpo-fast example``: the fused DPO loss against the oracle on a CPU-sized batch.

Runs :func:`dpo_fast.fused_linear_dpo_loss` (``impl="torch"`` on CPU, ``"auto"`` elsewhere)
and the naive oracle on the same random batch, forward and backward, and prints the peak
extra memory of each and their agreement (loss and every gradient).
"""
from __future__ import annotations



def register(sub):
    p = sub.add_parser("example", help="fused DPO loss vs the naive oracle: memory and agreement on one batch")
    p.add_argument("--pairs", type=int, default=4, help="preference pairs in the batch (default 4)")
    p.add_argument("--seq-len", type=int, default=512, help="completion tokens per sequence (default 512)")
    p.add_argument("--vocab", type=int, default=32768, help="vocabulary size V (default 32768)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size H (default 256)")
    p.add_argument("--impl", default="auto", choices=["auto", "torch", "triton"])
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    import torch

    from . import fused_linear_dpo_loss
    from .memory import measure_peak
    from .ops import triton_available

    for flag, value in (("--pairs", args.pairs), ("--seq-len", args.seq_len), ("--vocab", args.vocab),
                        ("--hidden", args.hidden)):
        if value < 1:
            print(f"dpo-fast example: error: {flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if args.impl == "triton" and not triton_available():
        print("dpo-fast example: error: --impl triton needs the triton package and a CUDA device "
              "(or TRITON_INTERPRET=1 for the CPU interpreter)", file=sys.stderr)
        return 2

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    b, t, v, h = args.pairs, args.seq_len, args.vocab, args.hidden
    make = lambda *shape, std=1.0: (torch.randn(*shape, generator=g) * std).to(device)  # noqa: E731
    hc, hr = make(b, t, h), make(b, t, h)
    weight = make(v, h, std=h**-0.5)
    labels = [torch.randint(0, v, (b, t), generator=g).to(device) for _ in range(2)]
    for lab in labels:
        lab[:, : t // 8] = -100  # a prompt part, ignored
    ref_c, ref_r = make(b, std=5.0) - 30 * t / 8, make(b, std=5.0) - 30 * t / 8
    n_tokens = int(sum((lab != -100).sum() for lab in labels))

    def step(impl):
        leaves = [x.detach().requires_grad_() for x in (hc, hr, weight)]
        out = fused_linear_dpo_loss(leaves[0], labels[0], leaves[1], labels[1], leaves[2], None, ref_c, ref_r,
                                    beta=0.1, impl=impl)
        out.loss.backward()
        return out.loss.detach(), [x.grad for x in leaves]

    step(args.impl if args.impl != "auto" else "auto")  # warm-up (and Triton compilation on GPU)
    (loss_f, grads_f), mem_f, time_f = measure_peak(lambda: step(args.impl), device)
    (loss_r, grads_r), mem_r, time_r = measure_peak(lambda: step("reference"), device)
    mem_f, mem_r = (float("nan") if m is None else m for m in (mem_f, mem_r))
    logits_mib = n_tokens * v * 4 / 2**20
    print(f"dpo_fast example on {device}: {b} pairs x 2 x {t} tokens ({n_tokens} completion tokens), "
          f"V={v}, H={h}; naive fp32 logits alone = {logits_mib:.0f} MiB")
    print(f"{'path':<22}{'loss':>14}{'peak extra MiB':>16}{'time s':>9}")
    print(f"{'fused (' + args.impl + ')':<22}{loss_f.item():>14.6f}{mem_f / 2**20:>16.1f}{time_f:>9.2f}")
    print(f"{'naive oracle':<22}{loss_r.item():>14.6f}{mem_r / 2**20:>16.1f}{time_r:>9.2f}")
    worst = {name: ((a.double() - c.double()).abs().max() / c.double().abs().max().clamp_min(1e-30)).item()
             for name, a, c in zip(("chosen_hidden", "rejected_hidden", "weight"), grads_f, grads_r)}
    print(f"|loss difference| = {abs(loss_f.item() - loss_r.item()):.2e}; worst relative gradient difference: "
          + ", ".join(f"{k} {val:.2e}" for k, val in worst.items()))
    print(f"memory: fused uses {mem_f / max(mem_r, 1):.1%} of the naive path's peak extra")
    ok = abs(loss_f.item() - loss_r.item()) <= 1e-4 * max(1.0, abs(loss_r.item())) and max(worst.values()) < 1e-3
    print("agreement: OK" if ok else "agreement: MISMATCH")
    return 0 if ok else 1
