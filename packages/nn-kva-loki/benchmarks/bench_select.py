"""Benchmark ``nn-kva-loki select`` on a synthetic KVA file at smollm2-135m's shape.

Writes a synthetic ``nn.kva/1`` file (default 10,000 samples x 30 layers x 576 channels,
standard-normal float32 attributions, the same chunking and compression as the real
writer), then runs layer-balanced and global selection on it, each in a fresh child
process so that its peak memory is its own:

* ``seconds``: wall time of :func:`nn_kva_loki.select_channels` (read + decompress +
  normalise + select + aggregate);
* ``tracemalloc_peak_mib``: the peak of Python/numpy allocations during the selection;
* ``rss_peak_mib`` / ``rss_rise_mib``: the child's peak RSS and how much the selection
  raised it above the RSS after imports (includes HDF5's chunk cache).

A second, smaller file (``--small`` samples) is selected the same way to show that memory
does not grow with the number of samples. Prints JSON; ``--out FILE`` also writes it.

    OMP_NUM_THREADS=2 python packages/nn-kva-loki/benchmarks/bench_select.py --out results_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIG = {"model_id": "synthetic-smollm2-shape", "model_type": "llama", "num_layers": 30,
       "widths": {"mlp_act": 1536, "mlp_out": 576, "resid": 576}}


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_file(path: Path, n: int, L: int, H: int, seed: int, block: int = 100) -> dict:
    from nn_kva_loki.kva_file import KVASettings, open_kva_writer

    sig = {**SIG, "num_layers": L, "widths": {**SIG["widths"], "mlp_out": H, "resid": H}}
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    w = open_kva_writer(path, sig, KVASettings(dataset="synthetic-normal"))
    for start in range(0, n, block):
        m = min(block, n - start)
        w.append([f"s{i}" for i in range(start, start + m)],
                 rng.standard_normal((m, L, H), dtype=np.float32),
                 np.zeros(m, np.int64), np.full(m, 0.5, np.float32))
    w.finish()
    return {"samples": n, "seconds": round(time.perf_counter() - t0, 2),
            "file_mib": round(path.stat().st_size / 2**20, 1),
            "raw_mib": round(n * L * H * 4 / 2**20, 1)}


def child(path: str, strategy: str, quota: float, chunk_size: int) -> None:
    import tracemalloc

    from nn_kva_loki.select import select_channels

    base = _rss_mib()
    tracemalloc.start()
    t0 = time.perf_counter()
    sel = select_channels(path, quota, strategy=strategy, chunk_size=chunk_size)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(json.dumps({"strategy": strategy, "quota": quota, "chunk_size": chunk_size,
                      "samples": sel.num_samples, "selected": len(sel.neuronset),
                      "seconds": round(seconds, 2),
                      "samples_per_s": round(sel.num_samples / seconds, 1),
                      "tracemalloc_peak_mib": round(peak / 2**20, 1),
                      "rss_after_imports_mib": round(base, 1),
                      "rss_peak_mib": round(_peak_rss_mib(), 1),
                      "rss_rise_mib": round(_peak_rss_mib() - base, 1)}))


def run_child(path: Path, strategy: str, quota: float, chunk_size: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", str(path), "--strategy", strategy,
                           "--quota", str(quota), "--chunk-size", str(chunk_size)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--small", type=int, default=1_000, help="samples of the second file")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--quota", type=float, default=10.0)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--strategy", default="layer-balanced")
    ap.add_argument("--dir", default=None, help="where the synthetic files go (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic files")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.strategy, args.quota, args.chunk_size)
        return

    work = Path(args.dir or tempfile.mkdtemp(prefix="nn-kva-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    big, small = work / f"kva-{args.samples}.h5", work / f"kva-{args.small}.h5"
    result = {"shape": {"layers": args.layers, "hidden": args.hidden}, "quota": args.quota,
              "chunk_size": args.chunk_size,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "numpy": np.__version__,
                          "load_avg": [round(x, 2) for x in os.getloadavg()]}}
    try:
        result["write"] = {"large": write_file(big, args.samples, args.layers, args.hidden, 0),
                           "small": write_file(small, args.small, args.layers, args.hidden, 1)}
        result["select"] = {
            "layer_balanced_large": run_child(big, "layer-balanced", args.quota, args.chunk_size),
            "global_large": run_child(big, "global", args.quota, args.chunk_size),
            "layer_balanced_small": run_child(small, "layer-balanced", args.quota, args.chunk_size),
            "layer_balanced_large_chunk256": run_child(big, "layer-balanced", args.quota, 256),
        }
        result["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        if not args.keep:
            for p in (big, small):
                p.unlink(missing_ok=True)
            if args.dir is None:
                work.rmdir()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
