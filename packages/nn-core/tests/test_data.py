from __future__ import annotations

import csv
import json
import sys
import types

import pytest
import torch

from nn_core.data import (
    IGNORE_INDEX,
    Example,
    batches,
    collate,
    detect_format,
    load_instructions,
    load_texts,
    parse_records,
    render,
    resolve_text_spec,
    sample,
    split_texts,
    token_blocks,
    tokenize_examples,
    tokenize_texts,
)
from nn_core.errors import MissingExtraError, NNError
from nn_core.model.tokenizer import byte_tokenizer


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


# --- hub datasets (a stand-in module: tests never touch the network) ------------------


def test_hub_dataset_through_datasets(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"id": 1, "text": "hub doc one"}, {"id": 2, "text": "hub doc two"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_texts("someone/corpus:en@test", limit=2) == ["hub doc one", "hub doc two"]
    assert calls == [("someone/corpus", "en", "test[:2]")]


def test_hub_offline_is_one_line_error(monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub\nmore detail")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(NNError) as info:
        load_texts("someone/corpus")
    msg = str(info.value)
    assert "\n" not in msg and "someone/corpus" in msg and "local file" in msg


def test_hub_without_datasets_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(MissingExtraError, match=r'nn-core\[datasets\]'):
        load_texts("someone/corpus")


# --- instruction formats ---------------------------------------------------------------

ALPACA = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
          {"instruction": "Say hi.", "input": "", "output": "hi"}]
DOLLY = [{"instruction": "Summarise.", "context": "A long text.", "response": "Short.",
          "category": "summarization"}]
SIMPLE = [{"prompt": "Capital of France?", "response": "Paris"}]
SHAREGPT = [{"conversations": [
    {"from": "system", "value": "Be terse."},
    {"from": "human", "value": "hi"},
    {"from": "gpt", "value": "hello"},
    {"from": "human", "value": "2+2?"},
    {"from": "gpt", "value": "4"},
    {"from": "human", "value": "trailing question with no answer"},
]}]
OPENAI = [{"messages": [{"role": "user", "content": "ping"},
                        {"role": "assistant", "content": "pong"}]}]


def test_detect_format_each_and_error_lists_fields():
    assert detect_format(ALPACA) == "alpaca"
    assert detect_format(DOLLY) == "dolly"
    assert detect_format(SIMPLE) == "simple"
    assert detect_format(SHAREGPT) == "sharegpt"
    assert detect_format(OPENAI) == "sharegpt"
    with pytest.raises(NNError, match="question, answer"):
        detect_format([{"question": "q", "answer": "a"}])


def test_parse_each_format():
    assert parse_records(ALPACA) == [Example("Add the numbers.\n\n2 and 3", "5"),
                                     Example("Say hi.", "hi")]
    assert parse_records(DOLLY) == [Example("Summarise.\n\nA long text.", "Short.")]
    assert parse_records(SIMPLE) == [Example("Capital of France?", "Paris")]
    # Multi-turn: the last assistant turn is the response; earlier turns are history.
    assert parse_records(SHAREGPT) == [Example("2+2?", "4", "Be terse.",
                                               (("user", "hi"), ("assistant", "hello")))]
    assert parse_records(OPENAI) == [Example("ping", "pong")]
    # Records without a response are skipped; a forced format reads other records.
    assert parse_records([{"prompt": "p", "response": ""}]) == []
    with pytest.raises(NNError, match="unknown instruction format"):
        parse_records(SIMPLE, "vicuna")
    with dataclasses_frozen():
        Example("a", "b").prompt = "c"


def dataclasses_frozen():
    import dataclasses

    return pytest.raises(dataclasses.FrozenInstanceError)


def test_load_instructions_from_files(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ALPACA))
    with open(tmp_path / "d.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in DOLLY * 3)
    with open(tmp_path / "s.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["prompt", "response"])
        w.writeheader()
        w.writerows(SIMPLE)
    assert load_instructions(str(tmp_path / "a.json")) == parse_records(ALPACA)
    assert len(load_instructions(str(tmp_path / "d.jsonl"))) == 3
    assert load_instructions(str(tmp_path / "d.jsonl"), limit=2) == parse_records(DOLLY) * 2
    assert load_instructions(str(tmp_path / "s.csv"), format="simple") == parse_records(SIMPLE)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"q": 1, "a": 2}) + "\n")
    with pytest.raises(NNError, match="fields q, a"):
        load_instructions(str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(NNError, match="no instruction examples"):
        load_instructions(str(tmp_path / "empty.jsonl"))
    with pytest.raises(NNError, match="not instruction data"):
        load_instructions("pydoc")
    with pytest.raises(NNError, match="does not exist"):
        load_instructions(str(tmp_path / "missing.jsonl"))


def test_load_instructions_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist(ALPACA), tmp_path / "a.parquet")
    assert load_instructions(str(tmp_path / "a.parquet")) == parse_records(ALPACA)


# --- rendering and prompt masking ------------------------------------------------------


