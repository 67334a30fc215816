"""Preference data: loading, tokenisation the way TRL's DPOTrainer does it, and padding.

Tokenisation (text columns ``prompt``/``chosen``/``rejected``), as in TRL 1.x:

* the EOS token string is appended to ``chosen`` and ``rejected`` unless they already end with it;
* ``prompt``, ``prompt + chosen`` and ``prompt + rejected`` are tokenised with the tokenizer's
  defaults (so a BOS token is added where the tokenizer adds one);
* the completion starts where the tokenised prompt stops being a prefix of both tokenised
  ``prompt + completion`` (usually right after the prompt);
* conversational rows (lists of ``{"role", "content"}`` messages) go through the chat template
  instead, the prompt with ``add_generation_prompt=True``, and get no extra EOS.

Pre-tokenised rows (``prompt_ids``/``chosen_ids``/``rejected_ids``) are used as they are.

Collation (:func:`collate_preference`) matches TRL's ``DataCollatorForPreference``: each
sequence is ``prompt + completion`` truncated to ``max_length`` (``keep_start`` keeps the
beginning, ``keep_end`` the end), chosen rows first then rejected rows, right-padded. With
``keep_start``, an example whose prompt alone fills ``max_length`` has no completion token
left; TRL drops such examples and so does :func:`tokenize_rows` (they are counted).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

TEXT_COLUMNS = ("prompt", "chosen", "rejected")
ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
TRUNCATION_MODES = ("keep_start", "keep_end")


class DatasetError(ValueError):
    """A preference dataset that cannot be used: missing columns, empty, bad rows."""


@dataclass(frozen=True)
class PreferenceExample:
    """One tokenised preference pair (untruncated, as TRL stores it in its dataset)."""

    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]

    @property
    def key(self) -> bytes:
        return example_key(self.prompt_ids, self.chosen_ids, self.rejected_ids)

    def as_dict(self) -> dict[str, list[int]]:
        return {"prompt_ids": list(self.prompt_ids), "chosen_ids": list(self.chosen_ids),
                "rejected_ids": list(self.rejected_ids)}


@dataclass
class TokenizeStats:
    """Counts from :func:`tokenize_rows`."""

    rows: int = 0
    truncated: int = 0          # chosen or rejected sequence longer than max_length
    dropped_prompt_too_long: int = 0  # keep_start: the prompt alone fills max_length
    dropped_rows: list[int] = field(default_factory=list)


def example_key(prompt_ids: Sequence[int], chosen_ids: Sequence[int], rejected_ids: Sequence[int]) -> bytes:
    """16-byte BLAKE2b digest of the three token-id sequences (their lengths and int64 values).

    The cache key: the same token ids find the same entry whatever the dataset order, split
    or filtering.
    """
    h = hashlib.blake2b(digest_size=16, person=b"dpo_fast.key.v1")
    for ids in (prompt_ids, chosen_ids, rejected_ids):
        t = torch.as_tensor(list(ids), dtype=torch.int64)
        h.update(len(t).to_bytes(8, "little"))
        h.update(t.numpy().tobytes())
    return h.digest()


# ----------------------------------------------------------------------------- loading

def _check_columns(columns: Iterable[str], source: str) -> str:
    """``"ids"`` or ``"text"``, from the column names; raises naming the missing columns."""
    columns = set(columns)
    if all(c in columns for c in ID_COLUMNS):
        return "ids"
    if all(c in columns for c in TEXT_COLUMNS):
        return "text"
    missing_ids = [c for c in ID_COLUMNS if c not in columns]
    missing_text = [c for c in TEXT_COLUMNS if c not in columns]
    missing = missing_ids if len(missing_ids) < len(missing_text) else missing_text
    raise DatasetError(
        f"{source} is missing column(s) {', '.join(repr(c) for c in missing)}: a preference dataset needs "
        f"text columns {list(TEXT_COLUMNS)} or pre-tokenised columns {list(ID_COLUMNS)}; found columns "
        f"{sorted(columns) or 'none'}"
    )


def detect_format(rows: Sequence[dict], source: str = "dataset") -> str:
    """``"ids"`` or ``"text"`` for a non-empty list of rows (every row must carry the columns)."""
    if not rows:
        raise DatasetError(f"{source} is empty: no preference examples to use")
    kind = _check_columns(rows[0].keys(), source)
    needed = ID_COLUMNS if kind == "ids" else TEXT_COLUMNS
    for i, row in enumerate(rows):
        missing = [c for c in needed if c not in row or row[c] is None]
        if missing:
            raise DatasetError(f"{source}: row {i} is missing column(s) {', '.join(repr(c) for c in missing)}")
    return kind


def load_jsonl(path: str) -> list[dict]:
    """Rows of a JSON Lines file (one JSON object per line; blank lines skipped)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
            rows.append(row)
    return rows


