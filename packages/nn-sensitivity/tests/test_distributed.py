"""Data-parallel scoring: 2 CPU processes (gloo) launched by torchrun, each with half the
calibration batches, must give the single-process scores."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("dist_worker.py")


def _load_worker():
    spec = importlib.util.spec_from_file_location("nn_sensitivity_dist_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_process_gloo_scores_equal_single_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(WORKER), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    multi = torch.load(tmp_path / "dist.pt")
    worker = _load_worker()
    single = worker.score_all(worker.calibration_batches())
    for metric in worker.METRICS_CHECKED:
        for name, v in single[metric].items():
            torch.testing.assert_close(multi[metric][name], v, rtol=1e-4, atol=1e-10,
                                       msg=f"{metric} {name}")
