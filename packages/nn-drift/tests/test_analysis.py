from __future__ import annotations

import numpy as np
import pytest
import torch

from nn_drift.analysis import bootstrap_ci, cohens_d, compare, mann_whitney_p, report, verdict


def test_cohens_d_and_bootstrap_recover_known_effect():
    rng = np.random.default_rng(0)
    x, y = rng.normal(0.5, 1.0, 10000), rng.normal(0.0, 1.0, 10000)
    d = cohens_d(x, y)
    assert d == pytest.approx(0.5, abs=0.06)
    lo, hi = bootstrap_ci(x, y, n_boot=300)
    assert lo < 0.5 < hi and hi - lo < 0.12
    assert mann_whitney_p(x, y) < 1e-10
    assert verdict((lo, hi), mann_whitney_p(x, y)) == "H1"
    # no effect: CI covers 0, verdict "similar"
    z = rng.normal(0.0, 1.0, 10000)
    lo0, hi0 = bootstrap_ci(z, y, n_boot=300)
    assert lo0 < 0 < hi0
    assert verdict((lo0, hi0), mann_whitney_p(z, y)) == "H2"
    # exact small example: means 2 and 1, pooled sd 1 -> d = 1
    assert cohens_d([1, 2, 3], [0, 1, 2]) == pytest.approx(1.0)


def test_compare_on_a_synthetic_run(tmp_path):
    from safetensors.torch import save_file

    from nn_drift.drift import MEMBERS_DIR

    (tmp_path / MEMBERS_DIR).mkdir()
    g = torch.Generator().manual_seed(0)
    vals = {"set-diff/relative": 1.0 + 0.5 * torch.randn(500, generator=g),
            "random/relative": 0.5 * torch.randn(500, generator=g) + 0.5}
    for k in ("l2", "cosine"):
        vals[f"set-diff/{k}"] = torch.rand(500, generator=g)
        vals[f"random/{k}"] = torch.rand(500, generator=g)
    save_file(vals, str(tmp_path / MEMBERS_DIR / "step-00000010.safetensors"))
    s = compare(tmp_path, n_boot=200)
    r = s["groups"]["set-diff"]["relative"]["10"]
    assert r["d"] == pytest.approx(1.0, abs=0.15) and r["verdict"] == "H1"
    assert s["groups"]["set-diff"]["l2"]["10"]["verdict"] in ("H2", "inconclusive")
    assert "| set-diff | relative | 10 |" in report(s)
