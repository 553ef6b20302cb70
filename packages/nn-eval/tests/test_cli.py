from __future__ import annotations

import json

import pytest

from nn_core.intervene.masks import mask_neurons
from nn_core.select.neuronset import NeuronSet
from nn_eval import evaluate_lm
from nn_eval.cli import main

TEXT = ("The quick brown fox jumps over the lazy dog.\n\n"
        "Pack my box with five dozen liquor jugs.\n\n"
        "Sphinx of black quartz, judge my vow; how vexingly quick daft zebras jump.\n")
TINY = ["--model", "tiny-llama", "--device", "cpu"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def read(path):
    return json.loads(path.read_text())


@pytest.mark.parametrize("argv", [["--help"], ["ppl", "--help"], ["mc", "--help"], ["gen", "--help"],
                                  ["tasks", "export", "--help"], ["cl-metrics", "--help"]])
def test_help(argv, capsys):
    assert main(argv) == 0
    assert "usage" in capsys.readouterr().out


def test_ppl_writes_results_and_manifest(tmp_path, corpus, tiny):
    out = tmp_path / "run"
    assert main(["ppl", *TINY, "--data", str(corpus), "--max-length", "16", "--batch-size", "2",
                 "--out", str(out)]) == 0
    res = read(out / "ppl.json")
    model, tok = tiny("llama")
    from nn_core.data import load_texts

    ref = evaluate_lm(model, tok, load_texts(str(corpus)), max_length=16, batch_size=2)
    assert res["nll"] == pytest.approx(ref["nll"], abs=1e-6) and res["n_tokens"] == ref["n_tokens"]
    manifest = read(out / "manifest.json")
    assert manifest["config"]["max_length"] == 16
    assert [o["path"] for o in manifest["outputs"]] == ["ppl.json"]


def test_ppl_with_neurons(tmp_path, corpus, tiny):
    model, tok = tiny("llama")
    ns = NeuronSet.for_model(model, {(0, "mlp_act"): [1, 5, 9], (1, "mlp_act"): [2, 3]})
    ns.save(tmp_path / "ns.json")
    out = tmp_path / "run"
    assert main(["ppl", *TINY, "--data", str(corpus), "--neurons", str(tmp_path / "ns.json"),
                 "--mode", "preserve", "--out", str(out)]) == 0
    res = read(out / "ppl.json")
    from nn_core.data import load_texts

    with mask_neurons(model, ns, "preserve"):
        ref = evaluate_lm(model, tok, load_texts(str(corpus)))
    assert res["mode"] == "preserve"
    assert res["intervened"]["nll"] == pytest.approx(ref["nll"], abs=1e-9)
    assert res["delta"]["nll"] == pytest.approx(res["intervened"]["nll"] - res["baseline"]["nll"])


def test_mc_and_gen(tmp_path):
    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"q{i}", "choices": ["yes", "no", "maybe"],
                                          "answer": i % 3}) for i in range(4)))
    assert main(["mc", *TINY, "--data", str(data), "--out", str(tmp_path / "mc")]) == 0
    res = read(tmp_path / "mc" / "mc.json")
    assert res["n"] == 4 and 0 <= res["acc"] <= 1 and len(res["items"]) == 4
    assert main(["gen", *TINY, "--data", "task:add", "--limit", "3", "--max-new-tokens", "3",
                 "--out", str(tmp_path / "gen")]) == 0
    res = read(tmp_path / "gen" / "gen.json")
    assert res["n"] == 3 and res["predictions"][0]["reference"].isdigit()


def test_tasks_list_and_export(tmp_path, capsys):
    assert main(["tasks", "list"]) == 0
    listed = capsys.readouterr().out
    assert "reverse_words" in listed and "spell_number" in listed
    out = tmp_path / "tasks"
    assert main(["tasks", "export", "--out", str(out), "--tasks", "add,copy", "--n-train", "4",
                 "--n-eval", "2"]) == 0
    assert len((out / "add" / "train.jsonl").read_text().splitlines()) == 4
    assert len((out / "copy" / "eval.jsonl").read_text().splitlines()) == 2
    assert (out / "manifest.json").is_file()


