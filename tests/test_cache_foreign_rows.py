"""A cache never returns a value computed under another fingerprint (issue 10, defects 4-6).

- A cache rebuilt at the path of a killed run (whose -wal/-shm were left behind) adopts none of
  its rows: creating a file removes stale -wal/-shm/-journal under a lock before moving it in.
- A good cache next to a foreign -wal (copied from another cache) never returns a foreign row:
  each row's checksum is salted with its cache's fingerprint (cache format 2).
- The trainers check every fingerprint field they know (temperature, the head's transform).
- ``dataset_with_ref_logps`` counts missing rows over the whole ``datasets.Dataset``.
"""
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from dpo_fast.cache import (CACHE_FORMAT, CacheCorruptError, CacheError, Entry, RefLogpsCache,  # noqa: E402
                            StaleCacheError, build_fingerprint, dataset_with_ref_logps)
from dpo_fast.data import example_key  # noqa: E402
from dpo_fast.precompute import precompute  # noqa: E402
from tests._models import build_tokenizer, make_rows, save_model_dir, write_jsonl  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


def _fingerprint(tag, **kw):
    return build_fingerprint(model_weights={"model.safetensors": tag * 64}, model_config=tag * 64, tokenizer=None,
                             max_length=kw.get("max_length"), truncation_mode="keep_start", dtype="float32",
                             temperature=kw.get("temperature", 1.0), logit_scale=1.0, softcap=None, ld_alpha=None)


def _entries(n, value, seed):
    g = torch.Generator().manual_seed(seed)
    keys = [bytes(torch.randint(0, 256, (16,), generator=g, dtype=torch.uint8).tolist()) for _ in range(n)]
    return [Entry(k, value + i, value - i, 3, 4, False) for i, k in enumerate(keys)]


_KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys, json
    sys.path.insert(0, {repo!r})
    from dpo_fast.cache import Entry, RefLogpsCache
    fp = json.loads({fp!r})
    cache = RefLogpsCache.create_or_open({path!r}, fp)
    for i in range({batches}):  # one transaction per batch, as precompute commits
        cache.write([Entry(bytes([i, j]) * 8, 100.0 + j, -100.0 - j, 3, 4, False) for j in range(20)])
    os.kill(os.getpid(), signal.SIGKILL)  # kill -9: no close, no checkpoint, the -wal stays
