"""The example scripts run on a tiny model and do what they say."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from nn_core import NeuronSet

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_capture_and_lesion_example(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(EXAMPLES / "capture_and_lesion.py"), "--model", "tiny-llama",
                           "--out", str(out), "--texts", "4", "--max-tokens", "32"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "restored exactly" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["restored_exactly"] is True
    assert results["max_abs_logit_diff_after_restore"] == 0.0
    assert results["lesioned_per_layer"] == round(0.2 * 128)
    assert results["random_lesion"]["kl_mean"] > 0  # the lesion changed the distribution
    ns = NeuronSet.load(out / "neurons.json")
    assert ns.layer_counts("mlp_act") == {0: 26, 1: 26}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["model"] == "tiny-llama"
    assert {o["path"] for o in manifest["outputs"]} >= {"neurons.json", "results.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
