"""The hippocampus: a small mixture of MLP experts that writes a delta into the residual stream.

For a residual-stream tensor ``x`` (batch B, positions T, width d) the hippocampus returns

    delta(x)_t = Σ_{e ∈ S_t} g_{t,e} · E_e(x_t),      E_e(x) = W2_e · gelu(W1_e · x + b1_e) + b2_e

with ``S_t`` the ``top_k`` experts chosen for token t and ``g_{t,e}`` their gate weights.

Routing. Router logits ``z_t = R x_t`` (``R``: ``E × d``), probabilities ``p_t = softmax(z_t)``.
``routing="token"`` routes every token on its own; ``routing="sequence"`` routes every token of
row b with the mean logits of that row's real tokens (``token_mask``), i.e. one expert set per
sequence. Selection uses the scores ``z_t + β_u · E · (1/E − u_e)``: ``u`` is the running usage
(EMA with decay ``usage_decay`` of the fraction of assignments each expert took; sums to 1) and
``β_u = usage_bonus`` favours under-used experts; the bonus only changes which experts are
picked. Gates are ``softmax`` of the raw logits over the chosen set, so they carry the router's
gradient.

Auxiliary loss (``aux_loss`` after each forward; add it to the training loss):

    aux = α · E · Σ_e f_e · P_e  +  λ_c · Σ_e relu(P_e − c/E)²

``f_e``: the fraction of token-slots dispatched to e (counts, no gradient), ``P_e``: the mean
router probability of e over the real tokens (differentiable); the first term (Switch-style
load balancing, ``α = aux_weight``) is minimised by uniform routing, and its gradient reaches
the router through ``P`` (never computed from detached probabilities). The second term
(capacity penalty, ``λ_c = capacity_penalty``, ``c = capacity_factor``) penalises experts whose
mean probability exceeds ``c`` times the uniform share.

Dispatch is batched: the (token, expert) assignments are sorted by expert and scattered into
an ``E × C × d`` buffer (C = the largest expert load in the batch; no token is dropped), two
batched matmuls run every expert at once, and the gated outputs are added back per token with
``index_add``. There is no Python loop over samples or experts.

``W2`` starts at zero, so a fresh hippocampus adds exactly nothing (the base model is unchanged
until it learns). :meth:`reset_experts` moves chosen experts back toward their initial weights
(refresh).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nn_core.errors import NNError

__all__ = ["Hippocampus", "HippocampusConfig"]

ROUTING = ("token", "sequence")


@dataclass
class HippocampusConfig:
    """Mixture-of-experts settings (see the module docstring for the formulas)."""

    num_experts: int = 8
    expert_hidden: int = 64
    top_k: int = 2
    routing: str = "token"  # token | sequence
    aux_weight: float = 0.01
    usage_bonus: float = 0.0
    usage_decay: float = 0.99
    capacity_factor: float = 1.5
    capacity_penalty: float = 0.0
    init_std: float = 0.02

    def check(self) -> None:
        if self.num_experts < 1:
            raise NNError(f"experts.num_experts must be at least 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise NNError(f"experts.top_k must be in 1..num_experts ({self.num_experts}), got {self.top_k}")
        if self.expert_hidden < 1:
            raise NNError(f"experts.expert_hidden must be at least 1, got {self.expert_hidden}")
        if self.routing not in ROUTING:
            raise NNError(f"experts.routing must be one of {', '.join(ROUTING)}, got '{self.routing}'")
        if not 0.0 <= self.usage_decay < 1.0:
            raise NNError(f"experts.usage_decay must be in [0, 1), got {self.usage_decay}")
        if self.capacity_factor <= 0:
            raise NNError(f"experts.capacity_factor must be positive, got {self.capacity_factor}")


class Hippocampus(nn.Module):
    """``delta = hippocampus(x)`` for ``x`` of shape (B, T, d); see the module docstring.

    ``token_mask`` (B, T), when set, marks real tokens for sequence routing and for the
    routing statistics (padding is still routed, but does not count). ``aux_loss``,
    ``last_load`` (f) and ``last_choice`` (B, T, k expert ids) describe the last forward.
    """

    def __init__(self, width: int, config: HippocampusConfig | None = None, *, seed: int = 0):
        super().__init__()
        cfg = config or HippocampusConfig()
        cfg.check()
        self.config = cfg
        self.width = int(width)
        E, d, h = cfg.num_experts, self.width, cfg.expert_hidden
        gen = torch.Generator().manual_seed(seed)
        self.router = nn.Parameter(torch.randn(E, d, generator=gen) * cfg.init_std)
        self.w1 = nn.Parameter(torch.randn(E, d, h, generator=gen) / math.sqrt(d))
        self.b1 = nn.Parameter(torch.zeros(E, h))
        self.w2 = nn.Parameter(torch.zeros(E, h, d))
        self.b2 = nn.Parameter(torch.zeros(E, d))
        self.register_buffer("usage", torch.full((E,), 1.0 / E))
        self.register_buffer("usage_count", torch.zeros(E))  # assignments since the last refresh
        self.register_buffer("task_usage", torch.zeros(0, E))  # rows: task id, values: counts
        self._init = {k: v.detach().clone() for k, v in self._weights().items()}
        self.token_mask: torch.Tensor | None = None
        self.task_id: int | None = None
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.last_load: torch.Tensor = torch.zeros(E)
        self.last_choice: torch.Tensor | None = None

    def _weights(self) -> dict[str, torch.Tensor]:
        return {"router": self.router, "w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2}

    # ------------------------------------------------------------------ routing
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(choice (B,T,k) long, gates (B,T,k), probs (B,T,E))`` for ``x`` (B,T,d)."""
        cfg = self.config
        logits = x @ self.router.t()  # (B, T, E)
        mask = self._mask(x)
        if cfg.routing == "sequence":
            w = mask.unsqueeze(-1)
            seq = (logits * w).sum(1) / w.sum(1).clamp(min=1.0)  # (B, E)
            logits = seq.unsqueeze(1).expand_as(logits)
        probs = logits.softmax(-1)
        scores = logits.detach()
        if cfg.usage_bonus:
            E = cfg.num_experts
            scores = scores + cfg.usage_bonus * E * (1.0 / E - self.usage.to(scores))
        choice = scores.topk(cfg.top_k, dim=-1).indices
        gates = logits.gather(-1, choice).softmax(-1)
        return choice, gates, probs

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        m = self.token_mask
        if m is None or tuple(m.shape) != tuple(x.shape[:2]):
            return torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
        return m.to(device=x.device, dtype=x.dtype)

    # ------------------------------------------------------------------ experts
    def expert_outputs(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Batched dispatch: ``E_{experts[a]}(x[a])`` for rows a of ``x`` (A, d), ``experts`` (A,)."""
        E = self.config.num_experts
        order = torch.argsort(experts, stable=True)
        e_sorted = experts[order]
        counts = torch.bincount(e_sorted, minlength=E)
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(e_sorted.numel(), device=x.device) - starts[e_sorted]
        cap = int(counts.max()) if e_sorted.numel() else 0
        buf = x.new_zeros(E, max(cap, 1), x.shape[-1])
        buf = buf.index_put((e_sorted, pos), x[order])
        hid = F.gelu(torch.bmm(buf, self.w1) + self.b1.unsqueeze(1))
        out = torch.bmm(hid, self.w2) + self.b2.unsqueeze(1)
        y = out[e_sorted, pos]
        return torch.empty_like(y).index_copy(0, order, y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.width:
            raise NNError(f"the hippocampus expects (batch, positions, {self.width}), got {tuple(x.shape)}")
        dtype = x.dtype
        x = x.to(self.w1.dtype)
        B, T, d = x.shape
        k = self.config.top_k
        choice, gates, probs = self.route(x)
        flat_x = x.reshape(B * T, d)
        tok = torch.arange(B * T, device=x.device).repeat_interleave(k)
        experts = choice.reshape(-1)
        y = self.expert_outputs(flat_x[tok], experts) * gates.reshape(-1, 1)
        delta = torch.zeros_like(flat_x).index_add(0, tok, y).view(B, T, d)
        self._statistics(x, choice, probs)
        return delta.to(dtype)

    def _statistics(self, x: torch.Tensor, choice: torch.Tensor, probs: torch.Tensor) -> None:
        cfg = self.config
        E = cfg.num_experts
        mask = self._mask(x)
        n = mask.sum().clamp(min=1.0)
        P = (probs * mask.unsqueeze(-1)).sum((0, 1)) / n
        onehot = F.one_hot(choice, E).to(x.dtype).sum(2)  # (B, T, E)
        counts = (onehot * mask.unsqueeze(-1)).sum((0, 1)).detach()
        f = counts / counts.sum().clamp(min=1.0)
        aux = cfg.aux_weight * E * (f * P).sum()
        if cfg.capacity_penalty:
            aux = aux + cfg.capacity_penalty * F.relu(P - cfg.capacity_factor / E).pow(2).sum()
        self.aux_loss = aux
        self.last_load = f
        self.last_choice = choice.detach()
        if self.training:
            with torch.no_grad():
                self.usage.mul_(cfg.usage_decay).add_((1 - cfg.usage_decay) * f.to(self.usage))
                self.usage_count.add_(counts.to(self.usage_count))
                if self.task_id is not None:
                    self._add_task_usage(self.task_id, counts)

    def _add_task_usage(self, task: int, counts: torch.Tensor) -> None:
        if task >= self.task_usage.shape[0]:
            grow = self.task_usage.new_zeros(task + 1 - self.task_usage.shape[0], self.config.num_experts)
            self.task_usage = torch.cat([self.task_usage, grow])
        self.task_usage[task] += counts.to(self.task_usage)

    # ------------------------------------------------------------------ refresh
    def experts_for_tasks(self, tasks, min_share: float = 0.0) -> list[int]:
        """Experts that took more than ``min_share`` of the assignments of ``tasks``."""
        rows = [t for t in tasks if t < self.task_usage.shape[0]]
        if not rows:
            return []
        c = self.task_usage[rows].sum(0)
        share = c / c.sum().clamp(min=1.0)
        return [int(e) for e in torch.nonzero(share > min_share).flatten()]

    @torch.no_grad()
    def reset_experts(self, experts, factor: float) -> None:
        """``w ← (1 − factor) · w + factor · w_init`` for the experts' weights and router rows;
        their usage goes back to the uniform share and their counters to 0."""
        if not 0.0 <= factor <= 1.0:
            raise NNError(f"refresh factor must be in [0, 1], got {factor}")
        idx = torch.as_tensor(list(experts), dtype=torch.long)
        if idx.numel() == 0:
            return
        for name, w in self._weights().items():
            init = self._init[name].to(w)
            w[idx] = (1 - factor) * w[idx] + factor * init[idx]
        self.usage[idx] = 1.0 / self.config.num_experts
        self.usage.div_(self.usage.sum())
        self.usage_count[idx] = 0
        if self.task_usage.numel():
            self.task_usage[:, idx] = 0

    def drift(self) -> torch.Tensor:
        """Per-expert relative distance of the expert weights from their initial values,
        ``‖θ_e − θ_e⁰‖ / (‖θ_e⁰‖ + 1)`` (used for saturation)."""
        num = torch.zeros(self.config.num_experts)
        den = torch.zeros(self.config.num_experts)
        for name in ("w1", "b1", "w2", "b2"):
            w = getattr(self, name).detach().float().cpu()
            init = self._init[name].float().cpu()
            num += (w - init).flatten(1).pow(2).sum(1)
            den += init.flatten(1).pow(2).sum(1)
        return num.sqrt() / (den.sqrt() + 1.0)

    def get_extra_state(self):
        return {"init": {k: v.cpu() for k, v in self._init.items()}}

    def set_extra_state(self, state) -> None:
        self._init = {k: v.clone() for k, v in state["init"].items()}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "task_usage"
        if key in state_dict:
            self.task_usage = torch.zeros_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
