"""Forward hooks on sites and modules: one handle type, :class:`SiteHooks`, for all of them.

Every site intervention of nn-core (neuron masks, capture sinks, injected deltas, ad-hoc
edits through :func:`hooked`) is a ``SiteHooks``: a mapping ``{point: fn}`` resolved against
the model when the handle is built, registered only when it is used (``attach()`` or
``with``), removed by ``remove()`` or on leaving the ``with`` block (in ``finally``, so an
exception inside the block never leaves a hook behind). ``attach`` and ``remove`` are
idempotent; ``disabled()`` makes the hooks pass everything through unchanged for a block
without unregistering them.

A *point* is a site (``SiteRef``, ``(layer, site)`` or ``"3.mlp_act"``; see
:mod:`nn_core.model.sites`) or a :class:`ModuleTap`, the input or output of any named
module (e.g. a Linear layer that is not a canonical site).

``fn(x)`` sees the point's tensor: a pre-hook's first positional argument, or a forward
hook's output (its first element when the module returns a tuple). It returns a
replacement tensor, or None to leave the tensor as it is.

Streaming capture (``capture``, ``Capture``) lives in :mod:`nn_core.intervene.capture`; the
names are re-exported here for older imports.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from nn_core.errors import NNError
from nn_core.model.adapters import site_module
from nn_core.model.sites import SiteRef, as_site_ref

SiteFn = Callable[[torch.Tensor], torch.Tensor | None]

TAP_WHERE = ("input", "output")


@dataclass(frozen=True, order=True)
class ModuleTap:
    """The input (first positional argument) or output (first element if a tuple) of the
    module named ``module`` in ``model.named_modules()``; str form ``"model.norm:input"``."""

    module: str
    at: str = "input"

    def __post_init__(self) -> None:
        if self.at not in TAP_WHERE:
            raise NNError(f"a module tap is at 'input' or 'output', not '{self.at}'")

    def __str__(self) -> str:
        return f"{self.module}:{self.at}"


HookPoint = SiteRef | ModuleTap


def as_hook_point(key) -> HookPoint:
    """A :class:`ModuleTap` passes through; anything else is read as a site reference."""
    if isinstance(key, ModuleTap):
        return key
    return as_site_ref(key)


def resolve_point(model: nn.Module, point: HookPoint) -> tuple[nn.Module, str]:
    """(module, "pre" | "post") to hook for ``point``."""
    if isinstance(point, ModuleTap):
        try:
            module = model.get_submodule(point.module)
        except AttributeError:
            raise NNError(f"no module named '{point.module}' in the model: use a name from "
                          "model.named_modules() (e.g. 'model.layers.0.mlp.up_proj')") from None
        return module, ("pre" if point.at == "input" else "post")
    return site_module(model, point)


class SiteHooks:
    """Forward hooks ``{point: fn}`` on ``model`` behind one handle.

    >>> h = SiteHooks(model, {(3, "mlp_act"): lambda x: x * 0})   # nothing registered yet
    >>> with h:                       # registered here, removed on exit (also on errors)
    ...     lesioned = model(**batch).logits
    ...     with h.disabled():        # still registered, but passes everything through
    ...         clean = model(**batch).logits
    >>> h.attach(); ...; h.remove()   # long-lived use (training)

    ``with`` restores the state it found: a handle attached before the block stays attached
    after it. Hooks run in registration order after hooks registered earlier on the same
    module.
    """

    def __init__(self, model: nn.Module, fns: Mapping):
        self.model = model
        self._points: list[tuple[HookPoint, nn.Module, str, SiteFn]] = []
        for key, fn in fns.items():
            point = as_hook_point(key)
            module, kind = resolve_point(model, point)
            self._points.append((point, module, kind, fn))
        self._handles: list = []
        self._attached = False
        self._enabled = True
        self._entered: list[bool] = []

    # ------------------------------------------------------------------ state
    @property
    def points(self) -> tuple[HookPoint, ...]:
        return tuple(p for p, _, _, _ in self._points)

    @property
    def attached(self) -> bool:
        return self._attached

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def n_hooks(self) -> int:
        """How many torch hooks this handle holds registered right now."""
        return len(self._handles)

    # ------------------------------------------------------------------ hooks
    def _wrap(self, point: HookPoint, kind: str, fn: SiteFn):
        if kind == "pre":
            def pre_hook(module, args):
                if not self._enabled:
                    return None
                if not args:
                    raise NNError(f"{point}: the module was called without a positional input; "
                                  "tap its output or another module")
                new = fn(args[0])
                return None if new is None else (new, *args[1:])
            return pre_hook

        def post_hook(module, args, output):
            if not self._enabled:
                return None
            if isinstance(output, tuple):
                new = fn(output[0])
                return None if new is None else (new, *output[1:])
            return fn(output)
        return post_hook

    def attach(self) -> SiteHooks:
        """Register the hooks (no-op when attached); all or none are registered."""
        if self._attached:
            return self
        handles = []
        try:
            for point, module, kind, fn in self._points:
                hook = self._wrap(point, kind, fn)
                if kind == "pre":
                    handles.append(module.register_forward_pre_hook(hook))
                else:
                    handles.append(module.register_forward_hook(hook))
        except BaseException:
            for h in handles:
                h.remove()
            raise
        self._handles = handles
        self._attached = True
        return self

    def remove(self) -> None:
        """Unregister the hooks (no-op when not attached)."""
        handles, self._handles, self._attached = self._handles, [], False
        for h in handles:
            h.remove()

    @contextlib.contextmanager
    def disabled(self) -> Iterator[SiteHooks]:
        """A block in which the hooks leave every tensor untouched (the clean model)."""
        previous = self._enabled
        self._enabled = False
        try:
            yield self
        finally:
            self._enabled = previous

    def __enter__(self) -> SiteHooks:
        fresh = not self._attached
        self.attach()
        self._entered.append(fresh)
        return self

    def __exit__(self, *exc) -> None:
        fresh = self._entered.pop() if self._entered else True
        if fresh:
            self.remove()

    def __repr__(self) -> str:
        state = "attached" if self._attached else "detached"
        if not self._enabled:
            state += ", disabled"
        return f"{type(self).__name__}({', '.join(map(str, self.points))}; {state})"


def hooked(model: nn.Module, fns: Mapping) -> SiteHooks:
    """A :class:`SiteHooks` for ``with``: hooks installed for the block, removed on exit.

    >>> with hooked(model, {(3, "mlp_act"): lambda x: x * 0}):
    ...     logits = model(**batch).logits
    """
    return SiteHooks(model, fns)


def register_site_hooks(model: nn.Module, fns: Mapping) -> list:
    """Register ``{point: fn}`` now and return the torch handles (the caller removes them).

    Prefer :class:`SiteHooks` (``attach()``/``remove()``), which also offers ``disabled()``.
    """
    hooks = SiteHooks(model, fns).attach()
    return list(hooks._handles)


def __getattr__(name: str):
    # capture moved to nn_core.intervene.capture (it builds on SiteHooks); old imports work
    if name in ("Capture", "capture", "REDUCERS"):
        from nn_core.intervene import capture as _capture

        return getattr(_capture, name)
    raise AttributeError(f"module 'nn_core.intervene.hooks' has no attribute '{name}'")
