"""The reference log-prob cache: values vs the oracle, kill -9 resume, staleness, corruption, torchrun."""
import io
import os
import random
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from dpo_fast.cache import (CacheCorruptError, Entry, RefLogpsCache, RefLogpsCollator,  # noqa: E402
                            StaleCacheError, dataset_with_ref_logps)
from dpo_fast.cli import main as cli_main  # noqa: E402
from dpo_fast.data import collate_preference, sequences, tokenize_rows  # noqa: E402
from dpo_fast.precompute import precompute  # noqa: E402
from dpo_fast.reference import reference_logits_logprobs  # noqa: E402
from tests._models import build_tokenizer, make_rows, tiny_model_dir, write_jsonl  # noqa: E402

MAX_LENGTH = 18


pytestmark = pytest.mark.usefixtures("one_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")  # the checkout under test, as CI runs it
    return env


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("DPO_FAST_CACHE_DIR", str(root / "home-cache"))  # the weight-hash memo stays in the test folder
    rows = make_rows(40, seed=11)
    rows += rows[:3]  # duplicates are stored once
    data = str(write_jsonl(root / "prefs.jsonl", rows))
    model = tiny_model_dir()
    cache = str(root / "ref.sqlite")
    summary = precompute(model, data, cache, batch_size=4, max_length=MAX_LENGTH, device="cpu", progress=False)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    examples, _ = tokenize_rows(rows, tok, max_length=MAX_LENGTH)
    yield dict(root=root, rows=rows, data=data, model=model, cache=cache, summary=summary, examples=examples,
               tok=tok)
    patch.undo()


def _oracle_sums(model, example, max_length, truncation_mode="keep_start"):
    """Per example: the model's own logits, log_softmax, gather, summed over the completion (fp32)."""
    out = []
    c_ids, c_mask, r_ids, r_mask = sequences(example, max_length, truncation_mode)
    for ids, mask in ((c_ids, c_mask), (r_ids, r_mask)):
        ids, mask = torch.tensor([ids]), torch.tensor([mask])
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        out.append((reference_logits_logprobs(logits[:, :-1], labels).double().sum().item(), int(mask[:, 1:].sum())))
    return out


def test_cache_equals_oracle(env):
    from transformers import AutoModelForCausalLM

    s = env["summary"]
    assert s.rows == 43 and s.unique == 40 and s.duplicates == 3 and s.computed == 40 and s.entries == 40
    assert s.truncated > 0, "the fixture must exercise max_length truncation"
    model = AutoModelForCausalLM.from_pretrained(env["model"], dtype=torch.float32).eval()
    cache = RefLogpsCache.open(env["cache"])
    unique = {ex.key: ex for ex in env["examples"]}
    assert len(cache) == len(unique)
    found = cache.lookup(list(unique.values()), dtype=torch.float64)
    worst = 0.0
    for i, ex in enumerate(unique.values()):
        (c, nc), (r, nr) = _oracle_sums(model, ex, MAX_LENGTH)
        assert found["chosen_tokens"][i] == nc and found["rejected_tokens"][i] == nr
        worst = max(worst, abs(found["ref_chosen_logps"][i].item() - c), abs(found["ref_rejected_logps"][i].item() - r))
        assert found["ref_chosen_logps"][i].item() == pytest.approx(c, rel=1e-5, abs=1e-4)
        assert found["ref_rejected_logps"][i].item() == pytest.approx(r, rel=1e-5, abs=1e-4)
    assert worst < 1e-4


def test_resume_computes_nothing_and_shuffled_dataset_hits(env, tmp_path):
    shuffled = list(env["rows"])
    random.Random(0).shuffle(shuffled)
    data = str(write_jsonl(tmp_path / "shuffled.jsonl", shuffled[:25]))
    s = precompute(env["model"], data, env["cache"], batch_size=4, max_length=MAX_LENGTH, device="cpu", progress=False)
    assert s.computed == 0 and s.already_cached == s.unique


