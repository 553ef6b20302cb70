"""Worker script for test_distributed.py, launched the way users launch data-parallel
scoring: ``torchrun --nproc-per-node 2 dist_worker.py OUT`` (``accelerate launch`` sets
the same environment). Rank 0 saves the all-reduced scores to OUT/dist.pt."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

METRICS_CHECKED = ("grad_x_weight", "grad_squared", "act_mag", "wanda")


def calibration_batches():
    g = torch.Generator().manual_seed(0)
    # uneven lengths so that token weighting matters
    return [{"input_ids": torch.randint(0, 256, (2, n), generator=g)} for n in (20, 9, 31, 14)]


def score_all(batches):
    from nn_core.model.loading import load_model
    from nn_sensitivity.metrics import score

    torch.set_num_threads(1)
    model, _ = load_model("tiny-llama", device="cpu", dtype="float32")
    return {m: {k: v.clone() for k, v in score(model, batches, m).values.items()}
            for m in METRICS_CHECKED}


def main(out_dir: str) -> None:
    from nn_sensitivity import dist as nn_dist

    dist.init_process_group("gloo")
    try:
        assert nn_dist.active() and nn_dist.world_size() == 2
        result = score_all(nn_dist.shard(calibration_batches()))
        if dist.get_rank() == 0:
            torch.save(result, Path(out_dir) / "dist.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
