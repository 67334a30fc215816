"""``dpo-fast precompute`` / ``cache info`` / ``cache verify``: fill and check a reference log-prob cache.

:func:`precompute` loads a local Hugging Face causal LM and a preference dataset, tokenises it
as TRL's DPOTrainer does (:mod:`dpo_fast.data`), and stores per example the reference model's
summed completion log-probs for chosen and rejected, computed with the fused path
(:func:`dpo_fast.integrations.hf.completion_logps`, no logits), in a :class:`RefLogpsCache`.

Batching is deterministic: unique examples are sorted by length (longest first, ties by key) and
cut into batches of ``batch_size``; batch ``j`` goes to rank ``j % world_size``. A re-run skips
every batch already committed, so an interrupted run resumes with the same batches (and gives
bit-identical numbers), and a K-process ``torchrun`` run computes exactly the batches a single
process would. Under torchrun, rank 0 writes the cache itself and the other ranks write shard
files that rank 0 merges at the end (and at the start of a re-run, if a run was killed).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from . import __version__
from .cache import (MODEL_DTYPES, STORE_DTYPES, CacheError, Entry, RefLogpsCache, build_fingerprint,
                    check_writable, fingerprint_diff, fingerprint_hash, format_info, merge_into, model_fingerprint,
                    pack_inputs, shard_path, shard_paths, tokenizer_digest, _stale_error)
from .data import (TRUNCATION_MODES, DatasetError, PreferenceExample, collate_preference, detect_format, load_rows,
                   tokenize_rows)

__all__ = ["precompute", "verify_cache", "PrecomputeSummary", "VerifyReport", "compute_entries", "plan_batches",
           "register_precompute", "register_cache"]


@dataclass
class PrecomputeSummary:
    cache_path: str
    rows: int = 0
    unique: int = 0
    duplicates: int = 0
    dropped_prompt_too_long: int = 0
    truncated: int = 0
    already_cached: int = 0
    computed: int = 0
    tokens: int = 0
    seconds: float = 0.0
    entries: int = 0
    cache_bytes: int = 0
    fingerprint: str = ""
    device: str = ""
    world_size: int = 1
    merged_shards: int = 0
    extra: dict = field(default_factory=dict)

    def format(self) -> str:
        busy = self.computed > 0 and self.seconds > 0
        rate = self.computed / self.seconds if busy else 0.0
        tok_rate = self.tokens / self.seconds if busy else 0.0
        lines = [
            f"dpo-fast precompute: done in {self.extra.get('total_seconds', self.seconds):.1f}s "
            f"({self.extra.get('load_seconds', 0.0):.1f}s loading the model, {self.seconds:.1f}s computing)",
            f"  examples    {self.rows} rows, {self.unique} unique ({self.duplicates} duplicates), "
            f"{self.already_cached} already cached, {self.computed} computed",
            f"  truncation  {self.truncated} longer than max_length (truncated, kept); "
            f"{self.dropped_prompt_too_long} dropped (prompt alone fills max_length, as TRL drops them)",
            (f"  throughput  {rate:.1f} examples/s, {tok_rate:,.0f} tokens/s on {self.device}"
             + (f" x {self.world_size} ranks" if self.world_size > 1 else "")) if busy
            else "  throughput  nothing to compute: every example was already cached",
            f"  cache       {self.cache_path}: {self.entries} entries, {self.cache_bytes / 1e6:.2f} MB, "
            f"fingerprint {self.fingerprint[:16]}"
            + (f", merged {self.merged_shards} shard(s)" if self.merged_shards else ""),
        ]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- helpers

def _resolve_device(device: str | None, local_rank: int) -> torch.device:
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available here")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev


def _dist_state(device: torch.device):
    """``(rank, world, dist module or None, whether this call initialised the process group)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None, False
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), dist, owned


