"""Persistent cache of reference-model sequence log-probs for DPO.

Run the frozen reference model once (``dpo-fast precompute``, see :mod:`dpo_fast.precompute`),
store per example the summed log-probs of the chosen and rejected completions, then train with
only the policy in memory, reading ``ref_chosen_logps``/``ref_rejected_logps`` from here.

Storage: one SQLite file in WAL mode (stdlib ``sqlite3``). Every batch is one transaction, so a
``kill -9`` loses at most the batch in flight and readers see only committed batches while a
writer runs. Each row carries a CRC32 of its contents and the file header is checked on open, so
a truncated or damaged file raises :class:`CacheCorruptError` instead of yielding numbers.

Key: a 16-byte BLAKE2b of the example's token ids (prompt, chosen, rejected; see
:func:`dpo_fast.data.example_key`), so a shuffled, filtered or re-split dataset finds its entries.

Fingerprint: every input that changes the stored numbers (weight-file hashes, model config,
tokenizer, max_length, truncation mode, dtype, temperature, logit scale, softcap, ld_alpha, and
the storage options). Writing to a cache with a different fingerprint raises
:class:`StaleCacheError` naming the fields that differ; readers check the fields they know with
:meth:`RefLogpsCache.check`.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import sqlite3
import struct
import time
import zlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from .data import ID_COLUMNS, PreferenceExample, collate_preference, example_key

# Format 2: each row's CRC is salted with the SHA-256 of the cache's fingerprint, so a row computed
# under another fingerprint (e.g. replayed from a stale or foreign -wal file) fails its checksum.
CACHE_FORMAT = 2
# Files SQLite keeps beside a database: a stale one would be replayed into a new file at the same path.
SIDE_SUFFIXES = ("-wal", "-shm", "-journal")
SQLITE_MAGIC = b"SQLite format 3\x00"
STORE_DTYPES = ("float64", "float32")
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "float64": torch.float64}
WEIGHT_SUFFIXES = (".safetensors", ".index.json")
WEIGHT_PREFIXES_BIN = ("pytorch_model", "model")
_MAX_SQL_PARAMS = 500

# Fingerprint fields, in display order, with what a difference means.
FINGERPRINT_FIELDS = {
    "format": "cache format version",
    "model_weights": "SHA-256 of each weight file of the model folder",
    "model_config": "SHA-256 of the model's config.json (minus bookkeeping keys)",
    "tokenizer": "SHA-256 of the tokenizer (vocabulary, pre/post-processing, special tokens, chat template)",
    "max_length": "max_length truncation of prompt + completion",
    "truncation_mode": "truncation mode (keep_start / keep_end)",
    "dtype": "dtype the reference model ran in",
    "temperature": "temperature dividing the logits",
    "logit_scale": "logit scale of the model's lm_head",
    "softcap": "final logit softcap of the model",
    "ld_alpha": "LD-DPO weight of tokens past the shorter completion",
    "store_dtype": "precision of the stored sums",
    "token_logps": "whether per-token log-probs are stored",
}


class CacheError(RuntimeError):
    """Base class of the cache's errors."""


class CacheCorruptError(CacheError):
    """The cache file is truncated, damaged, or not a dpo_fast cache."""


class StaleCacheError(CacheError):
    """The cache was computed under a different fingerprint than the one asked for."""

    def __init__(self, message: str, fields: Sequence[str]):
        super().__init__(message)
        self.fields = tuple(fields)


# ----------------------------------------------------------------------------- fingerprint

_RACY_NS = 2_000_000_000  # timestamps closer than this to the hashing time are not trusted