""")


def _killed_writer(path, fingerprint, batches=5):
    """Run a writer of ``fingerprint`` at ``path`` and kill -9 it after ``batches`` committed batches."""
    import json

    code = _KILLED_WRITER.format(repo=REPO, fp=json.dumps(fingerprint), path=str(path), batches=batches)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    wal = str(path) + "-wal"
    assert os.path.exists(wal) and os.path.getsize(wal) > 0, "the killed writer left no -wal: the test proves nothing"
    return [bytes([i, j]) * 8 for i in range(batches) for j in range(20)]


def test_rebuilt_cache_adopts_nothing_from_a_killed_run(tmp_path):
    path = tmp_path / "ref.sqlite"
    foreign_keys = _killed_writer(path, _fingerprint("a"))
    os.remove(path)  # what the library's own message advises; -wal and -shm stay behind
    assert os.path.exists(str(path) + "-wal")
    with RefLogpsCache.create_or_open(str(path), _fingerprint("b")) as cache:
        assert len(cache) == 0
        assert cache.present(foreign_keys) == set()
        cache.write(_entries(5, 1.0, seed=0))
    with RefLogpsCache.open(str(path), check="full") as cache:
        assert len(cache) == 5 and cache.fingerprint == _fingerprint("b")


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_issue_scenario_kill_precompute_of_a_rm_precompute_b_into_the_same_path(tmp_path, monkeypatch):
    """kill -9 `dpo-fast precompute` of model A once rows are committed, `rm` the cache (its -wal and
    -shm stay), precompute model B into the same path: nothing is "already cached", every value is B's."""
    import time

    monkeypatch.setenv("DPO_FAST_CACHE_DIR", str(tmp_path / "home-cache"))
    tokenizer = build_tokenizer()
    model_a = save_model_dir(str(tmp_path / "model_a"), seed=0, tokenizer=tokenizer)
    model_b = save_model_dir(str(tmp_path / "model_b"), seed=1, tokenizer=tokenizer)
    data = str(write_jsonl(tmp_path / "prefs.jsonl", make_rows(150, seed=7, max_prompt=20, max_completion=20)))
    cache = str(tmp_path / "ref.sqlite")
    cmd = [sys.executable, "-m", "dpo_fast", "precompute", "--model", model_a, "--dataset", data, "--cache", cache,
           "--batch-size", "2", "--device", "cpu", "--no-progress"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen, deadline = 0, time.time() + 120
    try:
        while proc.poll() is None and time.time() < deadline and seen < 20:
            if os.path.exists(cache):
                try:
                    with RefLogpsCache.open(cache, check="none") as reader:
                        seen = len(reader)
                except (CacheError, sqlite3.OperationalError):
                    seen = 0
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        out, errs = proc.communicate()
    assert proc.returncode == -signal.SIGKILL and seen >= 20, errs.decode()[-2000:]
    assert os.path.getsize(cache + "-wal") > 0  # the killed run's committed rows live in its -wal
    os.remove(cache)

    summary = precompute(model_b, data, cache, batch_size=8, device="cpu", progress=False)
    assert summary.already_cached == 0, f"{summary.already_cached} rows of model A were adopted"
    fresh = str(tmp_path / "fresh_b.sqlite")
    precompute(model_b, data, fresh, batch_size=8, device="cpu", progress=False)
    with RefLogpsCache.open(cache, check="full") as got, RefLogpsCache.open(fresh) as want:
        got_rows = {e.key: (e.chosen_logps, e.rejected_logps) for e in got.entries()}
        want_rows = {e.key: (e.chosen_logps, e.rejected_logps) for e in want.entries()}
    assert got_rows.keys() == want_rows.keys()
    worst = max(max(abs(got_rows[k][0] - want_rows[k][0]), abs(got_rows[k][1] - want_rows[k][1])) for k in want_rows)
    assert worst <= 1e-4, f"values differ from model B's by up to {worst:.3g} nats"


def test_good_cache_next_to_a_foreign_wal_never_returns_a_foreign_row(tmp_path):
    # A foreign cache (fingerprint a), killed mid-run: its -wal holds committed rows.
    foreign = tmp_path / "foreign" / "ref.sqlite"
    foreign.parent.mkdir()
    foreign_keys = _killed_writer(foreign, _fingerprint("a"))
    # A good cache (fingerprint b), closed cleanly.
    good = tmp_path / "good" / "ref.sqlite"
    good.parent.mkdir()
    mine = _entries(30, 5.0, seed=1)
    with RefLogpsCache.create_or_open(str(good), _fingerprint("b")) as cache:
        cache.write(mine)
    assert not os.path.exists(str(good) + "-wal")
    # The good cache is copied next to the foreign -wal.
    shutil.copy(str(foreign) + "-wal", str(good) + "-wal")
    expected = {e.key: (e.chosen_logps, e.rejected_logps) for e in mine}
    returned = {}
    try:
        with RefLogpsCache.open(str(good), check="quick") as cache:
            for e in cache.entries():
                returned[e.key] = (e.chosen_logps, e.rejected_logps)
            for key in foreign_keys:
                got = cache.get([key])[0]
                assert got is None or (got.key in expected and (got.chosen_logps, got.rejected_logps) == expected[key])
    except CacheCorruptError as e:  # refused: the replayed rows fail their fingerprint-salted checksum
        assert "another fingerprint" in str(e) or "corrupted" in str(e)
    assert all(key in expected and value == expected[key] for key, value in returned.items()), \
        "a row not written under this cache's fingerprint was returned"
    assert not set(returned) & set(foreign_keys)


def test_row_checksums_are_bound_to_the_fingerprint(tmp_path):
    """A row copied verbatim from a cache of another fingerprint fails its checksum."""
    a, b = tmp_path / "a.sqlite", tmp_path / "b.sqlite"
    with RefLogpsCache.create_or_open(str(a), _fingerprint("a")) as cache:
        cache.write(_entries(3, 1.0, seed=2))
    with RefLogpsCache.create_or_open(str(b), _fingerprint("b")) as cache:
        cache.write(_entries(1, 9.0, seed=3))
    con = sqlite3.connect(b)
    con.execute("ATTACH ? AS other", (str(a),))
    con.execute("INSERT INTO entries SELECT * FROM other.entries")
    con.commit()
    con.close()
    with RefLogpsCache.open(str(b), check="none") as cache:
        with pytest.raises(CacheCorruptError, match="another fingerprint"):
            list(cache.entries())


def test_old_format_is_refused_with_a_clear_message(tmp_path):
    path = tmp_path / "old.sqlite"
    with RefLogpsCache.create_or_open(str(path), _fingerprint("a")) as cache:
        cache.write(_entries(2, 1.0, seed=4))
    con = sqlite3.connect(path)
    con.execute("UPDATE meta SET value = ? WHERE name = 'format'", (str(CACHE_FORMAT - 1),))
    con.commit()
    con.close()
    with pytest.raises(CacheError, match=f"format {CACHE_FORMAT - 1}.*older dpo_fast.*re-run dpo-fast precompute"):
        RefLogpsCache.open(str(path))


def test_missing_rows_counted_over_the_whole_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    n, missing = 1500, 59
    rows = [{"prompt_ids": [1, i % 7, i // 7], "chosen_ids": [5, i], "rejected_ids": [6, i + 1]} for i in range(n)]
    g = torch.Generator().manual_seed(0)
    drop = set(torch.randperm(n, generator=g)[:missing].tolist())
    entries = [Entry(example_key(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]), -1.0, -2.0, 2, 2, False)
               for i, r in enumerate(rows) if i not in drop]
    path = str(tmp_path / "ref.sqlite")
    with RefLogpsCache.create_or_open(path, _fingerprint("a")) as cache:
        cache.write(entries)
    with pytest.raises(KeyError, match=f"{missing} of {n} examples are not in the cache"):
        dataset_with_ref_logps(datasets.Dataset.from_list(rows), path)
    # and with nothing missing every row gets its values
    full = dataset_with_ref_logps(datasets.Dataset.from_list([r for i, r in enumerate(rows) if i not in drop]), path)
    assert full["ref_chosen_logps"] == [-1.0] * (n - missing)


# ----------------------------------------------------------------------------- consumers

@pytest.fixture(scope="module")
def tempered(tmp_path_factory):
    """A tiny model folder and a cache of it made with temperature 0.7."""
    root = tmp_path_factory.mktemp("tempered")
    patch = pytest.MonkeyPatch()
    patch.setenv("DPO_FAST_CACHE_DIR", str(root / "home-cache"))
    tokenizer = build_tokenizer()
    model_dir = save_model_dir(str(root / "model"), tokenizer=tokenizer)
    rows = make_rows(8, seed=3)
    data = str(write_jsonl(root / "prefs.jsonl", rows))
    cache = str(root / "ref.sqlite")
    precompute(model_dir, data, cache, batch_size=4, device="cpu", temperature=0.7, progress=False)
    yield dict(model_dir=model_dir, rows=rows, cache=cache, tokenizer=tokenizer)
    patch.undo()


def test_standard_trainer_checks_temperature(tempered):
    from transformers import AutoModelForCausalLM

    from dpo_fast.trainer import StandardTrainer, TrainerConfig

    model = AutoModelForCausalLM.from_pretrained(tempered["model_dir"], local_files_only=True)
    with pytest.raises(StaleCacheError) as err:
        StandardTrainer(model, tempered["rows"], TrainerConfig(batch_size=4), tokenizer=tempered["tokenizer"],
                        ref_cache=tempered["cache"])
    assert err.value.fields == ("temperature",) and "temperature" in str(err.value)


def test_standard_trainer_checks_the_head_transform(tempered, tmp_path):
    """A cache whose recorded logit scale differs from the model's head is refused."""
    from transformers import AutoModelForCausalLM

    from dpo_fast.trainer import StandardTrainer, TrainerConfig

    model = AutoModelForCausalLM.from_pretrained(tempered["model_dir"], local_files_only=True)
    path = str(tmp_path / "scaled.sqlite")
    fp = dict(_fingerprint("c"), logit_scale=2.0)
    with RefLogpsCache.create_or_open(path, fp):
        pass
    with pytest.raises(StaleCacheError) as err:
        StandardTrainer(model, tempered["rows"], TrainerConfig(batch_size=4), tokenizer=tempered["tokenizer"],
                        ref_cache=path)
    assert "logit_scale" in err.value.fields


def test_fused_dpo_trainer_checks_temperature(tempered, tmp_path):
    trl_mod = pytest.importorskip("dpo_fast.integrations.trl", exc_type=ImportError)
    datasets = pytest.importorskip("datasets")
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig

    model = AutoModelForCausalLM.from_pretrained(tempered["model_dir"], local_files_only=True)
    args = DPOConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, bf16=False, max_length=None)
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in tempered["rows"]]
    with pytest.raises(StaleCacheError) as err:
        trl_mod.FusedDPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                processing_class=tempered["tokenizer"], ref_logps_cache=tempered["cache"])
    assert err.value.fields == ("temperature",)


def test_dataset_with_ref_logps_checks_temperature(tempered):
    with pytest.raises(StaleCacheError) as err:
        dataset_with_ref_logps([], tempered["cache"])  # TRL's DPOTrainer scores at temperature 1
    assert err.value.fields == ("temperature",)
    assert dataset_with_ref_logps([], tempered["cache"], temperature=0.7) == []
