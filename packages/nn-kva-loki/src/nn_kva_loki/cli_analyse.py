"""``nn-kva-loki analyse``: knowledge-value attribution of a model over samples, to HDF5.

    nn-kva-loki analyse [MODEL] [DATA] [--method M] [--steps N] [--engine fast|captum]
                [--target argmax|gold] [--position P] [--write-mode w|a] [--resume] [--out DIR]

Writes ``DIR/kva.h5`` (``nn.kva/1``, incrementally) and ``DIR/manifest.json``. Under
``accelerate launch`` (or ``torchrun``) the samples are shared among the processes and rank
0 writes them all. Registered on the main parser by :func:`add_analyse_command`.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from nn_core.errors import NNError
from nn_core.run.cli import add_common_args, args_config

KVA_NAME = "kva.h5"
EXAMPLES = """  nn-kva-loki analyse                                    # smollm2-135m on the synthetic suite
  nn-kva-loki analyse smollm2-135m mmlu.csv --target gold --out runs/kva-mmlu
  accelerate launch -m nn_kva_loki.cli analyse MODEL mmlu.jsonl --out runs/kva   # data-parallel
  nn-kva-loki analyse MODEL mmlu.jsonl --out runs/kva --resume               # after an interruption
"""


def _slug(text: str) -> str:
    name = Path(text.rstrip("/")).name or text
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "data"


def default_out(model: str, data: str) -> Path:
    """``runs/kva-<model name>-<data name>``."""
    return Path("runs") / f"kva-{_slug(model)}-{_slug(data)}"


def _analyse(args) -> int:
    from nn_core.io import check_output_dir
    from nn_core.model.loading import load_model
    from nn_core.run.manifest import write_manifest
    from nn_kva_loki.kva import _state, analyse, load_samples, quadrature, summary_line
    from nn_kva_loki.kva_file import KVASettings

    tool = getattr(args, "_tool", None) or "nn-kva-loki analyse"
    quadrature(args.method, args.steps)  # bad --method / --steps: one line before any work
    for name in ("batch_size", "per_task"):
        if getattr(args, name) < 1:
            raise NNError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.memory_gb <= 0:
        raise NNError(f"--memory-gb must be positive, got {args.memory_gb}")
    out = Path(args.out) if args.out else default_out(args.model, args.data)
    check_output_dir(out, tool=tool, overwrite=args.overwrite, markers=(KVA_NAME,))
    state = _state(args.device)
    device = args.device
    if state.num_processes > 1 and device == "auto":
        device = state.device  # one device per process
    t0 = time.perf_counter()
    model, tok = load_model(args.model, device=device, dtype=args.dtype, seed=args.seed)
    samples, label = load_samples(args.data, tok, style=args.style, per_task=args.per_task,
                                  seed=args.seed, limit=args.limit)
    load_s = time.perf_counter() - t0
    settings = KVASettings(method=args.method, steps=args.steps, engine=args.engine, dataset=label,
                           target=args.target)
    t1 = time.perf_counter()
    summary = analyse(model, tok, samples, out / KVA_NAME, settings=settings, position=args.position,
                      max_length=args.max_length, batch_size=args.batch_size,
                      memory_budget=args.memory_gb * 2**30, write_mode=args.write_mode,
                      resume=args.resume)
    if state.is_main_process:
        write_manifest(out, config=args_config(args), model=model, model_spec=args.model, seeds=args.seed,
                       phases={"load": load_s, "analyse": time.perf_counter() - t1},
                       extra={**summary, "kva": KVA_NAME, "dataset": label}, tool=tool)
        print(summary_line(summary))
        print(f"wrote {out / KVA_NAME}")
    _close_process_group()
    return 0


def _close_process_group() -> None:
    """The command owns its process: end the process group before exit, all ranks
    together, so no rank exits while gloo's threads still run (which aborted a rank now
    and then with 'terminate called without an active exception')."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def add_analyse_command(sub) -> argparse.ArgumentParser:
    a = sub.add_parser(
        "analyse", help="knowledge-value attribution (integrated gradients per mlp_out channel) to HDF5",
        description="For each sample: integrated gradients of the target token's probability at the "
                    "target position w.r.t. every layer's down-projection output (site mlp_out) there, "
                    "zero baseline, written to DIR/kva.h5 (nn.kva/1).",
        epilog="examples:\n" + EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("model", nargs="?", default="smollm2-135m", metavar="MODEL",
                   help="alias (smollm2-135m, tiny-<arch>), local folder or hub id (default: %(default)s)")
    a.add_argument("data", nargs="?", default="synthetic", metavar="DATA",
                   help="'synthetic[:TASK,...]' (nn-eval's task suite, offline; default), a "
                        "multiple-choice file (.jsonl/.json/.csv: question + choices or A-D + answer), "
                        "a prompt file (.txt, one per line, or records with 'prompt'), or instruction "
                        "records (Alpaca, Dolly, ShareGPT)")
    a.add_argument("--method", default="riemann_trapezoid",
                   choices=("riemann_trapezoid", "gausslegendre", "riemann_left", "riemann_right",
                            "riemann_middle"), help="integration rule, Captum's (default: %(default)s)")
    a.add_argument("--steps", type=int, default=7, metavar="N",
                   help="integration points, >= 1 (default: %(default)s)")
    a.add_argument("--engine", choices=("fast", "captum"), default="fast",
                   help="fast: KV-cached prefix, all (layer, step) variants of the target token in one "
                        "batch; captum: Captum IntegratedGradients, layer by layer (the reference, "
                        "~100x slower) (default: %(default)s)")
    a.add_argument("--target", choices=("argmax", "gold"), default="argmax",
                   help="argmax: the model's own prediction at the target position; gold: the first "
                        "token of the data's answer (default: %(default)s)")
    a.add_argument("--position", type=int, default=-1, metavar="P",
                   help="target position in each prompt's tokens, negative from the end (default: "
                        "%(default)s, the last prompt token, which predicts the answer)")
    a.add_argument("--limit", type=int, default=None, metavar="N", help="use the first N samples")
    a.add_argument("--per-task", type=int, default=5, metavar="N",
                   help="samples per task of the synthetic suite (default: %(default)s)")
    a.add_argument("--style", choices=("auto", "plain", "mmlu"), default="auto",
                   help="multiple-choice prompt layout (default: %(default)s)")
    a.add_argument("--max-length", type=int, default=2048, metavar="N",
                   help="keep at most the last N tokens up to the target (default: %(default)s)")
    a.add_argument("--batch-size", type=int, default=4, metavar="N",
                   help="samples per batch and process (default: %(default)s)")
    a.add_argument("--memory-gb", type=float, default=2.0, metavar="GB",
                   help="memory for one fast-path forward (rows x KV-cache copies) (default: %(default)s)")
    a.add_argument("--write-mode", choices=("w", "a"), default="w",
                   help="w: a new file (replaces a complete one); a: add samples to a complete file "
                        "of the same model and settings (default: %(default)s)")
    a.add_argument("--resume", action="store_true",
                   help="continue an interrupted DIR/kva.h5 from its first missing sample")
    add_common_args(a, model=False)
    a.set_defaults(func=_analyse, _out_markers=(KVA_NAME,))
    return a
