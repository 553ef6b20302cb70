from __future__ import annotations

import numpy as np
import pytest

SIG = {"model_id": "tiny-test", "model_type": "llama", "num_layers": 3,
       "widths": {"mlp_act": 40, "mlp_out": 16, "resid": 16}}


def _make_kva(path, data: np.ndarray, *, signature=None, settings=None, finish: bool = True,
              ids=None):
    from nn_kva_loki.kva_file import KVASettings, open_kva_writer

    n, L, H = data.shape
    sig = signature or {**SIG, "num_layers": L, "widths": {**SIG["widths"], "mlp_out": H, "resid": H}}
    w = open_kva_writer(path, sig, settings or KVASettings(dataset="synthetic"))
    ids = ids or [f"s{i}" for i in range(n)]
    for i in range(n):
        w.append([ids[i]], data[i:i + 1], [i], [0.5])
    if finish:
        w.finish()
    else:
        w.close()
    return path


@pytest.fixture
def sig() -> dict:
    return {**SIG, "widths": dict(SIG["widths"])}


@pytest.fixture
def make_kva():
    """``make_kva(path, data[N, L, H], finish=True)``: a KVA file of synthetic attributions
    (pytest's importlib mode cannot import conftest, so helpers come as fixtures)."""
    return _make_kva