def test_lookup_collator_and_trl_columns(env):
    cache = RefLogpsCache.open(env["cache"])
    examples = env["examples"][:6]
    dicts = [ex.as_dict() for ex in examples]
    a = cache.lookup(examples)
    b = cache.lookup(list(reversed(dicts)))
    assert torch.equal(a["ref_chosen_logps"], b["ref_chosen_logps"].flip(0))
    assert a["ref_chosen_logps"].dtype == torch.float32 and (a["ref_chosen_logps"] < 0).all()
    c = cache.lookup_ids([d["prompt_ids"] for d in dicts], [d["chosen_ids"] for d in dicts],
                         [d["rejected_ids"] for d in dicts])
    assert torch.equal(a["ref_rejected_logps"], c["ref_rejected_logps"])
    with pytest.raises(KeyError, match="1 of 2 examples are not in the cache"):
        cache.lookup([dicts[0], {"prompt_ids": [1], "chosen_ids": [5], "rejected_ids": [6]}])

    batch = RefLogpsCollator(cache)(dicts)
    plain = collate_preference(dicts, max_length=MAX_LENGTH)
    assert torch.equal(batch["input_ids"], plain["input_ids"])
    assert torch.equal(batch["ref_chosen_logps"], a["ref_chosen_logps"])

    rows = dataset_with_ref_logps(dicts, cache, max_length=MAX_LENGTH, truncation_mode="keep_start", ld_alpha=None,
                                  model=env["model"], tokenizer=env["tok"])
    assert [r["ref_rejected_logps"] for r in rows] == pytest.approx(a["ref_rejected_logps"].tolist())
    with pytest.raises(StaleCacheError, match="max_length") as err:
        dataset_with_ref_logps(dicts, cache, max_length=1024, truncation_mode="keep_start", ld_alpha=None)
    assert err.value.fields == ("max_length",)
    with pytest.raises(StaleCacheError, match="ld_alpha"):
        dataset_with_ref_logps(dicts, cache, max_length=MAX_LENGTH, ld_alpha=0.5)
    datasets = pytest.importorskip("datasets", reason="datasets is not installed")
    ds = dataset_with_ref_logps(datasets.Dataset.from_list(dicts), env["cache"], max_length=MAX_LENGTH)
    assert ds["ref_chosen_logps"] == pytest.approx(a["ref_chosen_logps"].tolist())


def test_ld_alpha_and_token_logps(env, tmp_path):
    data = str(write_jsonl(tmp_path / "few.jsonl", env["rows"][:10]))
    cache_path = str(tmp_path / "ld.sqlite")
    precompute(env["model"], data, cache_path, batch_size=4, max_length=MAX_LENGTH, device="cpu", progress=False,
               ld_alpha=0.5, token_logps=True)
    ld = RefLogpsCache.open(cache_path)
    plain = RefLogpsCache.open(env["cache"])
    assert ld.fingerprint["ld_alpha"] == 0.5 and ld.fingerprint["token_logps"] is True
    for entry in ld.entries():
        chosen, rejected = entry.token_values()
        assert len(chosen) == entry.chosen_tokens and len(rejected) == entry.rejected_tokens
        ref = plain.get([entry.key])[0]
        assert chosen.double().sum().item() == pytest.approx(ref.chosen_logps, abs=1e-5)
        shared = min(entry.chosen_tokens, entry.rejected_tokens)
        for values, got in ((chosen, entry.chosen_logps), (rejected, entry.rejected_logps)):
            expected = values[:shared].double().sum() + 0.5 * values[shared:].double().sum()
            assert got == pytest.approx(expected.item(), abs=1e-5)


# ----------------------------------------------------------------------------- staleness

