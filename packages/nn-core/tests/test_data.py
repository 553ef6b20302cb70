from __future__ import annotations

import csv
import json

import pytest
import torch

from nn_core.data import (
    IGNORE_INDEX,
    batches,
    collate,
    load_texts,
    resolve_text_spec,
    sample,
    split_texts,
    token_blocks,
    tokenize_texts,
)
from nn_core.errors import NNError
from nn_core.tokenizer import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


# --- corpora ------------------------------------------------------------------------


def test_pydoc_corpus_is_large_sorted_and_limited():
    from pydoc_data.topics import topics

    docs = load_texts("pydoc")
    assert sum(len(d) for d in docs) > 400_000
    assert docs == [topics[k] for k in sorted(topics) if topics[k].strip()]
    assert load_texts("pydoc", limit=3) == docs[:3]


def test_txt_file_one_document_per_paragraph_block(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first para\nstill first\n\n\nsecond\n  \nthird\n", encoding="utf-8")
    assert load_texts(str(path)) == ["first para\nstill first", "second", "third"]


def test_jsonl_json_csv_round_trip_and_folder(tmp_path):
    rows = [{"id": i, "content": f"document number {i}"} for i in range(5)]
    (tmp_path / "d").mkdir()
    with open(tmp_path / "d" / "a.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "d" / "b.json").write_text(json.dumps(["plain one", "plain two"]))
    with open(tmp_path / "d" / "c.csv", "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["label", "text"])
        w.writeheader()
        w.writerow({"label": "x", "text": "csv, with a comma\nand a newline"})
    expected_jsonl = [r["content"] for r in rows]
    assert load_texts(str(tmp_path / "d" / "a.jsonl")) == expected_jsonl
    assert load_texts(str(tmp_path / "d" / "c.csv")) == ["csv, with a comma\nand a newline"]
    # A folder: files in sorted order, each with its own detected field.
    assert load_texts(str(tmp_path / "d")) == [
        *expected_jsonl, "plain one", "plain two", "csv, with a comma\nand a newline"]
    assert load_texts(str(tmp_path / "d"), limit=6) == [*expected_jsonl, "plain one"]


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [f"row {i} text" for i in range(7)]
    pq.write_table(pa.table({"n": list(range(7)), "body": texts}), tmp_path / "x.parquet")
    assert load_texts(str(tmp_path / "x.parquet")) == texts


def test_text_field_errors_list_fields(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a", "n": 1}) + "\n")
    with pytest.raises(NNError, match="question, answer, n"):
        load_texts(str(path))
    with pytest.raises(NNError, match="no field 'body'"):
        load_texts(str(path), text_field="body")
    assert load_texts(str(path), text_field="answer") == ["a"]


def test_empty_data_is_an_error(tmp_path):
    (tmp_path / "e.txt").write_text("\n\n   \n")
    with pytest.raises(NNError, match="no text"):
        load_texts(str(tmp_path / "e.txt"))
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(NNError, match="no text"):
        load_texts(str(tmp_path / "e.jsonl"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(NNError, match="holds no"):
        load_texts(str(tmp_path / "empty_dir"))


def test_resolve_text_spec(tmp_path):
    assert resolve_text_spec("pydoc").kind == "pydoc"
    assert resolve_text_spec(str(tmp_path)).kind == "path"
    hub = resolve_text_spec("someone/corpus:wiki@validation")
    assert (hub.kind, hub.name, hub.config, hub.split) == ("hub", "someone/corpus", "wiki",
                                                           "validation")
    assert resolve_text_spec("someone/corpus").split == "train"
    for missing in ("./nope.txt", "data/nope.jsonl", "/a/b/c", "nope.parquet"):
        with pytest.raises(NNError, match=f"file {missing} does not exist"):
            resolve_text_spec(missing)
    with pytest.raises(NNError, match="neither"):
        resolve_text_spec("not a name!")
    with pytest.raises(NNError):
        resolve_text_spec("")


# --- splitting and sampling ----------------------------------------------------------


def test_split_disjoint_deterministic_seed_sensitive():
    texts = [f"doc {i}" for i in range(50)] + ["doc 3", "doc 3"]  # duplicates stay together
    train, held = split_texts(texts, 0.2, seed=0)
    assert set(train).isdisjoint(held)
    assert sorted(train + held) == sorted(texts)
    assert len(set(held)) == 10
    assert split_texts(texts, 0.2, seed=0) == (train, held)
    assert split_texts(texts, 0.2, seed=1)[1] != held
    # Corpus order is kept on both sides.
    assert train == [t for t in texts if t in set(train)]
    with pytest.raises(NNError):
        split_texts(["only"], 0.5, seed=0)
    assert split_texts(texts, 0.0, seed=0) == (texts, [])


def test_sample_reproducible_without_replacement():
    items = list(range(100))
    a = sample(items, 20, seed=3)
    assert a == sample(items, 20, seed=3)
    assert a != sample(items, 20, seed=4)
    assert len(set(a)) == 20
    assert sorted(sample(items, 100, seed=0)) == items
    with pytest.raises(NNError, match="101 items but 100"):
        sample(items, 101, seed=0)


# --- tokens, blocks, batches ---------------------------------------------------------


def test_tokenize_texts_no_special_tokens(tok):
    ids = tokenize_texts(tok, ["héllo", "ab"])
    assert ids == [list("héllo".encode()), [97, 98]]
    assert tokenize_texts(tok, ["abcdef"], max_length=3) == [[97, 98, 99]]


def test_token_blocks_shapes_join_and_sampling(tok):
    texts = ["a" * 10, "b" * 10, "c" * 10]  # 30 bytes + 2 EOS = 32 tokens
    all_blocks = token_blocks(tok, texts, 8)
    assert all_blocks.shape == (4, 8) and all_blocks.dtype == torch.long
    stream = all_blocks.flatten().tolist()
    assert stream[10] == tok.eos_token_id and stream[21] == tok.eos_token_id
    assert stream.count(tok.eos_token_id) == 2
    assert token_blocks(tok, texts, 7).shape == (4, 7)  # 32 // 7, remainder dropped
    picked = token_blocks(tok, texts, 8, n_blocks=2, seed=5)
    assert picked.shape == (2, 8)
    rows = [r.tolist() for r in all_blocks]
    assert all(r.tolist() in rows for r in picked)
    assert picked[0].tolist() != picked[1].tolist()
    assert torch.equal(picked, token_blocks(tok, texts, 8, n_blocks=2, seed=5))
    seeds = {tuple(token_blocks(tok, texts, 8, n_blocks=2, seed=s).flatten().tolist())
             for s in range(10)}
    assert len(seeds) > 1
    assert torch.equal(token_blocks(tok, texts, 8, n_blocks=2), all_blocks[:2])
    with pytest.raises(NNError, match="fewer than one block"):
        token_blocks(tok, ["short"], 64)
    with pytest.raises(NNError, match="holds 4"):
        token_blocks(tok, texts, 8, n_blocks=5, seed=0)


def test_collate_pads_right_and_left():
    feats = [{"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 2, 3]}, {"input_ids": [4]}]
    right = collate(feats, pad_id=0)
    assert right["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    left = collate(feats, pad_id=9, padding_side="left")
    assert left["input_ids"].tolist() == [[1, 2, 3], [9, 9, 4]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["labels"].tolist() == [[-100, 2, 3], [-100, -100, 4]]
    assert all(t.dtype == torch.long for t in left.values())
    assert collate([[5, 6], [7]], pad_id=0)["labels"].tolist() == [[5, 6], [7, -100]]
    with pytest.raises(NNError, match="pad"):
        collate(feats, pad_id=None)


def test_batches_cover_everything_once():
    feats = [[i] * (i % 5 + 1) for i in range(23)]
    got = list(batches(feats, 4, pad_id=0))
    assert [b["input_ids"].shape[0] for b in got] == [4] * 5 + [3]
    assert len(list(batches(feats, 4, pad_id=0, drop_last=True))) == 5

    def firsts(bs):
        return [row[0] for b in bs for row in b["input_ids"].tolist()]

    assert firsts(got) == list(range(23))
    shuffled = firsts(batches(feats, 4, pad_id=0, shuffle=True, seed=1))
    assert sorted(shuffled) == list(range(23)) and shuffled != list(range(23))
    assert shuffled == firsts(batches(feats, 4, pad_id=0, shuffle=True, seed=1))
    assert shuffled != firsts(batches(feats, 4, pad_id=0, shuffle=True, seed=2))
    by_len = list(batches(feats, 4, pad_id=0, sort_by_length=True))
    lengths = [b["attention_mask"].sum(1).tolist() for b in by_len]
    flat = [x for b in lengths for x in b]
    assert flat == sorted(flat, reverse=True)
    grouped = list(batches(feats, 4, pad_id=0, sort_by_length=True, shuffle=True, seed=0))
    assert sorted(firsts(grouped)) == list(range(23))
    # Sorting keeps padding low: every batch is of near-equal lengths.
    assert all(max(b["attention_mask"].sum(1)) - min(b["attention_mask"].sum(1)) <= 1
               for b in grouped)
