"""Canonical sites: architecture-independent names for points inside a model.

=========  =====================================================  ==================
site       tensor                                                 width
=========  =====================================================  ==================
mlp_act    input of the MLP down-projection (act(gate)*up)        intermediate_size
mlp_out    output of the down-projection, before the residual     hidden_size
resid      the decoder block's output (residual stream)           hidden_size
=========  =====================================================  ==================

A neuron is one channel of one site in one layer: ``(layer, site, index)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from nn_core.errors import NNError

SITES: tuple[str, ...] = ("mlp_act", "mlp_out", "resid")


def check_site(site: str) -> str:
    if site not in SITES:
        raise NNError(f"unknown site '{site}': use one of {', '.join(SITES)}")
    return site


@dataclass(frozen=True, order=True)
class SiteRef:
    """One site in one layer, e.g. ``SiteRef(3, "mlp_act")``."""

    layer: int
    site: str

    def __post_init__(self):
        check_site(self.site)
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise NNError(f"layer {self.layer!r} is not a valid layer index: layers count from 0")

    def __str__(self) -> str:
        return f"{self.layer}.{self.site}"

    @classmethod
    def parse(cls, text: str) -> SiteRef:
        """Parse ``"3.mlp_act"`` (the form used as JSON keys)."""
        layer, _, site = text.partition(".")
        try:
            return cls(int(layer), site)
        except ValueError:
            raise NNError(f"bad site key '{text}': expected LAYER.SITE, e.g. 3.mlp_act") from None


def as_site_ref(key) -> SiteRef:
    if isinstance(key, SiteRef):
        return key
    if isinstance(key, str):
        return SiteRef.parse(key)
    layer, site = key
    return SiteRef(int(layer), site)
