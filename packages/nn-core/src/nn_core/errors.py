"""User-facing errors.

Every problem a user can fix (a missing file, a bad flag, a selection made for another
model) is raised as an :class:`NNError` whose message is one line naming the problem and
the fix. CLIs turn it into that line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations


class NNError(Exception):
    """A problem with the user's input; the message names the fix."""


class MissingExtraError(NNError, ImportError):
    """An optional integration is used without its extra installed."""

    def __init__(self, feature: str, package: str, extra: str, module: str):
        super().__init__(
            f"{feature} needs the '{module}' package: pip install \"{package}[{extra}]\""
        )


def require(module: str, *, feature: str, package: str, extra: str):
    """Import an optional module or raise :class:`MissingExtraError` with the install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(feature, package, extra, module) from exc