def _hash_memo_path() -> str | None:
    if os.environ.get("DPO_FAST_HASH_MEMO", "1") == "0":
        return None
    root = os.environ.get("DPO_FAST_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "dpo_fast")
    return os.path.join(root, "file-hashes.json")


def _file_identity(st) -> list:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def sha256_file(path: str) -> str:
    """SHA-256 of a file, streamed from disk (nothing is loaded as tensors).

    Multi-GB weight files take seconds to hash, so digests are remembered in
    ``~/.cache/dpo_fast/file-hashes.json`` keyed by path, device, inode, size, mtime and ctime
    (any write changes the ctime, which cannot be set by hand). A digest is reused only if the
    file was last changed more than 2 s before it was hashed, so a write within the timestamp
    granularity can never be missed. ``DPO_FAST_HASH_MEMO=0`` disables the memo.
    """
    path = os.path.abspath(path)
    memo_path = _hash_memo_path()
    st = os.stat(path)
    memo = {}
    if memo_path and os.path.exists(memo_path):
        try:
            with open(memo_path, encoding="utf-8") as f:
                memo = json.load(f)
            hit = memo.get(path)
            if hit and hit["identity"] == _file_identity(st) and hit["hashed_at_ns"] - st.st_ctime_ns > _RACY_NS:
                return hit["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            memo = {}
    started = time.time_ns()
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if memo_path and _file_identity(os.stat(path)) == _file_identity(st):
        memo = {k: v for k, v in memo.items() if os.path.exists(k)}  # forget deleted files
        memo[path] = {"identity": _file_identity(st), "hashed_at_ns": started, "sha256": digest}
        try:
            os.makedirs(os.path.dirname(memo_path), exist_ok=True)
            tmp = f"{memo_path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(memo, f)
            os.replace(tmp, memo_path)
        except OSError:
            pass
    return digest


def weight_files(model_dir: str) -> list[str]:
    """The files ``from_pretrained`` reads weights from: ``*.safetensors``, their ``*.index.json``,
    and ``pytorch_model*.bin`` / ``model*.bin``, relative to ``model_dir``."""
    names = []
    for name in sorted(os.listdir(model_dir)):
        full = os.path.join(model_dir, name)
        if not os.path.isfile(full):
            continue
        if name.endswith(WEIGHT_SUFFIXES) or (name.endswith(".bin") and name.startswith(WEIGHT_PREFIXES_BIN)):
            names.append(name)
    return names


def _canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def config_digest(model_dir: str) -> str:
    """SHA-256 of ``config.json`` with bookkeeping keys dropped (``transformers_version``,
    ``_name_or_path``, ``dtype``/``torch_dtype``, keys starting with ``_``), keys sorted."""
    path = os.path.join(model_dir, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    drop = {"transformers_version", "dtype", "torch_dtype", "use_cache"}
    config = {k: v for k, v in config.items() if k not in drop and not k.startswith("_")}
    return hashlib.sha256(_canonical_json(config).encode()).hexdigest()


def model_fingerprint(model_dir: str) -> dict:
    """``{"model_weights": {file: sha256}, "model_config": sha256}`` of a model folder."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model folder not found: {model_dir}")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"{model_dir} has no config.json: not a Hugging Face model folder")
    files = weight_files(model_dir)
    if not files:
        raise FileNotFoundError(f"{model_dir} has no weight files (*.safetensors or pytorch_model*.bin)")
    return {"model_weights": {name: sha256_file(os.path.join(model_dir, name)) for name in files},
            "model_config": config_digest(model_dir)}


def tokenizer_digest(tokenizer) -> str | None:
    """SHA-256 of what decides a tokenizer's ids: its backend (vocabulary, normaliser, pre- and
    post-processor), special tokens and chat template. None for ``tokenizer=None``."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = {
        "class": type(tokenizer).__name__,
        "backend": backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())},
        "ids": [getattr(tokenizer, n, None) for n in ("bos_token_id", "eos_token_id", "pad_token_id")],
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(_canonical_json(state).encode()).hexdigest()


def build_fingerprint(*, model_weights: dict, model_config: str, tokenizer: str | None, max_length: int | None,
                      truncation_mode: str, dtype: str, temperature: float, logit_scale: float,
                      softcap: float | None, ld_alpha: float | None, store_dtype: str = "float64",
                      token_logps: bool = False) -> dict:
    """The fingerprint dict, validated; see ``FINGERPRINT_FIELDS``."""
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"dtype must be one of {list(MODEL_DTYPES)}, got {dtype!r}")
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"store_dtype must be one of {STORE_DTYPES}, got {store_dtype!r}")
    if ld_alpha is not None and not (0.0 <= float(ld_alpha) <= 1.0):
        raise ValueError(f"ld_alpha must be None or in [0, 1], got {ld_alpha!r}")
    return {
        "format": CACHE_FORMAT,
        "model_weights": dict(sorted(model_weights.items())),
        "model_config": model_config,
        "tokenizer": tokenizer,
        "max_length": None if max_length is None else int(max_length),
        "truncation_mode": truncation_mode,
        "dtype": dtype,
        "temperature": float(temperature),
        "logit_scale": float(logit_scale),
        "softcap": None if softcap is None else float(softcap),
        "ld_alpha": None if ld_alpha is None else float(ld_alpha),
        "store_dtype": store_dtype,
        "token_logps": bool(token_logps),
    }


def _short(value) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 24 else text[:12] + "..."