def _copy_model(env, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(env["model"], dst)
    return str(dst)


def _expect_stale(env, field, **kwargs):
    args = dict(batch_size=4, max_length=MAX_LENGTH, device="cpu", progress=False)
    model = kwargs.pop("model", env["model"])
    args.update(kwargs)
    with pytest.raises(StaleCacheError) as err:
        precompute(model, env["data"], env["cache"], **args)
    assert err.value.fields == (field,), str(err.value)
    assert field in str(err.value)
    return str(err.value)


def test_stale_weight(env, tmp_path):
    from safetensors.torch import load_file, save_file

    same = _copy_model(env, tmp_path, "same")
    s = precompute(same, env["data"], env["cache"], batch_size=4, max_length=MAX_LENGTH, device="cpu", progress=False)
    assert s.computed == 0, "an identical copy of the model folder is the same reference model"
    changed = _copy_model(env, tmp_path, "changed")
    path = os.path.join(changed, "model.safetensors")
    state = load_file(path)
    name = sorted(state)[3]
    state[name].view(-1)[0] += 1e-3  # one weight
    save_file(state, path, metadata={"format": "pt"})
    message = _expect_stale(env, "model_weights", model=changed)
    assert "model.safetensors" in message


def test_weight_hash_memo_sees_same_size_rewrites(env, tmp_path, monkeypatch):
    import hashlib

    import dpo_fast.cache as cache_mod

    monkeypatch.setattr(cache_mod, "_RACY_NS", -10**12)  # trust fresh timestamps, to exercise the memo here
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"a" * 4096)
    first = cache_mod.sha256_file(str(path))
    real = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda *a: pytest.fail("memo miss on an unchanged file"))
    assert cache_mod.sha256_file(str(path)) == first
    monkeypatch.setattr(hashlib, "file_digest", real)
    stamp = os.stat(path)
    time.sleep(0.01)
    path.write_bytes(b"b" * 4096)  # same size, same inode, mtime put back: only the ctime tells
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert cache_mod.sha256_file(str(path)) == hashlib.sha256(b"b" * 4096).hexdigest() != first


def test_stale_tokenizer_max_length_dtype(env, tmp_path):
    other = _copy_model(env, tmp_path, "tok")
    build_tokenizer(extra_words=("zebra",)).save_pretrained(other)
    _expect_stale(env, "tokenizer", model=other)
    _expect_stale(env, "max_length", max_length=32)
    _expect_stale(env, "dtype", dtype="float64")
    _expect_stale(env, "truncation_mode", truncation_mode="keep_end")
    cache = RefLogpsCache.open(env["cache"])
    with pytest.raises(StaleCacheError, match="dtype") as err:
        cache.check(model=env["model"], dtype="float64")
    assert err.value.fields == ("dtype",)
    cache.check(model=env["model"], max_length=MAX_LENGTH, truncation_mode="keep_start", dtype="float32")


# ----------------------------------------------------------------------------- corruption

def _corrupt_copy(env, tmp_path, name):
    dst = str(tmp_path / name)
    shutil.copy(env["cache"], dst)
    assert not os.path.exists(env["cache"] + "-wal") or os.path.getsize(env["cache"] + "-wal") == 0
    return dst