def load_parquet(path: str) -> list[dict]:
    """Rows of a Parquet file (needs ``pyarrow``)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    table = pq.read_table(path)
    kind = _check_columns(table.column_names, path)
    return table.select(list(ID_COLUMNS if kind == "ids" else TEXT_COLUMNS)).to_pylist()


def load_hf_disk(path: str, split: str | None = None) -> list[dict]:
    """Rows of a ``datasets`` Dataset (or one split of a DatasetDict) saved with ``save_to_disk``."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"reading the saved dataset {path} needs the datasets package: pip install datasets") from None
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if len(ds) != 1:
                raise DatasetError(f"{path} is a DatasetDict with splits {list(ds)}; choose one with split=/--split")
            split = next(iter(ds))
        if split not in ds:
            raise DatasetError(f"{path} has no split {split!r}; splits: {list(ds)}")
        ds = ds[split]
    elif split is not None and split != getattr(ds, "split", split):
        raise DatasetError(f"{path} is a single Dataset (split {ds.split!r}), cannot select split {split!r}")
    kind = _check_columns(ds.column_names, path)
    return ds.select_columns(list(ID_COLUMNS if kind == "ids" else TEXT_COLUMNS)).to_list()


def load_rows(path: str, split: str | None = None) -> list[dict]:
    """Load preference rows from JSONL (``.jsonl``/``.json`` lines), Parquet (``.parquet``) or a
    ``datasets`` folder saved with ``save_to_disk``. Raises naming the path for anything else."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"dataset must be a path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset not found: {path}")
    if split is not None and not os.path.isdir(path):
        raise DatasetError(f"split={split!r} only applies to a datasets folder, not {path}")
    if os.path.isdir(path):
        markers = ("dataset_info.json", "state.json", "dataset_dict.json")
        if not any(os.path.exists(os.path.join(path, m)) for m in markers):
            raise DatasetError(f"{path} is a folder but not a datasets save_to_disk folder (no {' / '.join(markers)})")
        rows = load_hf_disk(path, split)
    elif path.endswith((".jsonl", ".json", ".jsonl.txt")):
        rows = load_jsonl(path)
    elif path.endswith((".parquet", ".pq")):
        rows = load_parquet(path)
    else:
        raise DatasetError(f"cannot tell the format of {path}: use a .jsonl, .parquet or a datasets save_to_disk folder")
    detect_format(rows, path)
    return rows


# ----------------------------------------------------------------------------- tokenisation

def _is_conversation(value) -> bool:
    return isinstance(value, list) and (not value or isinstance(value[0], dict))


def _ids(tokenizer, text):
    out = tokenizer(text=text)
    return list(out["input_ids"])


def _chat_ids(tokenizer, messages, **kwargs):
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    ids = out["input_ids"]
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def check_tokenizer(tokenizer):
    """A tokenizer usable for text rows: callable, with an EOS token (appended to completions)."""
    if tokenizer is None:
        raise ValueError("text columns prompt/chosen/rejected need a tokenizer (tokenizer=None was given)")
    if getattr(tokenizer, "eos_token", None) is None or getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no EOS token: TRL-style tokenisation appends EOS to every "
            "completion. Set tokenizer.eos_token (e.g. tokenizer.eos_token = '</s>') before tokenising."
        )


def tokenize_row(row: dict, tokenizer=None, *, index: int | None = None) -> PreferenceExample:
    """One row (text or pre-tokenised) -> :class:`PreferenceExample`, as TRL's DPOTrainer does it."""
    where = "row" if index is None else f"row {index}"
    if all(c in row for c in ID_COLUMNS):
        parts = []
        for c in ID_COLUMNS:
            ids = row[c]
            if isinstance(ids, torch.Tensor):
                ids = ids.tolist()
            if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise DatasetError(f"{where}: column {c!r} must be a list of integer token ids")
            if any(i < 0 for i in ids):
                raise DatasetError(f"{where}: column {c!r} has negative token ids")
            parts.append(tuple(int(i) for i in ids))
        for c, ids in zip(ID_COLUMNS[1:], parts[1:]):
            if not ids:
                raise DatasetError(f"{where}: empty completion: column {c!r} has no token ids")
        return PreferenceExample(*parts)
    missing = [c for c in TEXT_COLUMNS if c not in row]
    if missing:
        raise DatasetError(f"{where} is missing column(s) {', '.join(repr(c) for c in missing)}")
    check_tokenizer(tokenizer)
    prompt, chosen, rejected = (row[c] for c in TEXT_COLUMNS)
    for c, value in (("chosen", chosen), ("rejected", rejected)):
        if value is None or (isinstance(value, str) and not value) or (isinstance(value, list) and not value):
            raise DatasetError(f"{where}: empty completion: column {c!r} is empty")
    if _is_conversation(prompt):
        if not (_is_conversation(chosen) and _is_conversation(rejected)):
            raise DatasetError(f"{where}: prompt is a conversation, so chosen and rejected must be message lists")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("conversational rows need a tokenizer with a chat_template")
        prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True)
        pc = _chat_ids(tokenizer, prompt + chosen)
        pr = _chat_ids(tokenizer, prompt + rejected)
    else:
        for c, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, str):
                raise DatasetError(f"{where}: column {c!r} must be a string (or a message list), got {type(value).__name__}")
        eos = tokenizer.eos_token
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        prompt_ids = _ids(tokenizer, prompt)
        pc = _ids(tokenizer, prompt + chosen)
        pr = _ids(tokenizer, prompt + rejected)
    n = min(_common_prefix(prompt_ids, pc), _common_prefix(prompt_ids, pr))
    example = PreferenceExample(tuple(prompt_ids[:n]), tuple(pc[n:]), tuple(pr[n:]))
    for c, ids in (("chosen", example.chosen_ids), ("rejected", example.rejected_ids)):
        if not ids:
            raise DatasetError(f"{where}: empty completion: column {c!r} tokenises to no tokens after the prompt")
    return example


