"""dpo_fast.data: TRL-style tokenisation, collation, loaders and their errors."""
import json

import pytest
import torch

pytest.importorskip("transformers")

from tests._models import build_tokenizer, make_rows, write_jsonl  # noqa: E402
from dpo_fast.data import (DatasetError, PreferenceExample, collate_preference, example_key, load_rows,  # noqa: E402
                           tokenize_row, tokenize_rows)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_text_row_like_trl(tok):
    ex = tokenize_row({"prompt": "the cat", "chosen": " sees a dog", "rejected": " runs"}, tok)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert ex.prompt_ids == (bos, *_ids(tok, "the cat"))
    assert ex.chosen_ids == (*_ids(tok, "sees a dog"), eos)
    assert ex.rejected_ids == (*_ids(tok, "runs"), eos)
    # an EOS already there is not doubled
    again = tokenize_row({"prompt": "the cat", "chosen": " sees a dog</s>", "rejected": " runs"}, tok)
    assert again == ex


def test_pretokenised_rows_pass_through():
    ex = tokenize_row({"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": torch.tensor([6])})
    assert ex == PreferenceExample((1, 2, 3), (4, 5), (6,))


def test_collate_matches_trl_layout():
    examples = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
                {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]}]
    out = collate_preference(examples, pad_token_id=0)
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 0, 0], [1, 2, 3, 6, 0], [7, 8, 10, 11, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    assert out["completion_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 0]]
    start = collate_preference(examples, max_length=3)
    assert start["input_ids"].tolist() == [[1, 2, 3], [7, 8, 9], [1, 2, 3], [7, 8, 10]]
    assert start["completion_mask"].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 0], [0, 0, 1]]
    end = collate_preference(examples, max_length=3, truncation_mode="keep_end")
    assert end["input_ids"].tolist() == [[3, 4, 5], [7, 8, 9], [2, 3, 6], [8, 10, 11]]
    assert end["completion_mask"].tolist() == [[0, 1, 1], [0, 0, 1], [0, 0, 1], [0, 1, 1]]
    assert collate_preference(examples, pad_to_multiple_of=8)["input_ids"].shape == (4, 8)


def test_truncation_counted_and_prompt_too_long_dropped():
    rows = [{"prompt_ids": [1] * 3, "chosen_ids": [2] * 2, "rejected_ids": [3]},      # fits in 5
            {"prompt_ids": [1] * 3, "chosen_ids": [2] * 4, "rejected_ids": [3]},      # truncated
            {"prompt_ids": [1] * 6, "chosen_ids": [2], "rejected_ids": [3]}]          # prompt fills 5
    examples, stats = tokenize_rows(rows, max_length=5)
    assert len(examples) == 2 and stats.truncated == 1
    assert stats.dropped_prompt_too_long == 1 and stats.dropped_rows == [2]
    examples, stats = tokenize_rows(rows, max_length=5, truncation_mode="keep_end")
    assert len(examples) == 3 and stats.truncated == 2 and stats.dropped_prompt_too_long == 0


def test_key_depends_on_every_id_and_boundary():
    k = example_key([1, 2], [3], [4])
    assert k == example_key((1, 2), (3,), (4,)) and len(k) == 16
    assert k != example_key([1], [2, 3], [4])   # same concatenation, different boundary
    assert k != example_key([1, 2], [3], [5])


def test_missing_columns_named(tok):
    with pytest.raises(DatasetError, match="'rejected'"):
        tokenize_rows([{"prompt": "a", "chosen": " b"}], tok)
    with pytest.raises(DatasetError, match="row 1 is missing column"):
        tokenize_rows([{"prompt": "a", "chosen": " b", "rejected": " c"}, {"prompt": "a", "chosen": " b"}], tok)


def test_empty_dataset_and_empty_completion(tok):
    with pytest.raises(DatasetError, match="empty"):
        tokenize_rows([], tok)
    with pytest.raises(DatasetError, match="empty completion.*'chosen'"):
        tokenize_rows([{"prompt": "the", "chosen": "", "rejected": " cat"}], tok)
    with pytest.raises(DatasetError, match="empty completion.*'rejected_ids'"):
        tokenize_rows([{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": []}])


def test_tokenizer_without_eos(tok):
    no_eos = build_tokenizer(eos=False)
    with pytest.raises(ValueError, match="no EOS token"):
        tokenize_rows([{"prompt": "the", "chosen": " cat", "rejected": " dog"}], no_eos)
    with pytest.raises(ValueError, match="need a tokenizer"):
        tokenize_rows([{"prompt": "the", "chosen": " cat", "rejected": " dog"}], None)


def test_conversational_rows_use_chat_template(tok):
    chat = build_tokenizer()
    chat.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}assistant{% endif %}")
    row = {"prompt": [{"role": "user", "content": "the cat"}],
           "chosen": [{"role": "assistant", "content": "runs"}],
           "rejected": [{"role": "assistant", "content": "is sad"}]}
    ex = tokenize_row(row, chat)
    assert ex.chosen_ids[-len(_ids(chat, "runs")):] == tuple(_ids(chat, "runs"))
    assert ex.rejected_ids[-2:] == tuple(_ids(chat, "is sad"))


def test_loaders(tmp_path, tok):
    rows = make_rows(5, seed=3)
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    assert load_rows(str(jsonl)) == rows
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(DatasetError, match="bad.jsonl:2"):
        load_rows(str(bad))
    with pytest.raises(FileNotFoundError, match="dataset not found"):
        load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(DatasetError, match="cannot tell the format"):
        load_rows(str(tmp_path / "d.csv"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DatasetError, match="empty"):
        load_rows(str(empty))


def test_parquet_loader(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed")
    import pyarrow.parquet as pq

    rows = make_rows(4, seed=4)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert load_rows(str(tmp_path / "d.parquet")) == rows
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "answer": "b"}]), tmp_path / "bad.parquet")
    with pytest.raises(DatasetError, match="missing column.*'chosen'.*'rejected'"):
        load_rows(str(tmp_path / "bad.parquet"))


def test_datasets_disk_loader(tmp_path):
    datasets = pytest.importorskip("datasets", reason="datasets is not installed")
    rows = [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5], "extra": 1}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DatasetError, match="choose one"):
        load_rows(str(tmp_path / "dd"))
    got = load_rows(str(tmp_path / "dd"), split="train")
    assert got == [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]}]
    with pytest.raises(DatasetError, match="no split 'valid'"):
        load_rows(str(tmp_path / "dd"), split="valid")