def test_truncated_file(env, tmp_path):
    path = _corrupt_copy(env, tmp_path, "trunc.sqlite")
    size = os.path.getsize(path)
    for new_size, match in ((size // 2 // 4096 * 4096, "truncated"), (size - 100, "truncated"), (0, "empty"),
                            (50, "not a dpo_fast cache")):
        with open(path, "r+b") as f:
            f.truncate(new_size)
        with pytest.raises(CacheCorruptError, match=match):
            RefLogpsCache.open(path)
        shutil.copy(env["cache"], path)
    with open(path, "r+b") as f:
        f.truncate(size // 2 // 4096 * 4096)
    err = io.StringIO()
    with redirect_stderr(err):
        assert cli_main(["cache", "info", path]) == 2
    assert "truncated" in err.getvalue() and "Traceback" not in err.getvalue()


def test_flipped_bytes(env, tmp_path):
    reader = RefLogpsCache.open(env["cache"])
    entry = next(reader.entries())
    path = _corrupt_copy(env, tmp_path, "flip.sqlite")
    blob = bytearray(open(path, "rb").read())
    where = blob.find(struct.pack(">d", entry.chosen_logps))  # SQLite stores REAL big-endian
    assert where > 0
    blob[where + 6] ^= 0x10  # a plausible-looking but wrong number
    open(path, "wb").write(blob)
    damaged = RefLogpsCache.open(path)  # the page structure is intact ...
    with pytest.raises(CacheCorruptError, match="checksum"):  # ... but the number is never returned
        damaged.get([entry.key])
    with pytest.raises(CacheCorruptError, match="checksum"):
        list(damaged.entries())
    # garbage over a b-tree page header: caught by the integrity check on open
    blob = bytearray(open(env["cache"], "rb").read())
    page = int.from_bytes(blob[16:18], "big")
    blob[page:page + 12] = b"\xff" * 12
    open(path, "wb").write(blob)
    with pytest.raises(CacheCorruptError, match="corrupt"):
        RefLogpsCache.open(path)
    # a damaged file header
    blob = bytearray(open(env["cache"], "rb").read())
    blob[0:6] = b"garbag"
    open(path, "wb").write(blob)
    with pytest.raises(CacheCorruptError, match="not a dpo_fast cache"):
        RefLogpsCache.open(path)


def test_readers_see_committed_batches_while_a_writer_writes(env, tmp_path):
    path = str(tmp_path / "rw.sqlite")
    fingerprint = RefLogpsCache.open(env["cache"]).fingerprint
    writer = RefLogpsCache.create_or_open(path, fingerprint)
    rows = [Entry(bytes([i]) * 16, -1.0 * i, -2.0, 3, 4, False) for i in range(1, 7)]
    writer.write(rows[:3])
    reader = RefLogpsCache.open(path)
    writer.conn.execute("BEGIN IMMEDIATE")  # a batch in flight
    writer.conn.execute("INSERT INTO entries (key, chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, "
                        "truncated, crc) VALUES (?, 0.0, 0.0, 1, 1, 0, 0)", (b"\x09" * 16,))
    t = time.perf_counter()
    assert len(reader) == 3 and reader.get([rows[0].key])[0].chosen_logps == -1.0
    assert time.perf_counter() - t < 5, "readers must not wait for the writer"
    writer.conn.execute("ROLLBACK")
    writer.write(rows[3:])
    assert len(reader) == 6
    assert writer.write(rows) == 0, "existing keys are kept, never duplicated"


def test_verify_cli(env, tmp_path):
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli_main(["cache", "verify", env["cache"], "--sample", "6", "--device", "cpu"]) == 0
    assert "OK: recomputed 6 entries" in out.getvalue()
    with redirect_stdout(out):
        assert cli_main(["cache", "info", env["cache"]]) == 0
    assert "entries      40" in out.getvalue() and "model_weights" in out.getvalue()
    # a wrong number with a valid checksum (e.g. computed by a buggy run): verify must fail
    path = _corrupt_copy(env, tmp_path, "wrong.sqlite")
    cache = RefLogpsCache.create_or_open(path, RefLogpsCache.open(path).fingerprint)
    victims = list(cache.entries())
    cache.conn.execute("DELETE FROM entries")
    for e in victims:
        e.chosen_logps += 0.5
    cache.write(victims)
    cache.close()
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli_main(["cache", "verify", path, "--sample", "3", "--device", "cpu"]) == 1
    assert "MISMATCH" in out.getvalue() and "0.5" in out.getvalue()


def test_clear_errors(env, tmp_path):
    err = io.StringIO()
    cases = [
        (["--model", str(tmp_path / "missing"), "--dataset", env["data"]], "model folder not found"),
        (["--model", env["model"], "--dataset", str(write_jsonl(tmp_path / "cols.jsonl", [{"prompt": "a", "chosen": " b"}]))],
         "missing column(s) 'rejected'"),
        (["--model", env["model"], "--dataset", str(write_jsonl(tmp_path / "empty.jsonl", []))], "is empty"),
    ]
    for extra, message in cases:
        err.seek(0), err.truncate()
        with redirect_stderr(err):
            assert cli_main(["precompute", "--cache", str(tmp_path / "x.sqlite"), "--no-progress", *extra]) == 2
        assert message in err.getvalue(), err.getvalue()
    for cache, message in ((str(tmp_path / "no" / "dir" / "c.sqlite"), "does not exist"), (str(tmp_path), "is a folder")):
        with pytest.raises(OSError, match=message):
            precompute(env["model"], env["data"], cache, progress=False)
    with pytest.raises(FileNotFoundError, match="cache not found"):
        RefLogpsCache.open(str(tmp_path / "none.sqlite"))


# ----------------------------------------------------------------------------- processes

def _cli(*args):
    return [sys.executable, "-m", "dpo_fast", "precompute", *args]


def _all_entries(path):
    cache = RefLogpsCache.open(path, check="full")
    try:
        return {e.key: (e.chosen_logps, e.rejected_logps, e.chosen_tokens, e.rejected_tokens) for e in cache.entries()}
    finally:
        cache.close()


def test_kill_9_and_resume(env, tmp_path):
    rows = make_rows(400, seed=5, max_prompt=20, max_completion=20)
    data = str(write_jsonl(tmp_path / "big.jsonl", rows))
    cache = str(tmp_path / "killed.sqlite")
    args = ["--model", env["model"], "--dataset", data, "--cache", cache, "--batch-size", "2", "--device", "cpu",
            "--no-progress"]
    proc = subprocess.Popen(_cli(*args), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen, deadline = 0, time.time() + 120
    try:
        while proc.poll() is None and time.time() < deadline:
            if os.path.exists(cache):
                try:
                    seen = len(RefLogpsCache.open(cache, check="none"))  # a reader during the writes
                except (CacheCorruptError, sqlite3.OperationalError):
                    seen = 0
                if seen >= 20:
                    break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        out, errs = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, (out.decode(), errs.decode()[-2000:])
    after_kill = len(RefLogpsCache.open(cache, check="full"))
    assert 20 <= after_kill < 400, f"killed mid-run: {after_kill} of 400 entries committed"

    resumed = subprocess.run(_cli(*args), env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{after_kill} already cached, {400 - after_kill} computed" in resumed.stdout, resumed.stdout
    got = _all_entries(cache)
    assert len(got) == 400
    con = sqlite3.connect(cache)
    assert con.execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM entries").fetchone() == (400, 400)
    con.close()

    fresh = str(tmp_path / "uninterrupted.sqlite")
    assert torch.get_num_threads() == 1  # as in the subprocesses (OMP_NUM_THREADS=1): same arithmetic, same bits
    precompute(env["model"], data, fresh, batch_size=2, device="cpu", progress=False)
    want = _all_entries(fresh)
    assert got.keys() == want.keys()
    worst = max(max(abs(got[k][0] - want[k][0]), abs(got[k][1] - want[k][1])) for k in want)
    assert all(got[k][2:] == want[k][2:] for k in want)
    assert worst == 0.0, f"resumed cache differs from an uninterrupted run by {worst}"
    print(f"\nkill -9 after {after_kill}/400 committed; resume computed {400 - after_kill}; "
          f"max |resumed - uninterrupted| = {worst:.3g}")


def test_torchrun_two_gloo_ranks_equal_one_process(env, tmp_path):
    pytest.importorskip("torch.distributed.run")
    cache = str(tmp_path / "ranks.sqlite")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dpo_fast",
           "precompute", "--model", env["model"], "--dataset", env["data"], "--cache", cache, "--batch-size", "4",
           "--max-length", str(MAX_LENGTH), "--device", "cpu", "--no-progress"]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 ranks" in result.stdout and "merged 1 shard" in result.stdout, result.stdout
    assert not [p for p in os.listdir(tmp_path) if ".shard-" in p], "shards are merged and removed"
    two, one = _all_entries(cache), _all_entries(env["cache"])
    assert two.keys() == one.keys() and len(two) == 40
    worst = max(max(abs(two[k][0] - one[k][0]), abs(two[k][1] - one[k][1])) for k in one)
    assert worst <= 1e-6, worst
    assert RefLogpsCache.open(cache).fingerprint == RefLogpsCache.open(env["cache"]).fingerprint
