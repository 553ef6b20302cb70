"""Data-parallel scoring: 2 CPU processes (gloo), each with half the calibration batches,
must give the single-process scores."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

METRICS_CHECKED = ("grad_x_weight", "grad_squared", "act_mag", "wanda")


def _batches():
    g = torch.Generator().manual_seed(0)
    # uneven lengths so that token weighting matters
    return [{"input_ids": torch.randint(0, 256, (2, n), generator=g)} for n in (20, 9, 31, 14)]


def _score_all(batches):
    from nn_core.models import load_model
    from nn_sensitivity.metrics import score

    torch.set_num_threads(1)
    model, _ = load_model("tiny-llama", device="cpu", dtype="float32")
    return {m: {k: v.clone() for k, v in score(model, batches, m).values.items()}
            for m in METRICS_CHECKED}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from nn_sensitivity import dist as nn_dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        assert nn_dist.active() and nn_dist.world_size() == world
        mine = nn_dist.shard(_batches())
        result = _score_all(mine)
        if rank == 0:
            torch.save(result, os.path.join(out_dir, "dist.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_process_gloo_scores_equal_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    multi = torch.load(tmp_path / "dist.pt")
    single = _score_all(_batches())
    for metric in METRICS_CHECKED:
        for name, v in single[metric].items():
            torch.testing.assert_close(multi[metric][name], v, rtol=1e-4, atol=1e-10,
                                       msg=f"{metric} {name}")
