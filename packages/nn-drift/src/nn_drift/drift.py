"""Drift of groups of weights or neurons during (LoRA) fine-tuning.

Members. A group is measured over *members*, vectors of weights compared with their
initial values:

* weight groups (:class:`~nn_core.select.WeightSet`): one member per output row of each
  matrix that holds group entries; the member is the vector of the group's entries in
  that row (the per-row comparison unit of the scores and groups);
* neuron groups (:class:`~nn_core.select.NeuronSet`, down-projection channels): one member
  per neuron, the vector of its down-projection weights (``mlp_act`` j: input column j,
  ``mlp_out`` i: output row i).

Per member, with w the current effective weights (base + every active LoRA delta, read
through :mod:`nn_core.intervene.lora_views` without merging the model) and w0 the
initial ones: cosine = <w, w0> / (|w| |w0|) (1 when both are zero), l2 = |w - w0|,
relative = |w - w0| / |w0| (0 when w = w0 = 0). Per group, step and metric the log row
holds mean, median, std (population), q25, q75, min, max and n over members.

Memory: w0 is kept only for tracked entries (and saved once to ``drift_init.safetensors``
so that a resumed run compares with the true initial weights, not the checkpoint's).

Freezing (:class:`FreezeRows`): the rows (output channels) a group touches are excluded
from LoRA's update: for y = (W0 + s·B A) x the update of output row i is s·B[i] A, so
keeping B[i] = 0 (gradient masked and the row re-zeroed after every optimizer step)
keeps row i of the effective weight bit-identical to W0 (the product adds exact zeros).
Input channels (``mlp_act`` neurons) are excluded by zeroing the matching columns of A.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from nn_core.errors import NNError

METRICS = ("cosine", "l2", "relative")
DRIFT_LOG = "drift.jsonl"
INIT_FILE = "drift_init.safetensors"
MEMBERS_DIR = "drift_members"  # step-XXXXXXXX.safetensors: per-member values, "<group>/<metric>"


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


def _stats(x: torch.Tensor) -> dict:
    x = x.double()
    if x.numel() == 0:
        return {"n": 0}
    q = torch.quantile(x, torch.tensor([0.25, 0.5, 0.75], dtype=x.dtype))
    return {"mean": float(x.mean()), "median": float(q[1]), "std": float(x.std(unbiased=False)),
            "q25": float(q[0]), "q75": float(q[2]), "min": float(x.min()), "max": float(x.max()),
            "n": int(x.numel())}


def member_metrics(cur: torch.Tensor, init: torch.Tensor, member: torch.Tensor,
                   n_members: int) -> dict[str, torch.Tensor]:
    """Per-member cosine, l2 and relative change; ``cur``/``init`` flat values, ``member``
    the member id (0..n_members-1) of each value."""
    c, i = cur.double(), init.double()
    m = member.to(c.device)

    def seg(v):
        return torch.zeros(n_members, dtype=torch.float64, device=c.device).index_add_(0, m, v)

    dot, cc, ii, dd = seg(c * i), seg(c * c), seg(i * i), seg((c - i) ** 2)
    denom = (cc * ii).sqrt()
    cos = torch.where(denom > 0, dot / denom.clamp_min(1e-300),
                      torch.where((cc == 0) & (ii == 0), 1.0, 0.0))
    l2 = dd.sqrt()
    rel = torch.where(ii > 0, l2 / ii.sqrt().clamp_min(1e-300), torch.where(dd == 0, 0.0, float("inf")))
    return {"cosine": cos, "l2": l2, "relative": rel}


class _Tracked:
    """How to read one group's values from a (PEFT) model: per parameter either flat
    indices (weights) or channel indices along a dimension (neurons)."""

    def __init__(self, model: nn.Module, group):
        from nn_core.model.adapters import get_adapter
        from nn_core.train.lora import base_model

        self.parts: list[tuple[str, str, torch.Tensor, torch.Tensor]] = []  # name, how, idx, member
        self.n_members = 0
        plain = base_model(model)
        # groups are validated against the plain model before it is wrapped
        # (finetune_with_drift); PEFT renames the wrapped weights
        if hasattr(group, "shapes"):  # WeightSet
            ad = get_adapter(plain)
            for name in group.names():
                idx = group.indices(name)
                shape = group.shapes[name]
                rows = idx % shape[1] if ad.conv1d else idx // shape[1]  # output rows
                uniq, inv = torch.unique(rows, return_inverse=True)
                self.parts.append((name, "flat", idx, inv + self.n_members))
                self.n_members += int(uniq.numel())
        else:  # NeuronSet
            ad = get_adapter(plain)
            for ref, idx in group.items():
                layer, site = ref.layer, ref.site
                if site not in ("mlp_act", "mlp_out"):
                    raise NNError(f"drift of {site} neurons is not defined: use mlp_act or mlp_out groups")
                name = ad.down_weight_name(layer)
                w = ad.down_weight(layer)
                # stored-layout dimension that indexes this site's channels
                dim = ad.neuron_dim() if site == "mlp_act" else 1 - ad.neuron_dim()
                other = w.shape[1 - dim]
                member = (torch.arange(idx.numel()) + self.n_members)
                # values come as a (len(idx), other) block: member per row of the block
                self.parts.append((name, f"dim{dim}", idx, member.repeat_interleave(other)))
                self.n_members += int(idx.numel())

    def members(self) -> torch.Tensor:
        return torch.cat([m for *_, m in self.parts]) if self.parts else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def read_all(model: nn.Module, tracked: Mapping[str, _Tracked]) -> dict[str, torch.Tensor]:
    """The current values of every tracked group, ``{group: flat values in part order}``
    (a part's entries, its rows or its columns' entries row-major), reading each weight matrix once for all
    groups: its effective weight W0 + Σ s·B A is formed densely (one rank-r product, cheap
    next to gathering millions of entries through rank-r dot products) and every group's
    entries are gathered from it, one matrix at a time (peak: one matrix, never a copy of
    the model)."""
    from nn_core.intervene.lora_views import effective_weight

    by_name: dict[str, list[tuple[str, int]]] = {}
    pieces: dict[str, list] = {}
    for g, t in tracked.items():
        pieces[g] = [None] * len(t.parts)
        for k, (name, *_rest) in enumerate(t.parts):
            by_name.setdefault(name, []).append((g, k))
    for name, users in by_name.items():
        w = effective_weight(model, name).detach()
        for g, k in users:
            _, how, idx, _ = tracked[g].parts[k]
            if how == "flat":
                v = w.reshape(-1).index_select(0, idx.to(w.device))
            elif how == "dim0":
                v = w.index_select(0, idx.to(w.device)).reshape(-1)
            else:
                v = w.index_select(1, idx.to(w.device)).t().reshape(-1)
            pieces[g][k] = v.float().cpu()
        del w
    return {g: torch.cat(v) if v else torch.zeros(0) for g, v in pieces.items()}


class DriftTracker(_callback_base()):
    """A ``TrainerCallback`` that logs the drift of ``groups`` (``{name: WeightSet |
    NeuronSet}``) to ``folder/drift.jsonl`` at step 0, every ``every`` optimizer steps and
    at the end: one JSON row per step × group × metric (see the module docstring).

    Resuming: the initial values are read from ``folder/drift_init.safetensors`` and log
    rows after the resumed step are dropped before new ones are appended, so the log of a
    resumed run equals an uninterrupted one's."""

    def __init__(self, model: nn.Module, groups: Mapping, folder: str | Path, *, every: int = 10,
                 save_members: bool = True):
        if every < 1:
            raise NNError(f"--track-every must be at least 1, got {every}")
        if not groups:
            raise NNError("no groups to track: pass --groups")
        self.folder = Path(folder)
        self.every = int(every)
        self.save_members = bool(save_members)
        self.tracked = {name: _Tracked(model, g) for name, g in groups.items()}
        self.members = {name: t.members() for name, t in self.tracked.items()}
        self.init: dict[str, torch.Tensor] | None = None
        self.model = model
        self.last_step: int | None = None

    # ---------------------------------------------------------------- state
    def capture_initial(self) -> None:
        """Read the initial values now (call before training) and save them."""
        from safetensors.torch import save_file

        from nn_core.io import atomic_path

        self.init = read_all(self.model, self.tracked)
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.folder / INIT_FILE) as tmp:
            save_file({n: v.contiguous() for n, v in self.init.items()}, str(tmp))

    def _load_initial(self) -> None:
        from safetensors.torch import load_file

        path = self.folder / INIT_FILE
        if not path.is_file():
            raise NNError(f"cannot resume drift tracking: '{path}' is missing; start over with --no-resume")
        init = load_file(str(path))
        if set(init) != set(self.tracked) or any(init[n].numel() != self.members[n].numel()
                                                 for n in init):
            raise NNError(f"'{path}' was written for other groups: start over with --no-resume")
        self.init = init

    def _truncate_log(self, step: int) -> None:
        log = self.folder / DRIFT_LOG
        if not log.is_file():
            return
        keep = [ln for ln in log.read_text().splitlines()
                if ln.strip() and json.loads(ln)["step"] <= step]
        from nn_core.io import atomic_write_text

        atomic_write_text(log, "".join(k + "\n" for k in keep))
        for f in sorted((self.folder / MEMBERS_DIR).glob("step-*.safetensors")):
            if int(f.stem.split("-")[1]) > step:
                f.unlink()

    # ---------------------------------------------------------------- measuring
    def measure(self, step: int, current: Mapping[str, torch.Tensor] | None = None) -> list[dict]:
        """Compute and append the rows for ``step``; returns them. ``current``: the values
        just read (:func:`read_all`), when the caller has them."""
        if self.init is None:
            self.capture_initial()
        rows = []
        members = {}
        current = dict(current) if current is not None else read_all(self.model, self.tracked)
        for name, t in self.tracked.items():
            cur = current.pop(name)
            per = members[name] = member_metrics(cur, self.init[name], self.members[name],
                                                 t.n_members)
            for metric in METRICS:
                rows.append({"step": int(step), "group": name, "metric": metric,
                             **_stats(per[metric])})
        if self.save_members:
            from safetensors.torch import save_file

            from nn_core.io import atomic_path

            (self.folder / MEMBERS_DIR).mkdir(parents=True, exist_ok=True)
            with atomic_path(self.folder / MEMBERS_DIR / f"step-{int(step):08d}.safetensors") as tmp:
                save_file({f"{n}/{m}": v.float().contiguous() for n, per in members.items()
                           for m, v in per.items()}, str(tmp))
        with (self.folder / DRIFT_LOG).open("a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
            f.flush()
        self.last_step = int(step)
        return rows

    # ---------------------------------------------------------------- callback
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        step = int(state.global_step)
        if step == 0:
            fresh = self.init is None
            if fresh:
                self.capture_initial()
            self._truncate_log(-1)
            self.measure(0, current=self.init if fresh else None)  # just read: not again
        else:
            self._load_initial()
            self._truncate_log(step)
            self.last_step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 and state.global_step != self.last_step:
            self.measure(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if state.global_step != self.last_step:
            self.measure(state.global_step)


def read_members(folder: str | Path, step: int) -> dict[str, dict[str, torch.Tensor]]:
    """``{group: {metric: per-member values}}`` saved at ``step``."""
    from safetensors.torch import load_file

    path = Path(folder) / MEMBERS_DIR / f"step-{int(step):08d}.safetensors"
    if not path.is_file():
        raise NNError(f"no per-member drift values for step {step} in '{folder}': pick a logged step")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in load_file(str(path)).items():
        group, _, metric = key.rpartition("/")
        out.setdefault(group, {})[metric] = v
    return out


def member_steps(folder: str | Path) -> list[int]:
    """Steps with saved per-member values."""
    return sorted(int(f.stem.split("-")[1])
                  for f in (Path(folder) / MEMBERS_DIR).glob("step-*.safetensors"))


def read_drift(folder: str | Path) -> list[dict]:
    """The rows of ``folder/drift.jsonl``."""
    path = Path(folder) / DRIFT_LOG if Path(folder).is_dir() else Path(folder)
    if not path.is_file():
        raise NNError(f"no drift log at '{path}': pass a folder written by nn-drift finetune")
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


class FreezeRows(_callback_base()):
    """Keep the channels a group touches out of LoRA's update (see the module docstring):
    rows of B (output channels) and/or columns of A (input channels) held at zero."""

    def __init__(self, model: nn.Module, group):
        from nn_core.intervene.lora_views import is_lora_layer
        from nn_core.model.adapters import get_adapter
        from nn_core.train.lora import base_model

        plain = base_model(model)
        ad = get_adapter(plain)
        modules = dict(model.named_modules())
        lora_by_name = {}
        for mname, mod in modules.items():
            if is_lora_layer(mod):
                from nn_core.intervene.lora_views import original_param_name

                lora_by_name[original_param_name(mname + ".weight")] = mod
        # (param name, stored dim, channel indices): stored dim 0 = rows of the stored weight
        spec: list[tuple[str, int, torch.Tensor]] = []
        if hasattr(group, "shapes"):
            for name in group.names():
                shape = group.shapes[name]
                idx = group.indices(name)
                if ad.conv1d:
                    spec.append((name, 1, torch.unique(idx % shape[1])))
                else:
                    spec.append((name, 0, torch.unique(idx // shape[1])))
        else:
            for ref, idx in group.items():
                layer, site = ref.layer, ref.site
                dim = ad.neuron_dim() if site == "mlp_act" else 1 - ad.neuron_dim()
                spec.append((ad.down_weight_name(layer), dim, idx))
        self.masks: list[tuple[torch.Tensor, torch.Tensor]] = []  # (param, bool mask of zeros)
        skipped = 0
        for name, dim, idx in spec:
            mod = lora_by_name.get(name)
            if mod is None:
                skipped += 1  # not a LoRA target: its weights never change anyway
                continue
            fan = bool(getattr(mod, "fan_in_fan_out", False))
            for a in mod.lora_A:
                A, B = mod.lora_A[a].weight, mod.lora_B[a].weight  # (r, in), (out, r)
                # stored rows: Linear -> output -> B rows; fan_in_fan_out -> input -> A cols
                use_b = (dim == 0) != fan
                p = B if use_b else A
                mask = torch.zeros_like(p, dtype=torch.bool)
                if use_b:
                    mask[idx.to(p.device)] = True
                else:
                    mask[:, idx.to(p.device)] = True
                self.masks.append((p, mask))
        self.skipped = skipped
        self._hooks = []

    @torch.no_grad()
    def apply(self) -> None:
        for p, m in self.masks:
            p.masked_fill_(m, 0.0)

    def on_train_begin(self, args, state, control, **kwargs):
        self.apply()
        self._hooks = [p.register_hook(lambda g, m=m: g.masked_fill(m, 0.0)) for p, m in self.masks]

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.apply()

    def on_train_end(self, args, state, control, **kwargs):
        self.apply()
        for h in self._hooks:
            h.remove()
        self._hooks = []


def load_groups(paths) -> dict:
    """``{name: WeightSet | NeuronSet}`` from files (``.safetensors`` WeightSets, ``.json``
    NeuronSets; name = file stem) or folders written by ``nn-drift groups`` (every group
    file in them)."""
    from nn_core.select.neuronset import NeuronSet
    from nn_core.select.weightset import WeightSet

    out: dict = {}
    for p in paths:
        p = Path(p)
        files = sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".json")
                       and f.name not in ("summary.json", "manifest.json")) if p.is_dir() else [p]
        if not files:
            raise NNError(f"'{p}' holds no group files: pass a folder written by nn-drift groups")
        for f in files:
            if not f.is_file():
                raise NNError(f"group file '{f}' does not exist: check the path")
            g = WeightSet.load(f) if f.suffix == ".safetensors" else NeuronSet.load(f)
            if not len(g):
                raise NNError(f"group '{f}' is empty: rebuild it with other percentages")
            name = f.stem
            if name in out:
                name = f"{p.name}/{f.stem}"
            out[name] = g
    return out


