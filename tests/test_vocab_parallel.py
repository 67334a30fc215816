"""Vocabulary-parallel head (dpo_fast.vocab_parallel) on 2 and 3 gloo ranks, against the float64 oracle.

Each test spawns one process group and runs many checks inside it (process start-up is the
cost on a 2-core CI box). Every rank builds the same full weight from one seed, keeps its own
rows (uneven splits, including 1 and 0 rows), and compares its outputs, the complete
grad_hidden and its own rows of grad_weight/grad_bias with ``dpo_fast.reference`` run on the
full weight in float64 in the same process. Failures inside a rank propagate as exceptions.
"""
from __future__ import annotations

import os
import socket
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dpo_fast import fused_linear_dpo_loss, linear_logprobs
from dpo_fast.options import EXTRA_OUTPUTS
from dpo_fast.reference import reference_dpo_loss, reference_linear_logprobs
from dpo_fast.vocab_parallel import VocabParallelLinearLogprobs, VocabShard, vocab_parallel_linear_logprobs
from tests._helpers import ROUNDING, assert_no_worse_than_naive, max_err

OUTPUTS = ("log_probs",) + EXTRA_OUTPUTS
# The ranks run on CPU (gloo); impl="triton" is checked there under the interpreter, which
# tests/conftest.py switches on when no GPU is present (the ranks inherit it).
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CONFIGS = {
    "plain": dict(bias=False),
    "all": dict(bias=True, softcap=4.0, logit_scale=1.7, temperature=0.7),
}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(fn, world, *args, timeout=240):
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; fail (not hang) after ``timeout`` s."""
    ctx = mp.start_processes(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{world}-rank run of {fn.__name__} did not finish in {timeout} s (hang?)")


# ----------------------------------------------------------------------------------------------
# Inputs and comparisons (run inside the ranks).

def _inputs(sizes, dtype, *, bias, seed, shape=(3, 13), hidden_size=24, ignore_frac=0.25):
    """Full hidden/weight/bias/labels (identical on every rank) and this rank's rows."""
    g = torch.Generator().manual_seed(seed)
    v = sum(sizes)
    hidden = torch.randn(*shape, hidden_size, generator=g).to(dtype)
    weight = (torch.randn(v, hidden_size, generator=g) * 1.5 / hidden_size**0.5).to(dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, v, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = -100
    labels.view(-1)[:2] = torch.tensor([0, v - 1])  # first and last vocabulary ids
    return hidden, weight, b, labels


def _rows(t, sizes, rank):
    if t is None:
        return None
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]].detach().clone().requires_grad_()


def _scale(t):
    return max(1.0, t.abs().max().item()) if t.numel() else 1.0


