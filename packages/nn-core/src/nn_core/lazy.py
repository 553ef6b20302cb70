"""Lazy package exports (PEP 562), shared by every nn package's ``__init__``.

A package lists ``{submodule: [names]}``; a name is imported from its submodule on first
access and then cached in the package, so ``import nn_x`` and ``nn-x --help`` do not pay
for torch. This module imports nothing heavy.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence


def lazy_exports(package: str, exports: Mapping[str, Sequence[str]]
                 ) -> tuple[list[str], Callable[[str], object], Callable[[], list[str]]]:
    """``(__all__, __getattr__, __dir__)`` for ``package`` exporting ``exports``.

    Use in the package's ``__init__``:
    ``__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)``.
    """
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str):
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return sorted(where), __getattr__, __dir__
