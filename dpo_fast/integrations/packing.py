"""Shared-prompt forward and padding-free packing of DPO pairs for Hugging Face causal LMs.

The standard DPO batch (:func:`dpo_fast.data.collate_preference`, TRL's collator) holds each
pair twice, ``[prompt | chosen]`` and ``[prompt | rejected]``, right-padded to the longest row:
the prompt runs through the trunk twice and the padding once more. This module forwards the
same numbers from a smaller input:

* **shared prompt** (``packing="shared_prompt"``): one row per pair,
  ``[prompt | chosen | rejected]``. Rejected tokens attend to the prompt and to earlier
  rejected tokens, never to chosen ones; their position ids continue from the end of the
  prompt, as if chosen were not there. The hidden state that predicts a token is gathered by
  explicit index: the last prompt position predicts both the first chosen and the first
  rejected token.
* **packed** (``packing="shared_prompt_packed"``): several such pair rows are placed one
  after the other in a row (first-fit decreasing), block-diagonal (no attention across pairs),
  position ids restarting at 0 for every pair; rows are only padded at their end, to the
  longest packed row.

Attention path and cost. ``eager`` and ``sdpa`` take the layout as a 4-D mask (boolean for
``sdpa``, additive for ``eager``) of shape ``[rows, 1, L, L]``: transformers returns a 4-D
mask as it is (``masking_utils._preprocess_mask_arguments``), and uses the ``position_ids``
given. With a dense mask, attention costs ``rows * L**2``. So the packed layout never makes a
row longer than the longest pair row of the batch (the row capacity, unless ``max_tokens``
raises it): each packed row costs at most what one unpacked pair row costs, and there are
fewer rows. One long row holding every pair would be padding-free too, but its dense
attention would grow with the square of the whole batch. ``flex_attention`` gets a
``BlockMask`` built from the same rule, whose fully masked blocks are skipped. Sliding-window
layers get the window in their mask (``q - k < window`` in position ids, as transformers
applies it); models with both full and sliding layers (``config.layer_types``) get the
``{"full_attention": ..., "sliding_attention": ...}`` mapping their forward accepts.

Exactness guard. Any other thing an architecture does with the mask or positions (ALiBi built
from a 2-D mask, absolute positions it does not take from ``position_ids``, mask code that
leaks across documents, flash-attention, ...) would make these numbers wrong. On first use
per model and mode, :func:`check_packing_support` runs a small probe batch through both the
packed and the padded path and raises :class:`PackingUnsupportedError`, naming the
architecture and the fallback (``packing=None``), when they differ.
"""
from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass

import torch

from ..options import LogprobOptions
from .hf import _check_batch, _text_config, _unwrap_peft, completion_logps, fused_head_logprobs, lm_head_spec, \
    vocab_parallel_head_logprobs

__all__ = ["PACKING_MODES", "PackingUnsupportedError", "PackedLayout", "check_packing", "build_layout",
           "layout_allowed", "packed_completion_logps", "packed_sequence_logps", "check_packing_support"]

PACKING_MODES = ("shared_prompt", "shared_prompt_packed")
# Architectures whose sliding-window handling (the window in the mask, the per-layer-type mask
# mapping) is verified against the padded path in tests/test_packing.py.
_WINDOW_VERIFIED = frozenset({"mistral", "qwen2", "gemma2"})
_MASK_PATHS = ("eager", "sdpa", "flex_attention")


class PackingUnsupportedError(ValueError):
    """The model cannot run the shared-prompt/packed layout exactly; use ``packing=None``."""


def check_packing(packing):
    """``packing`` must be None or one of :data:`PACKING_MODES`; returns it."""
    if packing is not None and packing not in PACKING_MODES:
        raise ValueError(f"packing must be None or one of {PACKING_MODES}, got {packing!r}")
    return packing