def test_cl_metrics(tmp_path, capsys):
    (tmp_path / "acc.csv").write_text("task,a,b,c\na,0.9,0.1,\nb,0.7,0.8,0.2\nc,0.6,0.85,0.95\n")
    (tmp_path / "base.json").write_text(json.dumps([0.5, 0.05, 0.1]))
    out = tmp_path / "cl"
    assert main(["cl-metrics", str(tmp_path / "acc.csv"), "--baseline", str(tmp_path / "base.json"),
                 "--plot", "--out", str(out)]) == 0
    res = read(out / "cl_metrics.json")
    assert res["AA"] == pytest.approx(0.8) and res["BWT"] == pytest.approx(-0.125)
    assert res["FWT"] == pytest.approx(0.075) and res["tasks"] == ["a", "b", "c"]
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "AA 0.8000" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("files", "argv", "match"),
    [
        ({"empty.txt": ""}, ["ppl", *TINY, "--data", "{d}/empty.txt"], ""),
        ({}, ["ppl", *TINY, "--mode", "lesion"], "--neurons"),
        ({"m.jsonl": '{"q": 1, "a": 2}\n'}, ["mc", *TINY, "--data", "{d}/m.jsonl"], "fields"),
        ({}, ["gen", *TINY, "--data", "task:nope"], "unknown task"),
        ({"i.jsonl": '{"foo": "x", "bar": "y"}\n'}, ["gen", *TINY, "--data", "{d}/i.jsonl"], "instruction format"),
        ({"acc.csv": "task,a,b\na,0.1,0.2\n"}, ["cl-metrics", "{d}/acc.csv"], "square"),
        ({"acc.csv": "task,a,b\na,0.1,\nb,,0.3\n"}, ["cl-metrics", "{d}/acc.csv"], "missing"),
        ({}, ["cl-metrics", "{d}/none.csv"], "does not exist"),
        ({}, ["tasks", "export"], "--out"),
        ({}, ["mc", *TINY], "mc needs --data"),
        ({}, ["gen", *TINY], "gen needs --data"),
        ({"acc.csv": "task,a,b\na,0.5,0.1\nb,0.4,0.3\n", "b.json": '{"a": 0.1, "b": "x"}'},
         ["cl-metrics", "{d}/acc.csv", "--baseline", "{d}/b.json"], "not a number"),
        ({"acc.csv": "task,a,b\na,0.5,0.1\nb,0.4,0.3\n", "b.json": '{"a": 0.1, "b": null}'},
         ["cl-metrics", "{d}/acc.csv", "--baseline", "{d}/b.json"], "baseline must be finite"),
        ({"acc.json": '{"matrix": [[0.5, null], 3]}'}, ["cl-metrics", "{d}/acc.json"], "list of rows"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, files, argv, match):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    argv = [a.replace("{d}", str(tmp_path)) for a in argv]
    assert main([*argv, *([] if argv[0] == "tasks" else ["--out", str(tmp_path / "o")])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nn-eval: error:") and "\n" not in err and match in err
    assert "Traceback" not in err


def test_required_data_can_come_from_config_or_environment(tmp_path, monkeypatch):
    data = tmp_path / "mc.jsonl"
    data.write_text(json.dumps({"question": "q", "choices": ["yes", "no"], "answer": 0}) + "\n")
    (tmp_path / "mc.yaml").write_text(f"data: {data}\nmax-length: 64\n")
    assert main(["mc", *TINY, "--config", str(tmp_path / "mc.yaml"), "--out", str(tmp_path / "mc")]) == 0
    assert read(tmp_path / "mc" / "mc.json")["n"] == 1
    monkeypatch.setenv("NN_EVAL_DATA", "task:add")
    assert main(["gen", *TINY, "--limit", "2", "--max-new-tokens", "2", "--out", str(tmp_path / "gen")]) == 0
    assert read(tmp_path / "gen" / "gen.json")["data"] == "task:add"


def test_ppl_default_max_length_is_clamped_to_the_position_table(tmp_path, capsys):
    (tmp_path / "long.txt").write_text(" ".join(f"word{i} with filler" for i in range(80)))
    out = tmp_path / "run"
    assert main(["ppl", "--model", "tiny-gpt2", "--device", "cpu", "--data", str(tmp_path / "long.txt"),
                 "--out", str(out)]) == 0  # default --max-length 1024 > 512 positions
    assert read(out / "ppl.json")["max_length"] == 512
    assert "used 512" in capsys.readouterr().err


def test_ppl_first_token_convention_is_recorded(tmp_path, corpus, tiny, capsys):
    from nn_core.data import load_texts

    model, tok = tiny("llama")
    texts = load_texts(str(corpus))
    results = {}
    for mode in ("skip", "prefix"):
        out = tmp_path / mode
        assert main(["ppl", *TINY, "--data", str(corpus), "--convention", mode, "--out", str(out)]) == 0
        results[mode] = read(out / "ppl.json")
        ref = evaluate_lm(model, tok, texts, first_token=mode)
        assert results[mode]["first_token"] == mode
        assert results[mode]["nll"] == pytest.approx(ref["nll"], abs=1e-6)
        assert results[mode]["bits_per_byte"] == pytest.approx(ref["bits_per_byte"], rel=1e-6)
        assert read(out / "manifest.json")["config"]["convention"] == mode
    printed = capsys.readouterr().out
    assert "first token: skipped" in printed and "lm-eval convention" in printed
    assert "bits_per_byte" in printed
    assert results["prefix"]["prefix_token_id"] == tok.eos_token_id
    assert results["prefix"]["n_tokens"] == results["skip"]["n_tokens"] + len(texts)