def _grads(out, tensors, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    live = [t for t in tensors if t is not None]
    return torch.autograd.grad((out * g).sum(), live)


def _check_against_oracle(rank, sizes, dtype, config, impl, seed, *, labels_fn=None):
    """All outputs and gradients of the vocabulary-parallel op against the float64 truth."""
    kw = dict(CONFIGS[config])
    has_bias = kw.pop("bias")
    hidden, weight, bias, labels = _inputs(sizes, dtype, bias=has_bias, seed=seed)
    if labels_fn is not None:
        labels = labels_fn(labels)
    start = sum(sizes[:rank])
    h = hidden.clone().requires_grad_()
    w, b = _rows(weight, sizes, rank), _rows(bias, sizes, rank)
    fast = vocab_parallel_linear_logprobs(h, w, labels, b, vocab_start=start, vocab_size=sum(sizes), outputs=OUTPUTS,
                                          impl=impl, **kw)
    full = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    naive = reference_linear_logprobs(full[0], full[1], labels, full[2], outputs=OUTPUTS, **kw)
    f64 = [t.detach().double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    truth = reference_linear_logprobs(f64[0], f64[1], labels, f64[2], outputs=OUTPUTS, **kw)
    where = f"rank {rank} sizes {sizes} {dtype} {config} {impl}"
    for name in OUTPUTS:
        if name == "is_top1":
            if dtype == torch.float32:
                assert torch.equal(fast[name], truth[name]), where
            continue
        assert fast[name].dtype == torch.float32 and fast[name].shape == labels.shape, where
        assert torch.all(fast[name][labels == -100] == 0), (name, where)
        assert_no_worse_than_naive(f"{name} {where}", fast[name], naive[name], truth[name], dtype)
        if dtype == torch.float32:
            assert max_err(fast[name], truth[name]) < 2e-5, (name, where)
    ours = _grads(fast["log_probs"], [h, w, b])
    ref = _grads(naive["log_probs"], full)
    exact = _grads(truth["log_probs"], f64)
    rows = slice(start, start + sizes[rank])
    for name, gf, gn, gt in zip(("hidden", "weight", "bias"), ours, ref, exact):
        # The 16-bit rule is about the whole gradient: a shard's error is held to the naive
        # error and the rounding scale of the full tensor (what one process would be held to).
        gt_mine = gt if name == "hidden" else gt[rows]
        assert gf.dtype == dtype and gf.shape == gt_mine.shape, (name, where)
        e_fast, e_naive = max_err(gf, gt_mine), max_err(gn, gt)
        eps = ROUNDING[dtype] * max(gt.abs().max().item(), 1e-30)
        assert e_fast <= e_naive + eps, f"grad_{name} {where}: error {e_fast:.3g} > naive {e_naive:.3g} + {eps:.3g}"
        if dtype == torch.float32:
            assert e_fast < 1e-5 * _scale(gt), (name, where)


def _check_ties(rank, sizes, impl):
    """Integer logits (exact in any summation order) with many ties, several across rank boundaries:
    is_top1 must say "first maximum wins" exactly as argmax over the full vocabulary."""
    g = torch.Generator().manual_seed(7)
    v, n = sum(sizes), 40
    hidden = torch.randint(-1, 2, (n, 8), generator=g).float()
    weight = torch.randint(-1, 2, (v, 8), generator=g).float()
    z = hidden @ weight.T
    top = z.max(-1).values
    first = z.argmax(-1)
    last = v - 1 - z.flip(-1).argmax(-1)
    labels = torch.where(torch.arange(n) % 2 == 0, first, last)
    assert bool((first != last).any())  # ties exist
    start = sum(sizes[:rank])
    for b in (None, torch.zeros(v)):
        out = vocab_parallel_linear_logprobs(hidden, weight[start:start + sizes[rank]], labels,
                                             None if b is None else b[start:start + sizes[rank]], vocab_start=start,
                                             vocab_size=v, outputs=("is_top1",), impl=impl)["is_top1"]
        assert torch.equal(out, first == labels)
    # Ties whose rows sit on different ranks: each rank's first row equals the previous rank's last.
    w2 = weight.clone()
    for r in range(1, len(sizes)):
        s = sum(sizes[:r])
        if sizes[r] and s:
            w2[s] = w2[s - 1] = hidden[0] * 2  # the maximum for token 0
    z2 = hidden @ w2.T
    lab2 = torch.stack([z2.argmax(-1), v - 1 - z2.flip(-1).argmax(-1)]).reshape(-1)
    h2 = torch.cat([hidden, hidden])
    out = vocab_parallel_linear_logprobs(h2, w2[start:start + sizes[rank]], lab2, vocab_start=start, vocab_size=v,
                                         outputs=("is_top1",), impl=impl)["is_top1"]
    assert torch.equal(out, reference_linear_logprobs(h2, w2, lab2, outputs=("is_top1",))["is_top1"])
    del top


def _check_edge_batches(rank, sizes, impl):
    """All tokens ignored (no vocabulary work and no collective on any rank, zero gradients), and
    every label owned by one rank (the others own none)."""
    hidden, weight, _, labels = _inputs(sizes, torch.float32, bias=False, seed=3)
    start = sum(sizes[:rank])
    h, w = hidden.clone().requires_grad_(), _rows(weight, sizes, rank)
    out = vocab_parallel_linear_logprobs(h, w, torch.full_like(labels, -100), vocab_start=start,
                                         vocab_size=sum(sizes), outputs=OUTPUTS, impl=impl)
    assert all(torch.all(out[k] == 0) for k in OUTPUTS)
    gh, gw = _grads(out["log_probs"], [h, w])
    assert torch.all(gh == 0) and torch.all(gw == 0) and gw.shape == w.shape
    module = VocabParallelLinearLogprobs(vocab_start=start, vocab_size=sum(sizes), outputs=OUTPUTS, impl=impl,
                                         softcap=3.0)
    functional = vocab_parallel_linear_logprobs(hidden, w, labels, vocab_start=start, vocab_size=sum(sizes),
                                                outputs=OUTPUTS, impl=impl, softcap=3.0)
    by_module = module(hidden, w, labels)
    assert all(torch.equal(by_module[k], functional[k]) for k in OUTPUTS)
    owner = max(range(len(sizes)), key=lambda r: sizes[r])
    lo = sum(sizes[:owner])
    _check_against_oracle(rank, sizes, torch.float32, "all", impl, seed=4,
                          labels_fn=lambda lab: torch.where(lab == -100, lab, lo + lab % sizes[owner]))


def _check_dpo(rank, sizes, impl):
    """fused_linear_dpo_loss / FusedLinearDPOLoss through the vocabulary-parallel head."""
    from dpo_fast import FusedLinearDPOLoss

    hc, w, b, lc = _inputs(sizes, torch.float32, bias=True, seed=11, shape=(3, 9))
    hr, _, _, lr = _inputs(sizes, torch.float32, bias=True, seed=12, shape=(3, 12))
    lc[:, :2], lr[:, :3] = -100, -100
    lc[:, 2], lr[:, 3] = 5, 6  # every sequence keeps a completion token
    ref_c, ref_r = torch.tensor([-30.0, -25.0, -28.0]), torch.tensor([-31.0, -24.0, -29.0])
    start, v = sum(sizes[:rank]), sum(sizes)
    leaves = [hc.clone().requires_grad_(), hr.clone().requires_grad_(), _rows(w, sizes, rank), _rows(b, sizes, rank)]
    shard = VocabShard(start=start, vocab_size=v)
    kw = dict(softcap=6.0, temperature=0.9)
    out = fused_linear_dpo_loss(leaves[0], lc, leaves[1], lr, leaves[2], leaves[3], ref_c, ref_r, beta=0.1,
                                impl=impl, vocab_parallel=shard, **kw)
    grads = torch.autograd.grad(out.loss, leaves)
    f64 = [t.detach().double().requires_grad_() for t in (hc, hr, w, b)]
    pc = reference_linear_logprobs(f64[0], f64[2], lc, f64[3], **kw).sum(-1)
    pr = reference_linear_logprobs(f64[1], f64[2], lr, f64[3], **kw).sum(-1)
    truth = reference_dpo_loss(pc, pr, ref_c.double(), ref_r.double(), beta=0.1)[0]
    exact = torch.autograd.grad(truth, f64)
    assert abs(out.loss.item() - truth.item()) < 1e-5 * max(1.0, abs(truth.item()))
    rows = slice(start, start + sizes[rank])
    for name, gf, gt in zip(("chosen_hidden", "rejected_hidden", "weight", "bias"), grads,
                            (exact[0], exact[1], exact[2][rows], exact[3][rows])):
        assert gf.shape == gt.shape and max_err(gf, gt) < 1e-5 * _scale(gt), name
    module = FusedLinearDPOLoss(beta=0.1, impl=impl, vocab_parallel=shard, **kw)
    again = module(hc, lc, hr, lr, _rows(w, sizes, rank), _rows(b, sizes, rank), ref_c, ref_r)
    assert torch.equal(again.loss.detach(), out.loss.detach())


class _ShapeProbe(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shape of every tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def _check_no_full_vocab_tensor(rank, sizes, impl):
    """Forward + backward never produce a tensor with a dimension as large as the full vocabulary."""
    kw = dict(CONFIGS["all"])
    kw.pop("bias")
    hidden, weight, bias, labels = _inputs(sizes, torch.float32, bias=True, seed=5, shape=(2, 5), hidden_size=8)
    v = sum(sizes)
    assert v > hidden.numel() and v > max(sizes)
    h, w, b = hidden.clone().requires_grad_(), _rows(weight, sizes, rank), _rows(bias, sizes, rank)
    probe = _ShapeProbe()
    with probe:
        out = vocab_parallel_linear_logprobs(h, w, labels, b, vocab_start=sum(sizes[:rank]), vocab_size=v,
                                             outputs=OUTPUTS, impl=impl, **kw)
        out["log_probs"].sum().backward()
    assert len(probe.shapes) > 10
    big = [(f, s) for f, s in probe.shapes if any(d >= v for d in s)]
    assert not big, f"full-vocabulary tensors: {big[:5]}"


def _raises_everywhere(fn, match):
    try:
        fn()
    except (ValueError, TypeError, RuntimeError) as exc:
        assert match in str(exc), f"expected {match!r} in: {exc}"
        return
    raise AssertionError(f"no error (expected {match!r})")


def _check_errors(rank, sizes):
    """Bad input on one rank, or inputs that differ across ranks, raise on every rank before compute."""
    hidden, weight, _, labels = _inputs(sizes, torch.float32, bias=False, seed=6)
    v, start = sum(sizes), sum(sizes[:rank])
    w = weight[start:start + sizes[rank]]
    call = lambda h=hidden, lab=labels, **kw: vocab_parallel_linear_logprobs(  # noqa: E731
        h, w, lab, **{"vocab_start": start, "vocab_size": v, "impl": "torch", **kw})
    bad = labels.clone()
    if rank == 1:
        bad[0, 0] = v  # out of range on one rank only
    _raises_everywhere(lambda: call(lab=bad), "labels must hold token ids in [0" if rank == 1 else "rank(s) [1]")
    other = labels.clone()
    other[0, 1] = (other[0, 1] + 1 + rank) % v
    _raises_everywhere(lambda: call(lab=other), "every rank must hold the same labels")
    _raises_everywhere(lambda: call(h=hidden + rank), "hidden differs across ranks")
    _raises_everywhere(lambda: call(vocab_start=0), "do not tile")
    _raises_everywhere(lambda: call(temperature=1.0 + rank), "temperature differs across ranks")
    _raises_everywhere(lambda: call(outputs=("log_probs", "is_top1") if rank else ("log_probs", "entropy")),
                       "outputs differs across ranks")
    _raises_everywhere(lambda: call(impl="reference"), "impl='reference' is not available")
    _raises_everywhere(lambda: call(vocab_start=None), "needs vocab_start")
    _raises_everywhere(lambda: call(vocab_start=-1 if rank == 0 else start),
                       "vocab_start must be in" if rank == 0 else "rank(s) [0]")
    _raises_everywhere(lambda: call(h=hidden.double() if rank == 1 else hidden),
                       "dtypes must agree" if rank == 1 else "rank(s) [1]")
    # Still usable afterwards: no rank was left inside a collective.
    call()


def _check_dtensor(rank, world, sizes_unused, impl):
    """A DTensor weight: Shard(0) + DTensor hidden -> vocabulary-parallel; plain hidden -> error at the
    op level (FSDP2 and TP look the same there), accepted by the explicit API; other layouts -> errors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from dpo_fast import FusedLinearDPOLoss

    mesh = init_device_mesh("cpu", (world,))
    v = 101  # torch's Shard(0) chunking gives uneven shards
    hidden, weight, bias, labels = _inputs([v], torch.float32, bias=True, seed=8)
    kw = dict(softcap=5.0, outputs=OUTPUTS)
    f64 = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    truth = reference_linear_logprobs(f64[0], f64[1], labels, f64[2], **kw)
    exact = _grads(truth["log_probs"], f64)
    wd = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
    bd = distribute_tensor(bias, mesh, [Shard(0)]).requires_grad_()
    hd = distribute_tensor(hidden, mesh, [Replicate()]).requires_grad_()
    out = linear_logprobs(hd, wd, labels, bd, impl=impl, **kw)
    for name in OUTPUTS:
        if name != "is_top1":
            assert max_err(out[name], truth[name]) < 2e-5, name
    assert torch.equal(out["is_top1"], truth["is_top1"])
    gh, gw, gb = _grads(out["log_probs"], [hd, wd, bd])
    assert tuple(gw.placements) == (Shard(0),) and gw.to_local().shape[0] < v
    for gf, gt in zip((gh.full_tensor(), gw.full_tensor(), gb.full_tensor()), exact):
        assert max_err(gf, gt) < 1e-5 * _scale(gt)
    # Hidden states sharded on the token dimension (sequence parallel) are gathered; their
    # gradient comes back as this rank's slice of the complete one.
    hs = distribute_tensor(hidden, mesh, [Shard(1)]).requires_grad_()
    out_s = linear_logprobs(hs, wd, labels, bd, impl=impl, softcap=5.0)
    assert max_err(out_s, truth["log_probs"]) < 2e-5
    (gs,) = _grads(out_s, [hs])
    assert tuple(gs.placements) == (Shard(1),) and max_err(gs.full_tensor(), exact[0]) < 1e-5 * _scale(exact[0])
    # Plain hidden states: explicit API works, the generic op refuses to guess (FSDP2 vs TP).
    h = hidden.clone().requires_grad_()
    out2 = vocab_parallel_linear_logprobs(h, wd, labels, bd, impl=impl, **kw)
    assert max_err(out2["log_probs"], truth["log_probs"]) < 2e-5
    out3 = vocab_parallel_linear_logprobs(hidden, wd.to_local(), labels, bd.to_local(), group=mesh, vocab_size=v,
                                          vocab_start=rank * -(-v // world), impl=impl, **kw)  # torch's chunking
    assert torch.equal(out3["log_probs"], out2["log_probs"])
    _raises_everywhere(lambda: linear_logprobs(hidden, wd, labels, bd, impl=impl), "FSDP2")
    _raises_everywhere(lambda: linear_logprobs(hidden, distribute_tensor(weight, mesh, [Replicate()]), labels),
                       "Shard(0) over a 1-D mesh")
    _raises_everywhere(lambda: linear_logprobs(hd, weight, labels), "the weight is not")
    _raises_everywhere(lambda: linear_logprobs(distribute_tensor(hidden, mesh, [Shard(2)]), wd, labels, bd),
                       "feature dimension")
    # The DPO loss with a DTensor head.
    lc, lr = labels[:2], labels[1:]
    lc[:, 0], lr[:, 0] = 3, 4
    loss = FusedLinearDPOLoss(beta=0.1, impl=impl, vocab_parallel=True)(hidden[:2], lc, hidden[1:], lr, wd, bd)
    pc = reference_linear_logprobs(f64[0][:2], f64[1], lc, f64[2]).sum(-1)
    pr = reference_linear_logprobs(f64[0][1:], f64[1], lr, f64[2]).sum(-1)
    assert abs(loss.loss.item() - reference_dpo_loss(pc, pr, beta=0.1)[0].item()) < 1e-5
    _raises_everywhere(lambda: fused_linear_dpo_loss(hidden[:2], lc, hidden[1:], lr, wd, bd), "FSDP2")
    # A real FSDP2 head read outside its forward (each rank with its own data): refused, not guessed.
    from torch.distributed.fsdp import fully_shard

    head = torch.nn.Linear(hidden.shape[-1], v, bias=False)
    fully_shard(head, mesh=mesh)
    mine = hidden + rank  # data parallel: different hidden states per rank
    _raises_everywhere(lambda: linear_logprobs(mine, head.weight, labels), "register_fsdp_forward_method")
    _raises_everywhere(lambda: FusedLinearDPOLoss()(mine[:2], lc, mine[1:], lr, head.weight), "FSDP2")
    _raises_everywhere(lambda: vocab_parallel_linear_logprobs(mine, head.weight, labels), "hidden differs across ranks")


def _check_hf_tensor_parallel(rank, world, model_dir):
    """A transformers model loaded with tp_plan="auto": lm_head_spec detects the vocabulary-split
    head, completion_logps takes the vocabulary-parallel path (the head is never gathered) and
    matches the same TP model's own logits, and one process without TP, in loss and gradients."""
    from transformers import AutoModelForCausalLM

    from dpo_fast.integrations.hf import check_lm_head_spec, completion_logps, lm_head_spec

    tp = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=torch.float32)
    single = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    spec = lm_head_spec(tp)
    if tp.config.tie_word_embeddings:
        assert spec.weight is tp.get_input_embeddings().weight
    assert spec.vocab_parallel and not lm_head_spec(single).vocab_parallel
    assert spec.weight.to_local().shape[0] < spec.weight.shape[0]
    check_lm_head_spec(tp)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tp.config.vocab_size, (2, 9), generator=g)
    am = torch.ones_like(ids)
    am[1, :2] = 0
    cm = torch.zeros_like(ids)
    cm[:, 4:] = 1

    def plain(model):
        logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits
        lp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        return lp * cm[:, 1:]

    def step(model, fused):
        model.zero_grad(set_to_none=True)
        lp = completion_logps(model, ids, am, cm, impl="torch")[:, :-1] if fused else plain(model)
        loss = -(lp.sum(-1) * torch.tensor([1.0, 0.5])).sum()
        loss.backward()
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                 for n, p in model.named_parameters()}
        return loss.detach(), lp.detach(), grads

    loss_f, lp_f, grads_f = step(tp, True)
    for name, (loss_o, lp_o, grads_o) in (("TP logits", step(tp, False)), ("one process", step(single, False))):
        assert abs(loss_f.item() - loss_o.item()) <= 1e-5 * abs(loss_o.item()), name
        assert max_err(lp_f, lp_o) < 1e-5, name
        assert grads_f.keys() == grads_o.keys()
        for n in grads_o:
            scale = max(1e-6, grads_o[n].abs().max().item())
            assert max_err(grads_f[n], grads_o[n]) <= 1e-5 * scale, (name, n)

    # packing: the tensor-parallel head keeps the vocabulary-parallel backbone path on the packed
    # layout (2 pairs sharing their prompts, in one row); vs one process on the padded batch
    from dpo_fast.integrations.packing import packed_completion_logps

    pids = torch.randint(0, tp.config.vocab_size, (4, 9), generator=g)
    pids[2:, :4] = pids[:2, :4]
    pam = torch.ones_like(pids)
    pam[1, 7:] = 0
    pam[3, 6:] = 0
    pcm = torch.zeros_like(pids)
    pcm[:, 4:] = 1
    pcm *= pam
    weights = torch.tensor([1.0, 0.5, -0.3, 0.8])
    got = {}
    for key, model, fn in (("tp packed", tp, packed_completion_logps), ("one process", single, completion_logps)):
        model.zero_grad(set_to_none=True)
        lp = fn(model, pids, pam, pcm, impl="torch")
        (lp.sum(-1) * weights).sum().backward()
        got[key] = (lp.detach(), {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                                  for n, p in model.named_parameters()})
    (lp_p, grads_p), (lp_o, grads_o) = got["tp packed"], got["one process"]
    assert max_err(lp_p, lp_o) < 1e-5
    assert grads_p.keys() == grads_o.keys()
    for n in grads_o:
        assert max_err(grads_p[n], grads_o[n]) <= 1e-5 * max(1e-6, grads_o[n].abs().max().item()), ("packed", n)