def _collective_device(dist):
    """NCCL reduces CUDA tensors only; gloo reduces CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _barrier(dist):
    if dist is not None:
        dist.barrier()


def _all_sum(dist, values):
    if dist is None:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device(dist))
    dist.all_reduce(t)
    return t.cpu().tolist()


def _all_max(dist, value):
    if dist is None:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device(dist))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def load_tokenizer(path: str, *, required: bool):
    """``AutoTokenizer.from_pretrained(path)`` offline; None when absent and not ``required``."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        if required:
            raise FileNotFoundError(f"cannot load a tokenizer from {path}: {e}. Text datasets need one "
                                    "(pass --tokenizer, or use pre-tokenised prompt_ids/chosen_ids/rejected_ids)") from None
        return None


def load_model(path: str, dtype: str, device: torch.device):
    """``AutoModelForCausalLM.from_pretrained(path, dtype=dtype)`` offline, eval mode, frozen, on device."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=MODEL_DTYPES[dtype], local_files_only=True)
    model.eval().requires_grad_(False)
    return model.to(device)


def sequence_length(example: PreferenceExample, max_length: int | None) -> int:
    n = len(example.prompt_ids) + max(len(example.chosen_ids), len(example.rejected_ids))
    return n if max_length is None else min(n, max_length)


def plan_batches(examples, batch_size: int, max_length: int | None) -> list[list[PreferenceExample]]:
    """Unique examples sorted longest first (ties by key), cut into batches: the same plan for
    any dataset order and any number of ranks."""
    unique = {}
    for ex in examples:
        unique.setdefault(ex.key, ex)
    ordered = sorted(unique.values(), key=lambda ex: (-sequence_length(ex, max_length), ex.key))
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


@torch.no_grad()
def compute_entries(model, batch: list[PreferenceExample], *, max_length, truncation_mode, temperature=1.0,
                    ld_alpha=None, store_dtype="float64", token_logps=False, store_inputs=True, impl="auto",
                    pad_token_id=0, packing=None):
    """Reference entries for one batch: chosen and rejected in one forward through the fused path.

    With ``packing`` (``"shared_prompt"``/``"shared_prompt_packed"``) the forward runs the
    shared-prompt layout of :mod:`dpo_fast.integrations.packing`: the same numbers to fp32
    rounding, so the cache (whose fingerprint does not record it) is the same either way.

    The sums are the float32 per-token log-probs summed in float64 (rounded to float32 when
    ``store_dtype="float32"``). With ``ld_alpha``, tokens past the shorter completion of the
    pair are weighted by ``ld_alpha`` (LD-DPO, as TRL computes it). Returns ``(entries, tokens)``.
    """
    from .integrations.hf import completion_logps

    device = next(model.parameters()).device
    cols = collate_preference(batch, pad_token_id=pad_token_id, max_length=max_length, truncation_mode=truncation_mode)
    cols = {k: v.to(device) for k, v in cols.items()}
    if packing is None:
        per_token = completion_logps(model, cols["input_ids"], cols["attention_mask"], cols["completion_mask"],
                                     impl=impl, temperature=temperature)
        forwarded = int(cols["attention_mask"].sum())
    else:
        from .integrations.packing import build_layout, packed_completion_logps

        layout = build_layout(cols["input_ids"], cols["attention_mask"], cols["completion_mask"], packing=packing,
                              pad_token_id=pad_token_id)
        per_token = packed_completion_logps(model, cols["input_ids"], cols["attention_mask"], cols["completion_mask"],
                                            packing=packing, impl=impl, temperature=temperature, layout=layout)
        forwarded = layout.tokens
    scored = cols["completion_mask"][:, 1:].bool()
    values = per_token[:, :-1].double() * scored
    counts = scored.sum(-1)
    if ld_alpha is None:
        sums = values.sum(-1)
    else:
        position = scored.long().cumsum(-1)
        c_len, r_len = counts.chunk(2)
        shared = torch.minimum(c_len, r_len).repeat(2).unsqueeze(1)
        weight = torch.where(position <= shared, 1.0, float(ld_alpha)).to(values.dtype)
        sums = (values * weight).sum(-1)
    sums, counts = sums.cpu(), counts.cpu()
    if store_dtype == "float32":
        sums = sums.float().double()
    n = len(batch)
    entries = []
    for i, ex in enumerate(batch):
        full = len(ex.prompt_ids) + max(len(ex.chosen_ids), len(ex.rejected_ids))
        token_blob = None
        if token_logps:
            chosen = per_token[i, :-1][scored[i]].float().cpu()
            rejected = per_token[n + i, :-1][scored[n + i]].float().cpu()
            token_blob = torch.cat([chosen, rejected]).numpy().tobytes()
        entries.append(Entry(key=ex.key, chosen_logps=float(sums[i]), rejected_logps=float(sums[n + i]),
                             chosen_tokens=int(counts[i]), rejected_tokens=int(counts[n + i]),
                             truncated=max_length is not None and full > max_length, token_logps=token_blob,
                             inputs=pack_inputs(ex) if store_inputs else None))
    return entries, forwarded


def _check_args(batch_size, dtype, max_length, truncation_mode, temperature, ld_alpha, store_dtype):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"dtype must be one of {list(MODEL_DTYPES)}, got {dtype!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length must be None or an int >= 2, got {max_length!r}")
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if ld_alpha is not None and (not isinstance(ld_alpha, (int, float)) or not 0.0 <= ld_alpha <= 1.0):
        raise ValueError(f"ld_alpha must be None or in [0, 1], got {ld_alpha!r}")
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"store_dtype must be one of {STORE_DTYPES}, got {store_dtype!r}")


def current_fingerprint(model_path, tokenizer, *, max_length, truncation_mode, dtype, temperature, ld_alpha,
                        store_dtype, token_logps) -> dict:
    """The fingerprint a precompute with these settings would write (weights hashed from disk)."""
    from transformers import AutoConfig

    from .integrations.hf import logit_transform

    model_fp = model_fingerprint(model_path)
    config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale, softcap = logit_transform(text_config)
    return build_fingerprint(tokenizer=tokenizer_digest(tokenizer), max_length=max_length,
                             truncation_mode=truncation_mode, dtype=dtype, temperature=temperature,
                             logit_scale=scale, softcap=softcap, ld_alpha=ld_alpha, store_dtype=store_dtype,
                             token_logps=token_logps, **model_fp)


# ----------------------------------------------------------------------------- precompute

def precompute(model, dataset, cache, *, tokenizer=None, split=None, batch_size=8, device="auto", dtype="float32",
               max_length=None, truncation_mode="keep_start", temperature=1.0, ld_alpha=None, store_dtype="float64",
               token_logps=False, store_inputs=True, impl="auto", progress=True, check_head=True,
               out=None, packing=None) -> PrecomputeSummary:
    """Fill the cache at ``cache`` with reference log-probs of ``dataset`` under ``model``.

    Args:
        model: path of a local Hugging Face causal-LM folder (loaded offline).
        dataset: path of a JSONL / Parquet file or a ``datasets`` save_to_disk folder, or a list
            of row dicts (text ``prompt``/``chosen``/``rejected`` or pre-tokenised ``*_ids``).
        cache: path of the cache file (created if absent, resumed if present).
        tokenizer: tokenizer folder (default: the model folder).
        split: the split of a saved DatasetDict.
        batch_size: examples per forward (each gives a chosen and a rejected sequence).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...
        dtype: dtype the model runs in (``float32``, ``bfloat16``, ``float16``, ``float64``).
        max_length, truncation_mode: TRL's truncation of prompt + completion.
        temperature: divides the logits. ld_alpha: LD-DPO weighting of the sums (None: plain sums).
        store_dtype: ``float64`` or ``float32`` sums. token_logps: also store per-token log-probs.
        store_inputs: store the token ids (lets ``cache verify`` recompute without the dataset).
        impl: fused-op implementation. check_head: compare the fused head with the model's own
            logits once before computing (guards unknown logit transforms).
        packing: None, ``"shared_prompt"`` or ``"shared_prompt_packed"``: run each batch through
            the shared-prompt (packed) layout; the stored values, and the fingerprint, are the
            same as without (a cache can be filled and resumed either way).
    Returns:
        a :class:`PrecomputeSummary` (also printed to ``out`` when given).
    """
    t_start = time.perf_counter()
    _check_args(batch_size, dtype, max_length, truncation_mode, temperature, ld_alpha, store_dtype)
    from .integrations.packing import check_packing

    check_packing(packing)
    model_path = os.fspath(model)
    cache_path = os.fspath(cache)
    if not os.path.isdir(model_path):
        raise FileNotFoundError(f"model folder not found: {model_path}")
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise FileNotFoundError(f"{model_path} has no config.json: not a Hugging Face model folder")
    check_writable(cache_path)
    dev = _resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    rank, world, dist, owned = _dist_state(dev)
    try:
        return _precompute(model_path, dataset, cache_path, dev, rank, world, dist, t_start, tokenizer=tokenizer,
                           split=split, batch_size=batch_size, dtype=dtype, max_length=max_length,
                           truncation_mode=truncation_mode, temperature=temperature, ld_alpha=ld_alpha,
                           store_dtype=store_dtype, token_logps=token_logps, store_inputs=store_inputs, impl=impl,
                           progress=progress, check_head=check_head, out=out, packing=packing)
    finally:
        if owned:
            dist.destroy_process_group()


def _precompute(model_path, dataset, cache_path, dev, rank, world, dist, t_start, *, tokenizer, split, batch_size,
                dtype, max_length, truncation_mode, temperature, ld_alpha, store_dtype, token_logps, store_inputs,
                impl, progress, check_head, out, packing=None):
    # data
    source = "dataset" if isinstance(dataset, (list, tuple)) else os.fspath(dataset)
    rows = list(dataset) if isinstance(dataset, (list, tuple)) else load_rows(source, split)
    needs_tokenizer = detect_format(rows, source) == "text"
    tok = load_tokenizer(os.fspath(tokenizer) if tokenizer else model_path, required=needs_tokenizer)
    examples, tstats = tokenize_rows(rows, tok, max_length=max_length, truncation_mode=truncation_mode, source=source)
    batches = plan_batches(examples, batch_size, max_length)
    summary = PrecomputeSummary(cache_path=cache_path, rows=len(rows), truncated=tstats.truncated,
                                dropped_prompt_too_long=tstats.dropped_prompt_too_long, device=str(dev),
                                world_size=world)
    summary.unique = sum(len(b) for b in batches)
    summary.duplicates = len(examples) - summary.unique

    # fingerprint and cache
    fingerprint = current_fingerprint(model_path, tok, max_length=max_length, truncation_mode=truncation_mode,
                                      dtype=dtype, temperature=temperature, ld_alpha=ld_alpha,
                                      store_dtype=store_dtype, token_logps=token_logps)
    summary.fingerprint = fingerprint_hash(fingerprint)
    info = {"model_path": os.path.abspath(model_path), "dataset": source if isinstance(source, str) else "<rows>",
            "dpo_fast": __version__, "torch": torch.__version__}
    with contextlib.ExitStack() as stack:
        if rank == 0:
            stack.callback(_unlock, _lock(cache_path))
            main = RefLogpsCache.create_or_open(cache_path, fingerprint, info)
            stack.callback(main.close)
            leftovers = shard_paths(cache_path)
            if leftovers:  # a killed torchrun run left shards: fold them in before deciding what is missing
                summary.merged_shards += len(leftovers)
                merge_into(main, leftovers)
        _barrier(dist)
        if rank == 0:
            writer = main
            done = main.present(ex.key for b in batches for ex in b)
        else:
            with RefLogpsCache.open(cache_path, check="none") as main:
                done = main.present(ex.key for b in batches for ex in b)
            writer = RefLogpsCache.create_or_open(shard_path(cache_path, rank, world), fingerprint, info)
            stack.callback(writer.close)
            done |= writer.present(ex.key for b in batches for ex in b)
        summary.already_cached = len(done)
        mine = [b for j, b in enumerate(batches) if j % world == rank and not all(ex.key in done for ex in b)]
        todo = sum(len(b) for b in mine)

        computed = tokens = 0
        t_compute = time.perf_counter()
        if mine:
            t_load = time.perf_counter()
            model_obj = load_model(model_path, dtype, dev)
            head = model_obj.get_output_embeddings()
            if head is not None and getattr(head, "weight", None) is not None:
                _check_vocab(examples, head.weight.shape[0])
            if check_head:
                from .integrations.hf import check_lm_head_spec

                first = mine[0][0]
                ids = (list(first.prompt_ids) + list(first.chosen_ids))[:16]
                check_lm_head_spec(model_obj, torch.tensor([ids], device=dev))
            if packing is not None:
                from .integrations.packing import check_packing_support

                check_packing_support(model_obj, packing)  # refuses an architecture it would get wrong
            pad_id = (getattr(tok, "pad_token_id", None) or 0) if tok is not None else 0
            summary.extra["load_seconds"] = time.perf_counter() - t_load
            t_compute = time.perf_counter()  # throughput counts the batches only, not loading the model
            bar = _progress(todo, enabled=progress and rank == 0, initial_note=f"{len(done)} cached")
            if bar is not None:
                stack.callback(bar.close)
            for batch in mine:
                entries, n_tok = compute_entries(
                    model_obj, batch, max_length=max_length, truncation_mode=truncation_mode, temperature=temperature,
                    ld_alpha=ld_alpha, store_dtype=store_dtype, token_logps=token_logps, store_inputs=store_inputs,
                    impl=impl, pad_token_id=pad_id, packing=packing)
                missing = [e for e in entries if e.key not in done]
                writer.write(missing)  # one transaction: a kill loses at most this batch
                computed += len(missing)
                tokens += n_tok
                if bar is not None:
                    elapsed = max(time.perf_counter() - t_compute, 1e-9)
                    bar.set_postfix_str(f"{tokens / elapsed:,.0f} tok/s", refresh=False)
                    bar.update(len(batch))
            if bar is not None:
                bar.close()
        compute_seconds = time.perf_counter() - t_compute

        if rank != 0:
            writer.close()
        computed, tokens = (int(x) for x in _all_sum(dist, [computed, tokens]))
        compute_seconds = _all_max(dist, compute_seconds)
        _barrier(dist)
        if rank == 0:
            others = shard_paths(cache_path)
            if others:
                summary.merged_shards += len(others)
                merge_into(main, others)
            st = main.stats()
            summary.entries, summary.cache_bytes = st["entries"], st["bytes"]
    _barrier(dist)
    summary.computed, summary.tokens = computed, tokens
    summary.seconds = compute_seconds if computed else time.perf_counter() - t_start
    summary.extra["total_seconds"] = time.perf_counter() - t_start
    if out is not None and rank == 0:
        print(summary.format(), file=out, flush=True)
    return summary


def _check_vocab(examples, vocab):
    for i, ex in enumerate(examples):
        top = max((max(s) for s in (ex.prompt_ids, ex.chosen_ids, ex.rejected_ids) if s), default=0)
        if top >= vocab:
            raise DatasetError(f"example {i} has token id {top}, outside the model's vocabulary of {vocab}: "
                               "the dataset was tokenised for another model")


def _progress(total, *, enabled, initial_note):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="ex", desc=f"precompute ({initial_note})", dynamic_ncols=True, mininterval=0.5,
                smoothing=0.1, file=sys.stderr)


def _lock(path):
    """Exclusive advisory lock next to the cache: one precompute writes a cache at a time."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        return None
    handle = open(path + ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise CacheError(f"another dpo-fast precompute is writing {path} (lock {path}.lock is held)") from None
    return handle


def _unlock(handle):
    if handle is not None:
        handle.close()
        with contextlib.suppress(OSError):
            os.remove(handle.name)


# ----------------------------------------------------------------------------- verify

@dataclass
class VerifyReport:
    checked: int
    worst_abs: float
    worst_rel: float
    worst_key: str
    count_mismatches: int
    atol: float
    rtol: float
    failures: int

    @property
    def ok(self) -> bool:
        return self.failures == 0 and self.count_mismatches == 0

    def format(self) -> str:
        verdict = "OK" if self.ok else "MISMATCH"
        return (f"dpo-fast cache verify: {verdict}: recomputed {self.checked} entries; worst |difference| "
                f"{self.worst_abs:.3g} (relative {self.worst_rel:.3g}, entry {self.worst_key[:16]}); "
                f"{self.failures} outside atol={self.atol:g} + rtol={self.rtol:g}*|value|; "
                f"{self.count_mismatches} token-count mismatches")


DEFAULT_TOLERANCES = {"float64": (1e-9, 1e-9), "float32": (1e-3, 1e-4), "bfloat16": (0.5, 2e-2), "float16": (0.5, 2e-2)}


def verify_cache(cache, *, sample=16, model=None, tokenizer=None, dataset=None, split=None, device="auto",
                 batch_size=8, seed=0, atol=None, rtol=None, impl="auto") -> VerifyReport:
    """Recompute ``sample`` random entries of the cache and compare them with the stored numbers.

    The model folder (default: the one recorded at precompute) must still match the cache's
    fingerprint (:class:`StaleCacheError` otherwise). Entries need their token ids: stored by
    default; for a cache written with ``store_inputs=False`` pass the ``dataset``.
    """
    reader = RefLogpsCache.open(cache, check="full")
    fp = reader.fingerprint
    model_path = os.fspath(model) if model else reader.info.get("model_path")
    if not model_path:
        raise ValueError("the cache does not record its model folder; pass model=/--model")
    tok = None
    if fp.get("tokenizer") is not None:
        tok = load_tokenizer(os.fspath(tokenizer) if tokenizer else model_path, required=True)
    current = current_fingerprint(model_path, tok, max_length=fp["max_length"], truncation_mode=fp["truncation_mode"],
                                  dtype=fp["dtype"], temperature=fp["temperature"], ld_alpha=fp["ld_alpha"],
                                  store_dtype=fp["store_dtype"], token_logps=fp["token_logps"])
    diffs = fingerprint_diff(fp, current)
    if diffs:
        raise _stale_error(reader.path, diffs)
    entries = reader.sample(sample, seed=seed)
    by_key = {}
    if dataset is not None:
        rows = load_rows(os.fspath(dataset), split) if not isinstance(dataset, (list, tuple)) else list(dataset)
        examples, _ = tokenize_rows(rows, tok, max_length=fp["max_length"], truncation_mode=fp["truncation_mode"])
        by_key = {ex.key: ex for ex in examples}
    pairs = []
    for e in entries:
        ex = e.example() or by_key.get(e.key)
        if ex is None:
            raise CacheError(f"entry {e.key.hex()} has no stored token ids and is not in the given dataset; "
                             "pass the dataset it was computed from (--dataset)")
        if ex.key != e.key:
            raise CacheError(f"entry {e.key.hex()}: its stored token ids hash to another key; the cache is corrupted")
        pairs.append((e, ex))
    reader.close()
    default_atol, default_rtol = DEFAULT_TOLERANCES[fp["dtype"]]
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    dev = _resolve_device(device, 0)
    report = VerifyReport(checked=0, worst_abs=0.0, worst_rel=0.0, worst_key="", count_mismatches=0, atol=atol,
                          rtol=rtol, failures=0)
    if not pairs:
        return report
    model_obj = load_model(model_path, fp["dtype"], dev)
    pad_id = (getattr(tok, "pad_token_id", None) or 0) if tok is not None else 0
    # Same batch composition rule as precompute (longest first), so numbers are comparable.
    ordered = sorted(pairs, key=lambda p: (-sequence_length(p[1], fp["max_length"]), p[0].key))
    for i in range(0, len(ordered), batch_size):
        chunk = ordered[i:i + batch_size]
        fresh, _ = compute_entries(model_obj, [ex for _, ex in chunk], max_length=fp["max_length"],
                                   truncation_mode=fp["truncation_mode"], temperature=fp["temperature"],
                                   ld_alpha=fp["ld_alpha"], store_dtype=fp["store_dtype"], token_logps=False,
                                   store_inputs=False, impl=impl, pad_token_id=pad_id)
        for (stored, _), new in zip(chunk, fresh):
            report.checked += 1
            if (stored.chosen_tokens, stored.rejected_tokens) != (new.chosen_tokens, new.rejected_tokens):
                report.count_mismatches += 1
            for a, b in ((stored.chosen_logps, new.chosen_logps), (stored.rejected_logps, new.rejected_logps)):
                diff = abs(a - b)
                if diff > report.worst_abs or report.worst_key == "":
                    report.worst_abs, report.worst_key = max(diff, report.worst_abs), stored.key.hex()
                report.worst_rel = max(report.worst_rel, diff / max(abs(b), 1e-30))
                if not diff <= atol + rtol * abs(b):
                    report.failures += 1
    return report


# ----------------------------------------------------------------------------- CLI

def _add_precompute(subparsers):
    p = subparsers.add_parser(
        "precompute", help="compute reference log-probs of a preference dataset into a cache",
        description="Run a frozen reference model over a preference dataset once and store per-example "
                    "chosen/rejected log-prob sums in a resumable, fingerprinted cache. Under "
                    "`torchrun --nproc-per-node K -m dpo_fast precompute ...` the work is sharded across ranks.")
    p.add_argument("--model", required=True, help="local Hugging Face causal-LM folder (the reference model)")
    p.add_argument("--dataset", required=True,
                   help="JSONL / Parquet file or datasets save_to_disk folder with prompt/chosen/rejected "
                        "(text) or prompt_ids/chosen_ids/rejected_ids")
    p.add_argument("--cache", required=True, help="cache file to create or resume (e.g. ref.sqlite)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    p.add_argument("--split", default=None, help="split of a saved DatasetDict")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--dtype", default="float32", choices=list(MODEL_DTYPES))
    p.add_argument("--max-length", type=int, default=None, help="truncate prompt+completion to this many tokens")
    p.add_argument("--truncation-mode", default="keep_start", choices=list(TRUNCATION_MODES))
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--ld-alpha", type=float, default=None, help="LD-DPO alpha (TRL's ld_alpha); default: plain sums")
    p.add_argument("--store-dtype", default="float64", choices=list(STORE_DTYPES))
    p.add_argument("--token-logps", action="store_true", help="also store per-token log-probs")
    p.add_argument("--no-store-inputs", action="store_true",
                   help="do not store token ids (smaller cache; `cache verify` then needs --dataset)")
    p.add_argument("--impl", default="auto", choices=["auto", "reference", "torch", "triton"])
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--packing", default=None, choices=["shared_prompt", "shared_prompt_packed"],
                   help="forward each prompt once ([prompt|chosen|rejected] rows), optionally packed; same values "
                        "and fingerprint as without (default: padded rows)")
    p.add_argument("--no-check-head", action="store_true",
                   help="skip comparing the fused lm_head with the model's own logits before computing")
    p.set_defaults(func=_guard("precompute", _run_precompute))


def _run_precompute(args) -> int:
    precompute(args.model, args.dataset, args.cache, tokenizer=args.tokenizer, split=args.split,
               batch_size=args.batch_size, device=args.device, dtype=args.dtype, max_length=args.max_length,
               truncation_mode=args.truncation_mode, temperature=args.temperature, ld_alpha=args.ld_alpha,
               store_dtype=args.store_dtype, token_logps=args.token_logps, store_inputs=not args.no_store_inputs,
               impl=args.impl, progress=not args.no_progress, check_head=not args.no_check_head, out=sys.stdout,
               packing=args.packing)
    return 0


def _add_cache(subparsers):
    p = subparsers.add_parser("cache", help="inspect, verify or merge a reference log-prob cache")
    sub = p.add_subparsers(dest="cache_command", metavar="{info,verify,merge}")
    sub.required = True
    info = sub.add_parser("info", help="fingerprint, counts and size of a cache")
    info.add_argument("cache")
    info.add_argument("--full-check", action="store_true", help="run SQLite's full integrity_check")
    info.set_defaults(func=_guard("cache info", _run_info))
    verify = sub.add_parser("verify", help="recompute random entries and compare (non-zero exit on mismatch)")
    verify.add_argument("cache")
    verify.add_argument("--sample", type=int, default=16, help="number of random entries to recompute")
    verify.add_argument("--model", default=None, help="model folder (default: the one recorded in the cache)")
    verify.add_argument("--tokenizer", default=None)
    verify.add_argument("--dataset", default=None, help="needed only for a cache written with --no-store-inputs")
    verify.add_argument("--split", default=None)
    verify.add_argument("--device", default="auto")
    verify.add_argument("--batch-size", type=int, default=8)
    verify.add_argument("--seed", type=int, default=0)
    verify.add_argument("--atol", type=float, default=None)
    verify.add_argument("--rtol", type=float, default=None)
    verify.set_defaults(func=_guard("cache verify", _run_verify))
    merge = sub.add_parser("merge", help="merge caches with the same fingerprint into one")
    merge.add_argument("dest")
    merge.add_argument("sources", nargs="+")
    merge.set_defaults(func=_guard("cache merge", _run_merge))


def _run_info(args) -> int:
    cache = RefLogpsCache.open(args.cache, check="full" if args.full_check else "quick")
    print(format_info(cache))
    cache.close()
    return 0


def _run_verify(args) -> int:
    if args.sample < 1:
        raise ValueError(f"--sample must be >= 1, got {args.sample}")
    report = verify_cache(args.cache, sample=args.sample, model=args.model, tokenizer=args.tokenizer,
                          dataset=args.dataset, split=args.split, device=args.device, batch_size=args.batch_size,
                          seed=args.seed, atol=args.atol, rtol=args.rtol)
    print(report.format())
    return 0 if report.ok else 1


def _run_merge(args) -> int:
    first = RefLogpsCache.open(args.sources[0])
    fp = first.fingerprint
    first.close()
    dest = RefLogpsCache.create_or_open(args.dest, fp, {"merged_from": len(args.sources)})
    added = merge_into(dest, args.sources, remove=False)
    print(f"merged {len(args.sources)} cache(s) into {args.dest}: {added} new entries, {len(dest)} in all")
    dest.close()
    return 0


CLEAR_ERRORS = (CacheError, DatasetError, FileNotFoundError, PermissionError, IsADirectoryError, ValueError,
                TypeError, ImportError, KeyError)


def _guard(name, run):
    """Print expected errors as one clear line (exit status 2) instead of a traceback."""

    def wrapped(args):
        try:
            return run(args)
        except CLEAR_ERRORS as e:
            message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            print(f"dpo-fast {name}: error: {message}", file=sys.stderr)
            return 2

    return wrapped


def register_precompute(subparsers):
    """Register ``dpo-fast precompute`` (see :data:`dpo_fast.cli.SUBCOMMANDS`)."""
    _add_precompute(subparsers)


def register_cache(subparsers):
    """Register ``dpo-fast cache info|verify|merge``."""
    _add_cache(subparsers)


def add_cli_commands(subparsers):
    """Register ``precompute`` and ``cache`` on an argparse subparsers object."""
    register_precompute(subparsers)
    register_cache(subparsers)