def test_render_chat_template_and_fallback(tok):
    ex = Example("2+2?", "4", "Be terse.", (("user", "hi"), ("assistant", "hello")))
    prompt, full = render(tok, ex)
    assert prompt == ("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                      "<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert full == prompt + "4<|im_end|>\n"
    plain = byte_tokenizer()
    plain.chat_template = None
    prompt, full = render(plain, Example("Say hi.", "hi"))
    assert prompt == "### Instruction:\nSay hi.\n\n### Response:\n"
    assert full == prompt + "hi"


def _masked_split(tokenizer, feature):
    ids, labels = feature["input_ids"], feature["labels"]
    n_prompt = sum(1 for x in labels if x == -100)
    assert labels[:n_prompt] == [-100] * n_prompt  # the mask is one leading span
    assert labels[n_prompt:] == ids[n_prompt:]
    return (tokenizer.decode(ids[:n_prompt], skip_special_tokens=False),
            tokenizer.decode(ids[n_prompt:], skip_special_tokens=False))


def test_prompt_tokens_masked_response_tokens_not(tok):
    examples = parse_records(ALPACA) + parse_records(SHAREGPT)
    feats = tokenize_examples(tok, examples, max_length=None)
    assert len(feats) == 3 and feats.dropped == 0
    for ex, feat in zip(examples, feats, strict=True):
        prompt, response = _masked_split(tok, feat)
        assert prompt == render(tok, ex)[0]
        assert response == ex.response + "<|im_end|>\n<|endoftext|>"
        assert feat["input_ids"][-1] == tok.eos_token_id


def test_masking_when_prompt_ids_are_not_a_prefix():
    # A tokenizer with one merge across the prompt/response boundary ("\n" + "x"), so the
    # prompt's ids are not a prefix of the full text's ids.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = byte_tokenizer()
    vocab = dict(base.get_vocab())
    vocab["Ċx"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("Ċ", "x")]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(["<|endoftext|>", "<|pad|>"])
    merging = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>",
                                      pad_token="<|pad|>")
    ex = Example("Say x.", "xyz")
    prompt_text, full_text = render(merging, ex)
    full_ids = merging(full_text, add_special_tokens=False)["input_ids"]
    prompt_ids = merging(prompt_text, add_special_tokens=False)["input_ids"]
    assert full_ids[: len(prompt_ids)] != prompt_ids  # the case under test
    (feat,) = tokenize_examples(merging, [ex], max_length=None)
    prompt, response = _masked_split(merging, feat)
    assert prompt == prompt_text and response == "xyz<|endoftext|>"


def test_truncation_keeps_prompt_masked_and_drops_empty_responses(tok):
    short = Example("p", "a long response " * 5)
    long_prompt = Example("q" * 200, "r")
    prompt_len = len(tok(render(tok, short)[0], add_special_tokens=False)["input_ids"])
    feats = tokenize_examples(tok, [short, long_prompt], max_length=prompt_len + 4)
    assert feats.dropped == 1 and len(feats) == 1
    (feat,) = feats
    assert len(feat["input_ids"]) == prompt_len + 4
    assert feat["labels"][:prompt_len] == [-100] * prompt_len
    assert tok.decode(feat["labels"][prompt_len:]) == "a lo"
    with pytest.raises(NNError, match="max-length"):
        tokenize_examples(tok, [long_prompt], max_length=50)


def test_instruction_batches_pad_labels_with_ignore_index(tok):
    feats = tokenize_examples(tok, parse_records(ALPACA), max_length=None)
    (batch,) = batches(feats, 2, pad_id=tok.pad_token_id, padding_side="left")
    lengths = [len(f["input_ids"]) for f in feats]
    short = lengths.index(min(lengths))
    pad = max(lengths) - min(lengths)
    assert batch["attention_mask"][short, :pad].sum() == 0
    assert (batch["labels"][short, :pad] == -100).all()
    assert batch["input_ids"][short, pad:].tolist() == feats[short]["input_ids"]


def _bos_tokenizer():
    """The byte tokenizer plus a post-processor that prepends a BOS (as Llama's does)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    base = byte_tokenizer()
    core = base.backend_tokenizer
    core.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", base.convert_tokens_to_ids("<|im_start|>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>",
                                  eos_token="<|endoftext|>", pad_token="<|pad|>")
    return tok


def test_bos_kept_once_for_tokenizers_that_add_it():
    tok = _bos_tokenizer()
    bos = tok.bos_token_id
    assert tok("a")["input_ids"] == [bos, 97]  # the premise: this tokenizer adds a BOS
    assert tokenize_texts(tok, ["ab", "c"]) == [[bos, 97, 98], [bos, 99]]
    stream = token_blocks(tok, ["ab", "c"], 6).flatten().tolist()
    assert stream == [bos, 97, 98, tok.eos_token_id, bos, 99]
    (feat,) = tokenize_examples(tok, [Example("hi", "yo")], max_length=None)
    assert feat["input_ids"].count(bos) == 1 and feat["input_ids"][0] == bos
    prompt, response = _masked_split(tok, feat)
    assert prompt.startswith("<|im_start|>### Instruction:") and response == "yo<|endoftext|>"