# ----------------------------------------------------------------------------------------------
# The process groups.

def _two_ranks(rank, world, model_dirs):
    sizes = [70, 53]
    for dtype in (torch.float32, torch.bfloat16):
        for i, config in enumerate(CONFIGS):
            _check_against_oracle(rank, sizes, dtype, config, "torch", seed=10 * i + (dtype == torch.bfloat16))
    _check_ties(rank, sizes, "torch")
    _check_edge_batches(rank, sizes, "torch")
    _check_dpo(rank, sizes, "torch")
    _check_no_full_vocab_tensor(rank, sizes, "torch")
    _check_errors(rank, sizes)
    _check_dtensor(rank, world, sizes, "torch")
    for model_dir in model_dirs:
        _check_hf_tensor_parallel(rank, world, model_dir)
    if _INTERPRETED:  # impl="triton" on these CPU tensors: the local kernels with out-of-shard labels
        _check_against_oracle(rank, [40, 27], torch.float32, "all", "triton", seed=20)
        _check_against_oracle(rank, [40, 27], torch.bfloat16, "plain", "triton", seed=21)


def _three_ranks(rank, world):
    for sizes in ([50, 1, 72], [60, 0, 63]):
        for dtype in (torch.float32, torch.bfloat16):
            _check_against_oracle(rank, sizes, dtype, "all", "torch", seed=30 + (dtype == torch.bfloat16))
        _check_against_oracle(rank, sizes, torch.float32, "plain", "torch", seed=32)
        _check_ties(rank, sizes, "torch")
        _check_edge_batches(rank, sizes, "torch")
    _check_dpo(rank, [33, 41, 49], "torch")
    _check_no_full_vocab_tensor(rank, [50, 1, 72], "torch")
    _check_dtensor(rank, world, None, "torch")
    if _INTERPRETED:
        _check_against_oracle(rank, [20, 1, 30], torch.float32, "all", "triton", seed=40)
        _check_ties(rank, [20, 1, 30], "triton")