def fingerprint_diff(cached: dict, current: dict, fields: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """``[(field, description of the difference)]`` over ``fields`` (default: all)."""
    out = []
    for name in (fields if fields is not None else FINGERPRINT_FIELDS):
        a, b = cached.get(name, "<absent>"), current.get(name, "<absent>")
        if a == b:
            continue
        if name == "model_weights" and isinstance(a, dict) and isinstance(b, dict):
            changed = sorted(k for k in set(a) & set(b) if a[k] != b[k])
            parts = [f"changed {', '.join(changed)}"] if changed else []
            if set(b) - set(a):
                parts.append(f"new {', '.join(sorted(set(b) - set(a)))}")
            if set(a) - set(b):
                parts.append(f"missing {', '.join(sorted(set(a) - set(b)))}")
            out.append((name, "; ".join(parts)))
        else:
            out.append((name, f"cache has {_short(a)}, now {_short(b)}"))
    return out


def _stale_error(path, diffs):
    lines = "\n".join(f"  - {name}: {what} ({FINGERPRINT_FIELDS.get(name, '')})" for name, what in diffs)
    return StaleCacheError(
        f"{path} was computed with a different {', '.join(n for n, _ in diffs)}; its numbers do not apply:\n{lines}\n"
        "Use a new cache path, or delete this cache to recompute it.", [n for n, _ in diffs])


def fingerprint_hash(fingerprint: dict) -> str:
    return hashlib.sha256(_canonical_json(fingerprint).encode()).hexdigest()


# ----------------------------------------------------------------------------- rows

@dataclass
class Entry:
    """One cached example."""

    key: bytes
    chosen_logps: float
    rejected_logps: float
    chosen_tokens: int
    rejected_tokens: int
    truncated: bool
    token_logps: bytes | None = None   # float32: chosen tokens then rejected tokens
    inputs: bytes | None = None        # zlib(int32: lengths then prompt, chosen, rejected ids)

    def crc(self, salt: bytes = b"") -> int:
        """CRC32 of the row, salted with ``salt`` (the cache stores rows under its fingerprint's hash)."""
        head = struct.pack("<ddqqq", self.chosen_logps, self.rejected_logps, self.chosen_tokens,
                           self.rejected_tokens, int(self.truncated))
        crc = zlib.crc32(self.key, zlib.crc32(salt))
        return zlib.crc32(self.token_logps or b"", zlib.crc32(self.inputs or b"", zlib.crc32(head, crc)))

    def example(self) -> PreferenceExample | None:
        """The token ids this entry was computed from, when the cache stores them."""
        if self.inputs is None:
            return None
        ids = torch.frombuffer(bytearray(zlib.decompress(self.inputs)), dtype=torch.int32).tolist()
        np_, nc, nr = ids[:3]
        body = ids[3:]
        return PreferenceExample(tuple(body[:np_]), tuple(body[np_:np_ + nc]), tuple(body[np_ + nc:np_ + nc + nr]))

    def token_values(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(chosen [chosen_tokens], rejected [rejected_tokens])`` float32 per-token log-probs, if stored."""
        if self.token_logps is None:
            return None
        values = torch.frombuffer(bytearray(self.token_logps), dtype=torch.float32)
        return values[:self.chosen_tokens].clone(), values[self.chosen_tokens:].clone()


def pack_inputs(example: PreferenceExample) -> bytes:
    ids = [len(example.prompt_ids), len(example.chosen_ids), len(example.rejected_ids),
           *example.prompt_ids, *example.chosen_ids, *example.rejected_ids]
    return zlib.compress(torch.tensor(ids, dtype=torch.int32).numpy().tobytes(), 6)


_COLUMNS = "key, chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, truncated, token_logps, inputs, crc"
_SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE entries (
    key BLOB PRIMARY KEY,
    chosen_logps REAL NOT NULL,
    rejected_logps REAL NOT NULL,
    chosen_tokens INTEGER NOT NULL,
    rejected_tokens INTEGER NOT NULL,
    truncated INTEGER NOT NULL,
    token_logps BLOB,
    inputs BLOB,
    crc INTEGER NOT NULL
) WITHOUT ROWID;
"""


def _row_to_entry(row, path, salt: bytes) -> Entry:
    key, c, r, ct, rt, trunc, tl, inputs, crc = row
    if not isinstance(key, bytes) or not isinstance(c, float) or not isinstance(r, float):
        raise CacheCorruptError(f"{path}: a cache row has the wrong types; the file is corrupted")
    entry = Entry(key, c, r, ct, rt, bool(trunc), tl, inputs)
    if entry.crc(salt) != crc:
        raise CacheCorruptError(
            f"{path}: the entry {key.hex()} fails its checksum: the file is corrupted, or the row was computed "
            "under another fingerprint (e.g. replayed from a -wal file of another cache). Delete the cache and its "
            f"{'/'.join(SIDE_SUFFIXES)} files and re-run dpo-fast precompute.")
    return entry


# ----------------------------------------------------------------------------- the cache

def _check_header(path: str):
    """Raise CacheCorruptError for a file that is not a complete SQLite database."""
    size = os.path.getsize(path)
    if size == 0:
        raise CacheCorruptError(f"{path} is empty (truncated?); it is not a dpo_fast cache")
    with open(path, "rb") as f:
        header = f.read(100)
    if len(header) < 100 or not header.startswith(SQLITE_MAGIC):
        raise CacheCorruptError(f"{path} is not a dpo_fast cache (bad file header: truncated or overwritten)")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        raise CacheCorruptError(f"{path}: corrupted header (page size {page_size})")
    if size % page_size:
        raise CacheCorruptError(f"{path} is truncated: {size} bytes is not a whole number of {page_size}-byte pages")
    wal = path + "-wal"
    if not (os.path.exists(wal) and os.path.getsize(wal) > 0):
        pages = int.from_bytes(header[28:32], "big")
        if header[92:96] == header[24:28] and pages * page_size > size:
            raise CacheCorruptError(f"{path} is truncated: the header says {pages} pages "
                                    f"({pages * page_size} bytes) but the file has {size} bytes")


@contextlib.contextmanager
def _creation_lock(path: str):
    """Exclusive flock on the cache's folder while a new cache file is moved into place, so that
    the stale-file cleanup can never remove the live -wal of a cache another process just created."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class RefLogpsCache:
    """A reference log-prob cache file. Open with :meth:`open` (read) or :meth:`create_or_open` (write).

    Lookups return float tensors: ``cache.lookup(examples)["ref_chosen_logps"]``.
    """

    def __init__(self, path: str, *, writable: bool, check: str = "quick"):
        self.path = os.fspath(path)
        self.writable = writable
        self._check = check
        self._pid = None
        self._conn = None
        self._connect()
        self.fingerprint, self.info = self._read_meta()
        self._salt = bytes.fromhex(fingerprint_hash(self.fingerprint))
        if check in ("quick", "full"):
            self.integrity_check(full=check == "full")

    # -- connection management

    def _connect(self):
        try:
            if self.writable:
                conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
            else:
                uri = "file:" + os.path.abspath(self.path).replace("?", "%3f").replace("#", "%23") + "?mode=ro"
                conn = sqlite3.connect(uri, uri=True, timeout=60, isolation_level=None)
            conn.execute("PRAGMA busy_timeout=60000")
        except sqlite3.DatabaseError as e:
            raise CacheCorruptError(f"{self.path}: cannot open the cache ({e}); the file is corrupted") from None
        self._conn, self._pid = conn, os.getpid()

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():  # reopen after fork (DataLoader workers)
            self._connect()
        return self._conn

    def _query(self, sql, params=()):
        try:
            return self.conn.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
                raise
            raise CacheCorruptError(f"{self.path}: the cache file is corrupted ({e}). "
                                    "Delete it and re-run dpo-fast precompute.") from None

    def close(self):
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):  # picklable for DataLoader workers: reopen in the child
        return {"path": self.path, "writable": False, "check": "none"}

    def __setstate__(self, state):
        self.__init__(state["path"], writable=state["writable"], check=state["check"])

    def _read_meta(self):
        try:
            tables = {r[0] for r in self._query("SELECT name FROM sqlite_master WHERE type='table'")}
        except CacheCorruptError:
            raise
        if not {"meta", "entries"} <= tables:
            raise CacheCorruptError(f"{self.path} is an SQLite file but not a dpo_fast cache (tables: {sorted(tables)})")
        meta = dict(self._query("SELECT name, value FROM meta"))
        try:
            fmt = int(meta["format"])
            fingerprint = json.loads(meta["fingerprint"])
            info = json.loads(meta.get("info", "{}"))
        except (KeyError, ValueError) as e:
            raise CacheCorruptError(f"{self.path}: the cache's metadata is damaged ({e!r})") from None
        if fmt != CACHE_FORMAT:
            why = (" (written by an older dpo_fast whose rows are not bound to their fingerprint; delete it and "
                   "re-run dpo-fast precompute)" if fmt < CACHE_FORMAT else " (written by a newer dpo_fast)")
            raise CacheError(f"{self.path} has cache format {fmt}; this dpo_fast reads format {CACHE_FORMAT}{why}")
        if fingerprint_hash(fingerprint) != meta.get("fingerprint_sha256"):
            raise CacheCorruptError(f"{self.path}: the stored fingerprint fails its checksum; the file is corrupted")
        return fingerprint, info

    # -- opening

    @classmethod
    def open(cls, path, *, check: str = "quick", expect: dict | None = None) -> "RefLogpsCache":
        """Open an existing cache for reading.

        Args:
            check: ``"quick"`` (SQLite ``quick_check``, default), ``"full"`` (``integrity_check``)
                or ``"none"``; row checksums are verified on every read regardless.
            expect: fingerprint fields the caller relies on (see :meth:`check`).
        """
        if check not in ("none", "quick", "full"):
            raise ValueError(f"check must be 'none', 'quick' or 'full', got {check!r}")
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"cache not found: {path}")
        _check_header(path)
        cache = cls(path, writable=False, check=check)
        if expect:
            cache.check(**expect)
        return cache

    @classmethod
    def create_or_open(cls, path, fingerprint: dict, info: dict | None = None) -> "RefLogpsCache":
        """Open ``path`` for writing, creating it with ``fingerprint`` if absent.

        An existing cache must have exactly ``fingerprint``: otherwise :class:`StaleCacheError`
        names the fields that differ. A new cache is built in a temporary file and renamed into
        place once its schema and fingerprint are committed, so a crash never leaves a half-made file.
        """
        path = os.fspath(path)
        if not isinstance(fingerprint, dict) or not {"format", "model_weights", "model_config"} <= set(fingerprint):
            raise TypeError("fingerprint must be a dict made by build_fingerprint (with format, model_weights, "
                            f"model_config, ...), got {type(fingerprint).__name__}")
        check_writable(path)
        if not os.path.exists(path):
            tmp = f"{path}.creating-{os.getpid()}"
            for suffix in ("", "-journal"):
                if os.path.exists(tmp + suffix):
                    os.remove(tmp + suffix)
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=DELETE")
                conn.execute("BEGIN")
                for statement in _SCHEMA.strip().split(";"):
                    if statement.strip():
                        conn.execute(statement)
                meta = {"format": str(CACHE_FORMAT), "fingerprint": _canonical_json(fingerprint),
                        "fingerprint_sha256": fingerprint_hash(fingerprint),
                        "info": _canonical_json(dict(info or {}, created=time.strftime("%Y-%m-%dT%H:%M:%S%z")))}
                conn.executemany("INSERT INTO meta VALUES (?, ?)", sorted(meta.items()))
                conn.execute("COMMIT")
                conn.execute("PRAGMA journal_mode=WAL")
            finally:
                conn.close()
            with _creation_lock(path):
                if os.path.exists(path):  # somebody else created it meanwhile: use theirs
                    os.remove(tmp)
                else:
                    # No database at path, so any -wal/-shm/-journal beside it is stale (a killed run of
                    # a removed cache): SQLite would replay it into the new file. Remove it first.
                    for suffix in SIDE_SUFFIXES:
                        if os.path.lexists(path + suffix):
                            os.remove(path + suffix)
                    os.replace(tmp, path)
            for suffix in SIDE_SUFFIXES:
                if os.path.exists(tmp + suffix):
                    os.remove(tmp + suffix)
        _check_header(path)
        cache = cls(path, writable=True, check="quick")
        diffs = fingerprint_diff(cache.fingerprint, fingerprint)
        if diffs:
            cache.close()
            raise _stale_error(path, diffs)
        return cache

    # -- checks

    def integrity_check(self, full: bool = False):
        """SQLite's ``quick_check`` (or ``integrity_check``); raises CacheCorruptError on damage."""
        rows = self._query("PRAGMA integrity_check" if full else "PRAGMA quick_check")
        if [r[0] for r in rows] != ["ok"]:
            detail = "; ".join(str(r[0]) for r in rows[:3])
            raise CacheCorruptError(f"{self.path}: the cache file is corrupted ({detail}). "
                                    "Delete it and re-run dpo-fast precompute.")

    def check(self, *, model: str | None = None, tokenizer=None, max_length=..., truncation_mode=None,
              dtype=None, temperature=None, ld_alpha=..., **fields):
        """Raise :class:`StaleCacheError` if the cache does not match what the caller will use.

        Only the given arguments are compared. ``model`` is a model folder (its weight files and
        config are hashed), ``tokenizer`` a tokenizer object; ``max_length`` and ``ld_alpha``
        compare ``None`` too (pass them as your trainer uses them). Other fingerprint fields can
        be given by name.
        """
        current = {}
        if model is not None:
            current.update(model_fingerprint(os.fspath(model)))
        if tokenizer is not None:
            current["tokenizer"] = tokenizer_digest(tokenizer)
        if max_length is not ...:
            current["max_length"] = None if max_length is None else int(max_length)
        if truncation_mode is not None:
            current["truncation_mode"] = truncation_mode
        if dtype is not None:
            current["dtype"] = str(dtype).replace("torch.", "")
        if temperature is not None:
            current["temperature"] = float(temperature)
        if ld_alpha is not ...:
            current["ld_alpha"] = None if ld_alpha is None else float(ld_alpha)
        unknown = [k for k in fields if k not in FINGERPRINT_FIELDS]
        if unknown:
            raise ValueError(f"unknown fingerprint field(s) {unknown}; known: {list(FINGERPRINT_FIELDS)}")
        current.update(fields)
        diffs = fingerprint_diff(self.fingerprint, current, fields=[f for f in FINGERPRINT_FIELDS if f in current])
        if diffs:
            raise _stale_error(self.path, diffs)

    # -- writing

    def write(self, entries: Sequence[Entry]) -> int:
        """Insert entries in one transaction (all or none); existing keys are kept. Returns rows added."""
        if not self.writable:
            raise CacheError(f"{self.path} was opened read-only")
        if not entries:
            return 0
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            before = conn.total_changes
            conn.executemany(
                f"INSERT OR IGNORE INTO entries ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(e.key, float(e.chosen_logps), float(e.rejected_logps), int(e.chosen_tokens), int(e.rejected_tokens),
                  int(e.truncated), e.token_logps, e.inputs, e.crc(self._salt)) for e in entries])
            added = conn.total_changes - before
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return added

    # -- reading

    def __len__(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM entries")[0][0])

    def present(self, keys: Iterable[bytes]) -> set[bytes]:
        """The subset of ``keys`` stored in the cache. Every row found is checksum-verified (a row
        of another fingerprint raises :class:`CacheCorruptError`), so nothing foreign counts as cached."""
        keys = list(keys)
        return {k for k, e in zip(keys, self.get(keys)) if e is not None}

    def get(self, keys: Sequence[bytes]) -> list[Entry | None]:
        """Entries for ``keys`` in order (None where absent); checksums verified."""
        keys = list(keys)
        by_key = {}
        for i in range(0, len(keys), _MAX_SQL_PARAMS):
            chunk = list(dict.fromkeys(keys[i:i + _MAX_SQL_PARAMS]))
            rows = self._query(f"SELECT {_COLUMNS} FROM entries WHERE key IN ({','.join('?' * len(chunk))})", chunk)
            for row in rows:
                entry = _row_to_entry(row, self.path, self._salt)
                by_key[entry.key] = entry
        return [by_key.get(k) for k in keys]

    def entries(self, batch: int = 1000):
        """Iterate over every entry (checksums verified)."""
        last = b""
        while True:
            rows = self._query(f"SELECT {_COLUMNS} FROM entries WHERE key > ? ORDER BY key LIMIT ?", (last, batch))
            if not rows:
                return
            for row in rows:
                yield _row_to_entry(row, self.path, self._salt)
            last = rows[-1][0]

    def sample(self, n: int, seed: int = 0) -> list[Entry]:
        """``n`` entries chosen uniformly at random (deterministic for a seed)."""
        keys = [r[0] for r in self._query("SELECT key FROM entries ORDER BY key")]
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(keys), generator=g)[:n].tolist()
        return [e for e in self.get([keys[i] for i in order]) if e is not None]

    def stats(self) -> dict:
        row = self._query(
            "SELECT COUNT(*), COALESCE(SUM(truncated), 0), COALESCE(SUM(chosen_tokens + rejected_tokens), 0), "
            "COALESCE(SUM(inputs IS NOT NULL), 0), COALESCE(SUM(token_logps IS NOT NULL), 0) FROM entries")[0]
        size = sum(os.path.getsize(p) for p in (self.path, self.path + "-wal") if os.path.exists(p))
        return {"entries": row[0], "truncated": row[1], "completion_tokens": row[2], "with_inputs": row[3],
                "with_token_logps": row[4], "bytes": size}

    def lookup_keys(self, keys: Sequence[bytes], *, dtype=torch.float32, device=None) -> dict:
        """``{"ref_chosen_logps", "ref_rejected_logps", "chosen_tokens", "rejected_tokens"}`` tensors
        for the given keys. Raises ``KeyError`` naming how many keys are missing."""
        entries = self.get(keys)
        missing = [k for k, e in zip(keys, entries) if e is None]
        if missing:
            raise KeyError(
                f"{len(missing)} of {len(keys)} examples are not in the cache {self.path} (e.g. key "
                f"{missing[0].hex()}): run dpo-fast precompute on this dataset, and check that it is tokenised the "
                "same way (same tokenizer, chat template and columns)")
        def values(name):  # float64 as stored, then the requested dtype
            return torch.tensor([getattr(e, name) for e in entries], dtype=torch.float64).to(dtype=dtype, device=device)

        return {
            "ref_chosen_logps": values("chosen_logps"),
            "ref_rejected_logps": values("rejected_logps"),
            "chosen_tokens": torch.tensor([e.chosen_tokens for e in entries], dtype=torch.long, device=device),
            "rejected_tokens": torch.tensor([e.rejected_tokens for e in entries], dtype=torch.long, device=device),
        }

    def lookup(self, examples, *, dtype=torch.float32, device=None) -> dict:
        """Reference log-prob tensors ``[B]`` for a batch of examples.

        Examples are :class:`~dpo_fast.data.PreferenceExample` or dicts with ``prompt_ids``,
        ``chosen_ids`` and ``rejected_ids`` (TRL's tokenised dataset rows, untruncated).
        """
        return self.lookup_keys([_key_of(ex) for ex in examples], dtype=dtype, device=device)

    def lookup_ids(self, prompt_ids, chosen_ids, rejected_ids, *, dtype=torch.float32, device=None) -> dict:
        """Reference log-probs for lists of token-id sequences (one per example)."""
        if not (len(prompt_ids) == len(chosen_ids) == len(rejected_ids)):
            raise ValueError("prompt_ids, chosen_ids and rejected_ids must have one entry per example")
        keys = [example_key(_ids(p), _ids(c), _ids(r)) for p, c, r in zip(prompt_ids, chosen_ids, rejected_ids)]
        return self.lookup_keys(keys, dtype=dtype, device=device)