@dataclass(frozen=True)
class PackedLayout:
    """Where every token of a ``[2B, T]`` preference batch goes in the shared/packed input.

    Per packed position ``[R, L]``: ``input_ids``, ``position_ids`` (the position the token has
    in its own unshared sequence), ``segment`` (the pair's index in the batch, -1 for padding)
    and ``branch`` (0 shared prefix, 1 chosen, 2 rejected, -1 padding). Per scored token ``[N]``:
    ``source`` (flat index ``row * L + col`` of the hidden state that predicts it), ``labels``,
    and ``target_row``/``target_col``, where the token's output sits in the ``[2B, T]`` layout of
    :func:`dpo_fast.integrations.hf.completion_logps` (position t scores token t+1).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment: torch.Tensor
    branch: torch.Tensor
    source: torch.Tensor
    labels: torch.Tensor
    target_row: torch.Tensor
    target_col: torch.Tensor
    batch_shape: tuple
    tokens: int                 # real (non-padding) tokens in the layout
    padded_tokens: int          # tokens of the standard [2B, T] batch that attention_mask marks

    @property
    def forwarded(self) -> int:
        """Positions the trunk runs over, padding included (``R * L``)."""
        return self.input_ids.numel()


def _pair_rows(ids, attention, completion):
    """Per pair ``(chosen ids, rejected ids, chosen mask, rejected mask, shared length)`` (lists)."""
    n_rows, width = ids.shape
    lengths = attention.sum(-1).tolist()
    for r, n in enumerate(lengths):
        if int(attention[r, :n].sum()) != n:
            raise ValueError(f"attention_mask row {r} is not right-padded (ones then zeros): the shared-prompt "
                             "layout needs each sequence to start at position 0, as collate_preference pads them")
    ids_l, comp_l = ids.tolist(), completion.tolist()
    b = n_rows // 2
    out = []
    for i in range(b):
        c, r = ids_l[i][:lengths[i]], ids_l[b + i][:lengths[b + i]]
        cm, rm = comp_l[i][:lengths[i]], comp_l[b + i][:lengths[b + i]]
        shared = 0
        # share the common prefix of the two sequences, up to the first completion token of either
        limit = min(len(c), len(r))
        while shared < limit and c[shared] == r[shared] and not cm[shared] and not rm[shared]:
            shared += 1
        out.append((c, r, cm, rm, shared))
    return out


def _first_fit_decreasing(sizes, capacity):
    """Bins (lists of item indices) of total size <= capacity, largest items placed first."""
    bins, room = [], []
    for i in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
        for k, free in enumerate(room):
            if sizes[i] <= free:
                bins[k].append(i)
                room[k] -= sizes[i]
                break
        else:
            bins.append([i])
            room.append(capacity - sizes[i])
    return bins


def build_layout(input_ids, attention_mask, completion_mask, *, packing="shared_prompt_packed", max_tokens=None,
                 pad_token_id=0) -> PackedLayout:
    """The shared-prompt (and packed) layout of a standard preference batch.

    Args:
        input_ids, attention_mask, completion_mask: ``[2B, T]`` as :func:`dpo_fast.data.collate_preference`
            returns them (rows ``i`` and ``B + i`` are pair ``i``'s chosen and rejected sequence,
            right-padded).
        packing: ``"shared_prompt"`` (one row per pair) or ``"shared_prompt_packed"``.
        max_tokens: packed row capacity (default, and never less than, the longest pair row).
    """
    check_packing(packing)
    if packing is None:
        raise ValueError("build_layout needs packing='shared_prompt' or 'shared_prompt_packed', got None")
    _check_batch(input_ids, attention_mask, completion_mask)
    if input_ids.shape[0] % 2 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must hold 2B > 0 rows (chosen rows then rejected rows), got {input_ids.shape[0]}")
    if int(attention_mask.sum()) == 0:
        raise ValueError("attention_mask is all zeros: the batch has no tokens to forward")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be None or an int >= 1, got {max_tokens!r}")
    device = input_ids.device
    pairs = _pair_rows(input_ids.cpu(), attention_mask.cpu(), completion_mask.cpu())
    b = len(pairs)
    sizes = [len(c) + len(r) - s for c, r, _, _, s in pairs]
    if packing == "shared_prompt":
        bins = [[i] for i in range(b)]
    else:
        bins = _first_fit_decreasing(sizes, max(max(sizes), max_tokens or 0))
    width = max(sum(sizes[i] for i in row) for row in bins)
    shape = (len(bins), width)
    tok = torch.full(shape, pad_token_id, dtype=torch.long)
    pos = torch.zeros(shape, dtype=torch.long)
    seg = torch.full(shape, -1, dtype=torch.long)
    branch = torch.full(shape, -1, dtype=torch.long)
    source, labels, t_row, t_col = [], [], [], []
    for row, members in enumerate(bins):
        start = 0
        for i in members:
            c, r, cm, rm, s = pairs[i]
            lc = len(c) - s
            end = start + sizes[i]
            tok[row, start:end] = torch.tensor(c + r[s:], dtype=torch.long)
            pos[row, start:end] = torch.cat([torch.arange(len(c)), torch.arange(s, len(r))])
            seg[row, start:end] = i
            branch[row, start:start + s] = 0
            branch[row, start + s:start + s + lc] = 1
            branch[row, start + s + lc:end] = 2
            base = row * width + start
            for seq, mask, out_row, offset in ((c, cm, i, 0), (r, rm, b + i, lc)):
                t = torch.tensor(mask[1:], dtype=torch.bool).nonzero().flatten() + 1  # scored tokens
                j = t - 1  # logical position of the hidden state that predicts token t
                source.append(base + j + offset * (j >= s))
                labels.append(torch.tensor(seq, dtype=torch.long)[t])
                t_row.append(torch.full_like(j, out_row))
                t_col.append(j)
            start = end
    as_long = lambda v: torch.cat(v).to(device)  # noqa: E731
    return PackedLayout(input_ids=tok.to(device), position_ids=pos.to(device), segment=seg.to(device),
                        branch=branch.to(device), source=as_long(source), labels=as_long(labels),
                        target_row=as_long(t_row), target_col=as_long(t_col), batch_shape=tuple(input_ids.shape),
                        tokens=sum(sizes), padded_tokens=int(attention_mask.sum()))


def layout_allowed(layout: PackedLayout, window: int | None = None) -> torch.Tensor:
    """``[R, L, L]`` bool: query q may attend to key k.

    Same pair, ``k <= q``, and k in the shared prefix or in q's own branch; with ``window``,
    also ``pos[q] - pos[k] < window``. Padding attends to itself only (no empty softmax rows).
    """
    seg, br, pos = layout.segment, layout.branch, layout.position_ids
    n = seg.shape[1]
    idx = torch.arange(n, device=seg.device)
    causal = idx[None, :, None] >= idx[None, None, :]
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
    visible = (br[:, None, :] == 0) | (br[:, None, :] == br[:, :, None])
    allowed = same & causal & visible
    if window is not None:
        allowed &= (pos[:, :, None] - pos[:, None, :]) < window
    pad = seg < 0
    return allowed | (pad[:, :, None] & (idx[None, :, None] == idx[None, None, :]))


def _window(config):
    """``(window or None, layer types or None)`` as transformers applies them."""
    window = getattr(config, "sliding_window", None)
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        window = None
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    types = getattr(config, "layer_types", None)
    types = list(types) if isinstance(types, (list, tuple)) else None
    if window is not None and types is not None and "sliding_attention" not in types:
        window = None
    return window, types


def _flex_block_mask(layout, window):
    from torch.nn.attention.flex_attention import create_block_mask

    seg, br, pos = layout.segment, layout.branch, layout.position_ids

    def mask_mod(b, h, q, k):
        ok = (seg[b, q] == seg[b, k]) & (seg[b, q] >= 0) & (k <= q) & ((br[b, k] == 0) | (br[b, k] == br[b, q]))
        if window is not None:
            ok = ok & (pos[b, q] - pos[b, k] < window)
        return ok | ((seg[b, q] < 0) & (q == k))

    n_rows, n = seg.shape
    return create_block_mask(mask_mod, n_rows, None, n, n, device=seg.device)


def _attention_path(model):
    """``(text config, attn_implementation)``; raises for a path that cannot take the mask."""
    config = _text_config(_unwrap_peft(model))
    path = getattr(config, "_attn_implementation", None) or "eager"
    if path not in _MASK_PATHS:
        raise PackingUnsupportedError(
            f"{type(model).__name__} (model_type={getattr(config, 'model_type', '?')!r}) uses attn_implementation="
            f"{path!r}, which cannot take the shared-prompt attention mask; load it with attn_implementation='sdpa' "
            f"(or one of {_MASK_PATHS}), or use packing=None")
    return config, path


def model_attention_mask(model, layout: PackedLayout):
    """The ``attention_mask`` argument that makes ``model`` attend as the layout requires."""
    config, path = _attention_path(model)
    model_type = getattr(config, "model_type", "?")
    window, types = _window(config)
    if window is not None and model_type not in _WINDOW_VERIFIED:
        longest = int(layout.position_ids.max()) + 1
        if longest > window:
            raise PackingUnsupportedError(
                f"{type(model).__name__} (model_type={model_type!r}) has sliding-window attention (window {window}) "
                f"and this batch has a sequence of {longest} tokens; its windowed shared-prompt mask is not verified "
                "for this architecture: use packing=None")

    def build(w):
        if path == "flex_attention":
            return _flex_block_mask(layout, w)
        allowed = layout_allowed(layout, w).unsqueeze(1)
        if path == "sdpa":
            return allowed
        dtype = layout_dtype(model)
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed,
                                                                                        torch.finfo(dtype).min)

    if window is None:
        return build(None)
    if types is not None and "full_attention" in types:
        return {"full_attention": build(None), "sliding_attention": build(window)}
    return build(window)


def layout_dtype(model):
    """The dtype of the model's hidden states (autocast's when enabled)."""
    weight = lm_head_spec(model).weight
    if torch.is_autocast_enabled(weight.device.type):
        return torch.get_autocast_dtype(weight.device.type)
    return weight.dtype


def packed_completion_logps(model, input_ids, attention_mask, completion_mask, *, packing="shared_prompt_packed",
                            impl="auto", outputs=("log_probs",), temperature=1.0, max_tokens=None, layout=None,
                            check=True):
    """:func:`dpo_fast.integrations.hf.completion_logps` of a preference batch, run through the
    shared-prompt (and packed) layout.

    Equivalent to ``completion_logps(model, input_ids, attention_mask, completion_mask, ...)``
    (the same ``[2B, T]`` outputs, to fp32 rounding) for a batch whose rows ``i`` and ``B + i``
    are the chosen and rejected sequence of pair ``i`` (right-padded, as
    :func:`dpo_fast.data.collate_preference` and TRL's collator give them), but the trunk runs
    once over :func:`build_layout`'s rows: each prompt once, no padding between pairs.

    The model's own forward runs on the layout (``position_ids`` and the layout's attention
    mask passed to it) with its lm_head scoring only the layout's source rows
    (:func:`~dpo_fast.integrations.hf.fused_head_logprobs`), so FSDP2, DeepSpeed ZeRO-3 and DDP
    models work as for the padded path; a tensor-parallel head runs the backbone and
    :func:`dpo_fast.vocab_parallel_linear_logprobs`, as :func:`completion_logps` does.

    Args:
        model: a transformers causal LM with ``attn_implementation`` eager, sdpa or flex_attention.
        input_ids, attention_mask, completion_mask: ``[2B, T]`` tensors on the model's device.
        packing: ``"shared_prompt"`` or ``"shared_prompt_packed"``.
        impl, outputs, temperature: as in :func:`~dpo_fast.integrations.hf.completion_logps`.
        max_tokens: packed row capacity (see :func:`build_layout`).
        layout: a :class:`PackedLayout` of this batch already built (else built here).
        check: run :func:`check_packing_support` first (once per model and mode).
    Returns:
        a float32 ``[2B, T]`` tensor (a dict of them for several outputs); gradients flow into
        the model.
    """
    from ..ops import check_impl

    opts = LogprobOptions(temperature=temperature, outputs=outputs)
    check_packing(packing)
    check_impl(impl)
    if layout is None:
        layout = build_layout(input_ids, attention_mask, completion_mask, packing=packing, max_tokens=max_tokens)
    elif tuple(layout.batch_shape) != tuple(input_ids.shape):
        raise ValueError(f"layout was built for a batch of shape {layout.batch_shape}, not {tuple(input_ids.shape)}")
    if check:
        check_packing_support(model, packing)
    spec = lm_head_spec(model)
    mask = model_attention_mask(model, layout)
    if spec.vocab_parallel:  # a tensor-parallel head: its rows stay sharded, as in completion_logps
        got = vocab_parallel_head_logprobs(model, spec, layout.labels, index=layout.source, impl=impl, outputs=outputs,
                                           temperature=temperature, input_ids=layout.input_ids, attention_mask=mask,
                                           position_ids=layout.position_ids)
    else:  # the model's own forward, its lm_head scoring the layout's source rows (FSDP2/ZeRO-3/DDP safe)
        got, _ = fused_head_logprobs(model, layout.labels, index=layout.source, impl=impl, outputs=outputs,
                                     temperature=temperature, input_ids=layout.input_ids, attention_mask=mask,
                                     position_ids=layout.position_ids)
    got = got if isinstance(got, dict) else {opts.outputs[0]: got}
    result = {}
    for name in opts.outputs:
        value = got[name]
        full = torch.zeros(layout.batch_shape, dtype=value.dtype, device=value.device)
        result[name] = full.index_put((layout.target_row, layout.target_col), value)
    return result if len(opts.outputs) > 1 else result[opts.outputs[0]]


def packed_sequence_logps(model, input_ids, attention_mask, completion_mask, *, packing="shared_prompt_packed",
                          outputs=("log_probs",), **kwargs):
    """Chosen/rejected sequence log-probs and per-token metric sums of a preference batch via
    :func:`packed_completion_logps`.

    Equivalent to summing ``completion_logps(...)`` over each row: returns a dict with
    ``chosen_logps``/``rejected_logps`` ``[B]`` (with gradient), ``chosen_tokens``/``rejected_tokens``
    ``[B]`` (scored tokens) and, for every other name in ``outputs``, ``chosen_<name>``/``rejected_<name>``
    ``[B]`` sums over the scored tokens (no gradient). Keyword arguments go to
    :func:`packed_completion_logps`.
    """
    outputs = (outputs,) if isinstance(outputs, str) else tuple(outputs)
    if "log_probs" not in outputs:
        outputs = ("log_probs",) + outputs
    per_token = packed_completion_logps(model, input_ids, attention_mask, completion_mask, packing=packing,
                                        outputs=outputs, **kwargs)
    per_token = per_token if isinstance(per_token, dict) else {"log_probs": per_token}
    b = input_ids.shape[0] // 2
    counts = completion_mask[:, 1:].long().sum(-1)
    result = {"chosen_tokens": counts[:b], "rejected_tokens": counts[b:]}
    for name, value in per_token.items():
        sums = value.sum(-1) if name == "log_probs" else value.detach().to(torch.float64).sum(-1)
        key = "logps" if name == "log_probs" else name
        result[f"chosen_{key}"], result[f"rejected_{key}"] = sums[:b], sums[b:]
    return result


# ----------------------------------------------------------------------------- first-use check

_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _restart_positions(segment):
    """0, 1, 2, ... within each run of equal segment ids along a row (padding: 0)."""
    idx = torch.arange(segment.shape[1], device=segment.device).expand_as(segment)
    new = torch.ones_like(segment, dtype=torch.bool)
    new[:, 1:] = segment[:, 1:] != segment[:, :-1]
    start = torch.where(new, idx, torch.zeros_like(idx)).cummax(1).values
    return torch.where(segment >= 0, idx - start, torch.zeros_like(idx))


def _probe_batch(vocab, device):
    """Three pairs: shared prompts of different lengths, completions of different lengths, a
    pair whose completions start alike, padding; the ids are fixed pseudo-random draws."""
    g = torch.Generator().manual_seed(1234)
    top = max(4, min(vocab, 1000))
    spec = ((7, 40, 3), (3, 2, 30), (5, 4, 1))
    chosen, rejected = [], []
    for p, c, r in spec:
        prompt = torch.randint(3, top, (p,), generator=g).tolist()
        chosen.append((prompt, torch.randint(3, top, (c,), generator=g).tolist()))
        rejected.append((prompt, torch.randint(3, top, (r,), generator=g).tolist()))
    rows = chosen + rejected
    width = max(len(p) + len(c) for p, c in rows) + 1
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    att, comp = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, c) in enumerate(rows):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        att[i, :len(p) + len(c)] = 1
        comp[i, len(p):len(p) + len(c)] = 1
    return ids.to(device), att.to(device), comp.to(device)


@torch.no_grad()
def check_packing_support(model, packing="shared_prompt_packed", *, force=False) -> float:
    """Run a probe batch through the packed and the padded path; raise if they differ.

    Compares :func:`packed_completion_logps` with :func:`~dpo_fast.integrations.hf.completion_logps`
    on three short pairs (all packed in one row for ``shared_prompt_packed``). Max |difference|
    must stay within ``1e-4 * (1 + |logp|)`` for 32/64-bit models. 16-bit rounding differs
    between layouts by as much as a subtle layout error moves a barely trained model, so for
    16-bit models the probe also runs a deliberately wrong layout (rejected tokens seeing the
    chosen ones at shifted positions): on the rejected tokens, the mean |difference| must stay
    under 2e-2 and under 5% of the mean change the wrong layout causes. An architecture that
    does not honour the 4-D mask or the position ids (ALiBi from a 2-D mask, cross-pair leakage,
    ...) or whose attention path cannot take it raises :class:`PackingUnsupportedError` naming it
    and the fallback ``packing=None``. The result is remembered per model and mode (``force``
    reruns). Returns the largest difference.
    """
    check_packing(packing)
    key = (packing,)
    done = _CHECKED.get(model)
    if done is not None and key in done and not force:
        return done[key]
    spec = lm_head_spec(model)
    config, _ = _attention_path(model)
    name = f"{type(model).__name__} (model_type={getattr(config, 'model_type', '?')!r})"
    n_vocab = tuple(getattr(spec.weight, "ds_shape", spec.weight.shape))[0]  # ZeRO-3: empty outside forward
    ids, att, comp = _probe_batch(n_vocab, spec.weight.device)
    was_training = model.training
    model.eval()
    try:
        expected = completion_logps(model, ids, att, comp)
        layout = build_layout(ids, att, comp, packing=packing, max_tokens=10**6)
        try:
            got = packed_completion_logps(model, ids, att, comp, packing=packing, layout=layout, check=False)
            low = layout_dtype(model) in (torch.float16, torch.bfloat16)
            if low:  # the same rows with a plain causal mask: rejected sees chosen, positions shifted
                seg = layout.segment
                leaky = dataclasses.replace(layout, branch=torch.where(seg >= 0, 0, -1),
                                            position_ids=_restart_positions(seg))
                wrong = packed_completion_logps(model, ids, att, comp, packing=packing, layout=leaky, check=False)
        except PackingUnsupportedError:
            raise
        except Exception as e:  # the model's forward rejects the mask / position ids
            raise PackingUnsupportedError(f"{name} cannot run packing={packing!r}: its forward failed on the "
                                          f"shared-prompt layout ({type(e).__name__}: {e}); use packing=None") from e
    finally:
        model.train(was_training)
    scored = comp[:, 1:].bool()
    diff = (got[:, :-1] - expected[:, :-1]).abs()[scored].double()
    ref = expected[:, :-1].abs()[scored].double()
    worst = float(diff.max())
    if low:
        b = ids.shape[0] // 2
        rejected = scored.clone()
        rejected[:b] = False
        d = (got[:, :-1] - expected[:, :-1]).abs()[rejected].double().mean()
        s = (wrong[:, :-1] - expected[:, :-1]).abs()[rejected].double().mean()
        bad = not (float(d) <= 2e-2 and float(d) <= 0.05 * float(s))
    else:
        bad = not bool((diff <= 1e-4 * (1 + ref)).all())
    if bad:
        raise PackingUnsupportedError(
            f"{name} does not give the same log-probs with packing={packing!r} as with the padded batch on a probe "
            f"batch (max |difference| {worst:.3g}): its attention does not honour the shared-prompt mask and position "
            "ids (e.g. ALiBi or other position terms taken from a 2-D mask, a sliding window, cross-sequence leakage "
            "in its mask code). Use packing=None (the padded path).")
    _CHECKED.setdefault(model, {})[key] = worst
    return worst