@pytest.fixture(scope="module")
def tiny_llama_dirs():
    """A tiny Llama saved twice: untied lm_head, and tied to the (also vocabulary-split) embedding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        dirs = []
        for tied in (False, True):
            config = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
            dirs.append(os.path.join(d, f"tied{int(tied)}"))
            LlamaForCausalLM(config).save_pretrained(dirs[-1])
        yield dirs


def test_vocab_parallel_two_ranks(tiny_llama_dirs):
    _spawn(_two_ranks, 2, tiny_llama_dirs)


def test_vocab_parallel_three_ranks():
    _spawn(_three_ranks, 3)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not _INTERPRETED, reason="CPU tensors: the Triton kernels run here only under TRITON_INTERPRET=1"))])
def test_backends_give_no_label_term_outside_the_shard(impl):
    """The contract this module relies on: a label outside ``[0, V_local)`` (-1 here) makes the
    backend's forward return ``-lse`` and its backward drop the one-hot term."""
    from dpo_fast.ops import _backend
    from dpo_fast.options import LogprobOptions
    from dpo_fast.reference import reference_logits
    from tests._helpers import make_linear_inputs

    h, w, labels, b = (t.detach() for t in make_linear_inputs((9,), 67, 16, torch.float32, bias=True, ignore_frac=0))
    labels[::2] = -1
    opts = LogprobOptions(softcap=3.0, logit_scale=1.2)
    backend = _backend(impl)
    lp, lse, _ = backend.linear_logprobs_fwd(h, w, labels, b, opts)
    f64 = [t.double().requires_grad_() for t in (h, w, b)]
    z = reference_logits(f64[0], f64[1], f64[2], logit_scale=1.2, softcap=3.0)
    own = labels >= 0
    picked = torch.where(own, z.gather(-1, labels.clamp(min=0)[:, None])[:, 0], torch.zeros_like(z[:, 0]))
    truth = picked - torch.logsumexp(z, -1)
    assert max_err(lp, truth) < 1e-5 and max_err(lse, torch.logsumexp(z, -1)) < 1e-5
    g = torch.randn(9, generator=torch.Generator().manual_seed(2))
    grads = backend.linear_logprobs_bwd(g, h, w, labels, b, lse, opts, (True, True, True))
    exact = torch.autograd.grad((truth * g.double()).sum(), f64)
    for gf, gt in zip(grads, exact):
        assert max_err(gf, gt) < 1e-5 * _scale(gt)


def test_vocab_shard_validation_without_a_group():
    with pytest.raises(ValueError, match="vocab_start must be in"):
        VocabShard(start=5, vocab_size=4)
    with pytest.raises(TypeError, match="start must be an int"):
        VocabShard(start=1.0, vocab_size=4)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            vocab_parallel_linear_logprobs(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 1]), vocab_start=0,
                                           vocab_size=3, impl="torch")