def _check_truncation(max_length, truncation_mode):
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length must be None or an int >= 2, got {max_length!r}")
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")


def tokenize_rows(rows: Sequence[dict], tokenizer=None, *, max_length: int | None = None,
                  truncation_mode: str = "keep_start", source: str = "dataset"):
    """Tokenise every row; returns ``(examples, stats)``.

    Examples longer than ``max_length`` are kept (they are truncated at collation) and counted in
    ``stats.truncated``; with ``keep_start``, examples whose prompt alone fills ``max_length`` are
    dropped, as TRL drops them, and counted in ``stats.dropped_prompt_too_long``.
    """
    _check_truncation(max_length, truncation_mode)
    kind = detect_format(rows, source)
    if kind == "text":
        check_tokenizer(tokenizer)
    stats = TokenizeStats(rows=len(rows))
    examples = []
    for i, row in enumerate(rows):
        ex = tokenize_row(row, tokenizer, index=i)
        if max_length is not None:
            longest = len(ex.prompt_ids) + max(len(ex.chosen_ids), len(ex.rejected_ids))
            if truncation_mode == "keep_start" and len(ex.prompt_ids) >= max_length:
                stats.dropped_prompt_too_long += 1
                stats.dropped_rows.append(i)
                continue
            if longest > max_length:
                stats.truncated += 1
        examples.append(ex)
    if not examples:
        raise DatasetError(f"{source}: every example was dropped (prompt alone fills max_length={max_length})")
    return examples, stats


# ----------------------------------------------------------------------------- collation

def _as_lists(example) -> tuple[list[int], list[int], list[int]]:
    if isinstance(example, PreferenceExample):
        return list(example.prompt_ids), list(example.chosen_ids), list(example.rejected_ids)
    try:
        return tuple(list(example[c].tolist() if isinstance(example[c], torch.Tensor) else example[c])
                     for c in ID_COLUMNS)
    except KeyError as e:
        raise DatasetError(f"collate: example is missing column {e.args[0]!r} (needs {list(ID_COLUMNS)})") from None


def sequences(example, max_length=None, truncation_mode="keep_start"):
    """``(chosen_ids, chosen_mask, rejected_ids, rejected_mask)`` of one example after truncation."""
    prompt, chosen, rejected = _as_lists(example)
    out = []
    for completion in (chosen, rejected):
        ids = prompt + completion
        mask = [0] * len(prompt) + [1] * len(completion)
        if max_length is not None and len(ids) > max_length:
            sl = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
            ids, mask = ids[sl], mask[sl]
        out += [ids, mask]
    return tuple(out)


def collate_preference(examples, *, pad_token_id: int = 0, max_length: int | None = None,
                       truncation_mode: str = "keep_start", pad_to_multiple_of: int | None = None) -> dict:
    """Pad a list of examples into one batch, chosen rows first, then rejected rows.

    Same output as TRL's ``DataCollatorForPreference``: ``input_ids``, ``attention_mask`` and
    ``completion_mask``, each ``[2B, T]`` (long), rows ``0..B-1`` the chosen sequences and
    ``B..2B-1`` the rejected ones, right-padded with ``pad_token_id``. Examples are
    :class:`PreferenceExample` or dicts with ``prompt_ids``/``chosen_ids``/``rejected_ids``.
    """
    _check_truncation(max_length, truncation_mode)
    if not examples:
        raise ValueError("collate_preference: examples is empty")
    chosen, rejected = [], []
    for ex in examples:
        c_ids, c_mask, r_ids, r_mask = sequences(ex, max_length, truncation_mode)
        chosen.append((c_ids, c_mask))
        rejected.append((r_ids, r_mask))
    rows = chosen + rejected
    width = max(len(ids) for ids, _ in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, :len(ids)] = 1
        completion_mask[i, :len(mask)] = torch.tensor(mask, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


class PreferenceCollator:
    """Callable form of :func:`collate_preference` for a ``DataLoader``."""

    def __init__(self, *, pad_token_id: int = 0, max_length: int | None = None, truncation_mode: str = "keep_start",
                 pad_to_multiple_of: int | None = None):
        _check_truncation(max_length, truncation_mode)
        self.kwargs: dict[str, Any] = dict(pad_token_id=pad_token_id, max_length=max_length,
                                           truncation_mode=truncation_mode, pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, examples):
        return collate_preference(examples, **self.kwargs)
