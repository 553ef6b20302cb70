from __future__ import annotations

import json

import pytest

from nn_ica.cli import main, parse_layers

BUILD = ["--method", "fnsft", "--samples", "24", "--max-tokens", "400", "--pca-components", "12", "--components", "4",
         "--max-length", "48"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("ica")
    assert main(["build", "tiny-llama", "pydoc", *BUILD, "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("cmd", ["build", "show", "match", "eval", "train"])
def test_help(cmd, capsys):
    assert main([cmd, "--help"]) == 0
    assert cmd in capsys.readouterr().out


def test_build_writes_templates_and_manifest(built, capsys):
    t = json.loads((built / "templates.json").read_text())
    assert t["format"] == "nn.ica-templates/1" and len(t["components"]) == 4
    assert t["metadata"]["datasets"] == ["pydoc"]
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["extra"]["ica"]["n_components"] == 4
    assert main(["show", str(built / "templates.json")]) == 0
    assert "4 components" in capsys.readouterr().out
    assert main(["match", str(built / "templates.json"), str(built / "templates.json"), "--json"]) == 0
    pairs = json.loads(capsys.readouterr().out)
    assert [p["iou"] for p in pairs] == [1.0] * 4


def test_eval_writes_report(built, tmp_path, capsys):
    out = tmp_path / "ev"
    code = main(["eval", "--templates", str(built / "templates.json"), "--components", "largest",
                 "--mode", "preserve", "--samples", "3", "--random", "2", "--max-length", "32",
                 "--out", str(out)])
    assert code == 0
    rep = json.loads((out / "eval.json").read_text())
    assert rep["mode"] == "preserve" and rep["components"] == [0] and len(rep["random"]["delta_ppl"]) == 2


def test_bad_input_exits_2_and_leaves_nothing(built, tmp_path, capsys):
    out = tmp_path / "few"
    code = main(["build", "tiny-llama", "pydoc", "--samples", "1", "--max-length", "8",
                 "--max-tokens", "400", "--pca-components", "12", "--components", "4", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "fewer than --components" in err and len(err.strip().splitlines()) == 1
    assert not (out / "templates.json").exists()
    tpl = str(built / "templates.json")
    assert main(["eval", "--templates", tpl, "--components", "7", "--random", "0"]) == 2
    assert "component id(s) 7 not in the templates" in capsys.readouterr().err
    assert main(["eval", "--templates", tpl, "--components", "0", "--model", "tiny-gpt2"]) == 2
    err = capsys.readouterr().err
    assert "'tiny-llama'" in err and "'tiny-gpt2'" in err
    assert main(["eval", "--templates", tpl, "--components", "0", "--site", "mlp_out"]) == 2
    assert "site mlp_act, not site mlp_out" in capsys.readouterr().err
    assert main(["show", str(tmp_path / "missing.json")]) == 2


def test_train_cli(built, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i}"}) for i in range(8)))
    out = tmp_path / "run"
    code = main(["train", "--templates", str(built / "templates.json"), "--components", "0,1",
                 "--mode", "lesion", "--data", str(data), "--max-steps", "2", "--batch-size", "4",
                 "--freeze-masked", "--out", str(out)])
    assert code == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extra"]["ica"]["components"] == [0, 1] and manifest["extra"]["ica"]["freeze_masked"]
    assert manifest["tool"] == "nn-ica train"


def test_parse_layers():
    assert parse_layers("all") is None
    assert parse_layers("0-2,5") == [0, 1, 2, 5]
    from nn_core.errors import NNError

    with pytest.raises(NNError, match="bad --layers"):
        parse_layers("3-1")


def test_train_site_mismatch_exits_2(built, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i}"}) for i in range(4)))
    code = main(["train", "--templates", str(built / "templates.json"), "--components", "0",
                 "--site", "mlp_out", "--data", str(data), "--max-steps", "1", "--out", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err
    assert "site mlp_act, not site mlp_out" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "mask.json").exists()


def test_eval_defaults_to_the_templates_data_and_warns_on_overlap(built, tmp_path, capsys):
    from nn_ica.cli import eval_datasets
    from nn_ica.templates import Templates

    t = json.loads((built / "templates.json").read_text())
    t["metadata"]["datasets"] = ["pydoc"]
    t["metadata"]["heldout_fraction"] = 0.0
    path = tmp_path / "t0.json"
    path.write_text(json.dumps(t))
    assert eval_datasets(Templates.load(path), None) == ["pydoc"]
    assert eval_datasets(Templates.load(path), ["a.txt"]) == ["a.txt"]
    out = tmp_path / "ev"
    assert main(["eval", "--templates", str(path), "--components", "0", "--samples", "2", "--random", "0",
                 "--max-length", "16", "--out", str(out)]) == 0
    assert "overlap" in capsys.readouterr().err
    assert json.loads((out / "eval.json").read_text())["data"]["datasets"] == ["pydoc"]
    t["metadata"]["datasets"] = ["<texts>"]
    path.write_text(json.dumps(t))
    assert main(["eval", "--templates", str(path), "--components", "0", "--random", "0"]) == 2
    assert "record no dataset to evaluate on: pass --data" in capsys.readouterr().err
    assert main(["eval", "--templates", str(path), "--components", "0", "--seed", "-1", "--data", "pydoc"]) == 2
    assert "--seed must be 0 or more" in capsys.readouterr().err


def test_eval_ranks_all_components_and_preserves_a_fraction(built, tmp_path, capsys):
    out = tmp_path / "rank"
    code = main(["eval", "--templates", str(built / "templates.json"), "--preserve-fraction", "0.05",
                 "--samples", "3", "--random", "2", "--max-length", "32", "--out", str(out)])
    assert code == 0  # --components defaults to all: the ranking table
    text = capsys.readouterr().out
    assert "ranked by lesion" in text and "key networks" in text and "preserve top-ranked" in text
    rep = json.loads((out / "eval.json").read_text())
    rows = rep["ranking"]["rows"]
    assert sorted(r["id"] for r in rows) == [0, 1, 2, 3]
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    assert rep["lesion_all"]["mode"] == "lesion" and rep["preserve"]["mode"] == "preserve"
    # fnsft components hold 2 % of 256 channels each: the prefix nearest 5 % is two or three
    assert rep["preserve"]["components"] == [r["id"] for r in rows][: len(rep["preserve"]["components"])]
    assert 0.02 <= rep["preserve"]["covered_fraction"] <= 0.08
    assert main(["eval", "--templates", str(built / "templates.json"), "--preserve-fraction", "1.5"]) == 2


def test_build_records_its_tool_and_refuses_bad_out_before_loading(built, tmp_path, capsys, monkeypatch):
    assert json.loads((built / "manifest.json").read_text())["tool"] == "nn-ica build"
    import nn_ica.cli as cli

    def no_load(*a, **k):  # the output location is checked before any model is loaded
        raise AssertionError("model loaded before --out was checked")

    monkeypatch.setattr(cli, "_load", no_load)
    f = tmp_path / "f.txt"
    f.write_text("mine")
    for out, text in ((f, "existing file"), (f / "sub", "is a file")):
        assert main(["build", "tiny-llama", "pydoc", *BUILD, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and text in err and "Traceback" not in err
    assert f.read_text() == "mine"


def test_eval_required_flags_from_config(built, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"templates: {built / 'templates.json'}\ncomponents: '0'\nsamples: 2\nrandom: 0\n"
                   "max-length: 32\n")
    out = tmp_path / "ev"
    assert main(["eval", "--config", str(cfg), "--out", str(out)]) == 0, capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text())["tool"] == "nn-ica eval"
    assert (out / "eval.json").is_file()
    cfg.write_text("components: '0'\n")
    capsys.readouterr()
    assert main(["eval", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs --templates" in err and "NN_ICA_TEMPLATES" in err