def _ids(x):
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


def _key_of(example) -> bytes:
    if isinstance(example, PreferenceExample):
        return example.key
    try:
        return example_key(*(_ids(example[c]) for c in ID_COLUMNS))
    except KeyError as e:
        raise ValueError(f"example is missing column {e.args[0]!r}; lookups need {list(ID_COLUMNS)}") from None


def check_writable(path: str):
    """Raise a clear error unless a cache can be written at ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"cache path {path} is a folder; give a file path such as "
                                f"{os.path.join(path, 'ref.sqlite')}")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write the cache {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise PermissionError(f"cannot write the cache {path}: no write permission")
    probe = os.path.join(folder, f".dpo_fast-write-probe-{os.getpid()}")
    try:
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"cannot write the cache {path}: {e.strerror}") from None


# ----------------------------------------------------------------------------- shards

def shard_path(path: str, rank: int, world: int) -> str:
    return f"{path}.shard-{rank:04d}-of-{world:04d}"


def shard_paths(path: str) -> list[str]:
    return sorted(p for p in glob.glob(glob.escape(path) + ".shard-*") if not p.endswith(SIDE_SUFFIXES))


def remove_cache_files(path: str):
    for suffix in ("",) + SIDE_SUFFIXES:
        if os.path.exists(path + suffix):
            os.remove(path + suffix)


def merge_into(dest: RefLogpsCache, sources: Sequence[str], *, remove: bool = True) -> int:
    """Copy every entry of the caches ``sources`` into ``dest`` (one transaction per source).

    Each source must have ``dest``'s fingerprint exactly; rows are checksum-verified on the way.
    Sources are deleted after their transaction commits when ``remove``. Returns rows added.
    """
    added = 0
    for src_path in sources:
        src = RefLogpsCache.open(src_path, check="quick")
        try:
            diffs = fingerprint_diff(dest.fingerprint, src.fingerprint)
            if diffs:
                raise _stale_error(src_path, diffs)
            added += dest.write(list(src.entries()))
        finally:
            src.close()
        if remove:
            remove_cache_files(src_path)
    return added


# ----------------------------------------------------------------------------- consumers

class RefLogpsCollator:
    """Collator that adds ``ref_chosen_logps``/``ref_rejected_logps`` ``[B]`` tensors to each batch.

    Wraps ``collator`` (default: :func:`dpo_fast.data.collate_preference` with the cache's own
    ``max_length`` and truncation mode, so the batch matches what was cached). Examples must be
    untruncated tokenised rows (``prompt_ids``/``chosen_ids``/``rejected_ids``).
    """

    def __init__(self, cache: RefLogpsCache, collator=None, *, pad_token_id: int = 0, dtype=torch.float32):
        self.cache = cache
        self.dtype = dtype
        if collator is None:
            fp = cache.fingerprint
            max_length, mode = fp.get("max_length"), fp.get("truncation_mode", "keep_start")

            def collator(examples):
                return collate_preference(examples, pad_token_id=pad_token_id, max_length=max_length,
                                          truncation_mode=mode)
        self.collator = collator

    def __call__(self, examples):
        batch = self.collator(examples)
        found = self.cache.lookup(examples, dtype=self.dtype)
        batch["ref_chosen_logps"] = found["ref_chosen_logps"]
        batch["ref_rejected_logps"] = found["ref_rejected_logps"]
        return batch


def dataset_with_ref_logps(dataset, cache, *, max_length=..., truncation_mode=None, ld_alpha=..., model=None,
                           tokenizer=None, temperature=1.0):
    """Add columns ``ref_chosen_logps``/``ref_rejected_logps`` to a tokenised dataset from the cache.

    This is what TRL's DPOTrainer reads when ``precompute_ref_log_probs=True``: a ``datasets.Dataset``
    with ``prompt_ids``/``chosen_ids``/``rejected_ids`` (TRL's tokenised train dataset) gets the two
    float columns; a list of dicts gets them per dict (new dicts). Before anything is read, the
    cache is checked against what the trainer will use (``max_length``, ``truncation_mode``,
    ``ld_alpha`` from ``DPOConfig``, ``temperature`` (1.0: TRL's DPOTrainer scores untempered
    logits; None skips the check), and ``model`` folder / ``tokenizer`` when given) so stale
    numbers cannot be used: :class:`StaleCacheError` names the differing fields.

    ``cache`` is a :class:`RefLogpsCache` or a path. To make TRL's DPOTrainer read the cache
    instead of running its reference model, override its precompute step, e.g.::

        class CachedRefDPOTrainer(DPOTrainer):
            def _precompute_ref_logps(self, dataset, name, batch_size):
                return dataset_with_ref_logps(dataset, CACHE, max_length=self.args.max_length,
                                              truncation_mode=self.args.truncation_mode,
                                              ld_alpha=self.args.ld_alpha)
    """
    if not isinstance(cache, RefLogpsCache):
        cache = RefLogpsCache.open(cache)
    cache.check(model=model, tokenizer=tokenizer, max_length=max_length, truncation_mode=truncation_mode,
                ld_alpha=ld_alpha, temperature=temperature)
    if isinstance(dataset, (list, tuple)):
        found = cache.lookup(dataset, dtype=torch.float64)
        return [dict(row, ref_chosen_logps=float(c), ref_rejected_logps=float(r))
                for row, c, r in zip(dataset, found["ref_chosen_logps"].tolist(), found["ref_rejected_logps"].tolist())]
    columns = getattr(dataset, "column_names", None)
    if columns is None or not all(c in columns for c in ID_COLUMNS):
        raise ValueError(f"dataset must be tokenised with columns {list(ID_COLUMNS)} (TRL's processed dataset); "
                         f"got columns {columns}")
    _check_all_present(dataset, cache)
    path = cache.path

    def add(batch):
        reader = RefLogpsCache.open(path, check="none") if os.getpid() != cache._pid else cache
        found = reader.lookup_ids(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"], dtype=torch.float64)
        return {"ref_chosen_logps": found["ref_chosen_logps"].tolist(),
                "ref_rejected_logps": found["ref_rejected_logps"].tolist()}

    return dataset.map(add, batched=True, batch_size=1000, desc="Reading reference log-probs from the dpo_fast cache")


def _check_all_present(dataset, cache: RefLogpsCache, chunk: int = 1000):
    """``KeyError`` with the true count of rows of a ``datasets.Dataset`` missing from the cache,
    counted over the whole dataset before any column is written."""
    missing, first, total = 0, None, len(dataset)
    for start in range(0, total, chunk):
        rows = dataset[start:start + chunk]
        keys = [example_key(_ids(p), _ids(c), _ids(r))
                for p, c, r in zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"])]
        found = cache.present(keys)
        for i, k in enumerate(keys):
            if k not in found:
                missing += 1
                first = start + i if first is None else first
    if missing:
        raise KeyError(f"{missing} of {total} examples are not in the cache {cache.path} (e.g. row {first}): run "
                       "dpo-fast precompute on this dataset, and check that it is tokenised the same way (same "
                       "tokenizer, chat template and columns)")


def format_info(cache: RefLogpsCache) -> str:
    """Human-readable summary for ``dpo-fast cache info``."""
    st = cache.stats()
    fp = cache.fingerprint
    lines = [f"cache        {cache.path}",
             f"size         {st['bytes'] / 1e6:.2f} MB",
             f"entries      {st['entries']} ({st['truncated']} truncated to max_length, "
             f"{st['completion_tokens']} completion tokens)",
             f"stored       sums in {fp['store_dtype']}; token ids for {st['with_inputs']}; "
             f"per-token log-probs for {st['with_token_logps']}",
             f"fingerprint  {fingerprint_hash(fp)[:16]}"]
    for name in FINGERPRINT_FIELDS:
        value = fp.get(name)
        if name == "model_weights":
            for i, (fname, digest) in enumerate(sorted((value or {}).items())):
                lines.append(f"  {'model_weights' if i == 0 else '':<16}{fname}: {digest[:16]}")
        else:
            shown = value[:16] if isinstance(value, str) and len(value) == 64 else value
            lines.append(f"  {name:<16}{shown}")
    for name, value in sorted(cache.info.items()):
        lines.append(f"  info.{name:<11}{value}")
    return "\n".join(lines)

