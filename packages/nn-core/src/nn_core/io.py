"""Atomic file output: write to a temporary sibling, then rename into place.

Temporary names and the ``--out`` rules
---------------------------------------
Every temporary file or folder is a hidden sibling of its target named
``.{name}.nn-tmp-{host}-{pid}-{random}`` (``host``: 8 hex digits of a hash of this host's
name; ``pid``: the writing process). A run that is killed leaves it behind;
:func:`sweep_stale` (called by :func:`atomic_path` and :func:`atomic_dir` before they
write) removes those of the same target whose process is no longer alive on this host,
and never those of a live process or of another host.

Files are created ``0o666 & ~umask`` and folders ``0o777 & ~umask``, as ``open()`` and
``mkdir`` would (``tempfile`` alone would give 0600 / 0700).

An output folder (``--out``) is replaced only when it is a previous output of the same
tool, recognised by the ``"tool"`` its ``manifest.json`` records (or when it is an empty
folder); anything else (a file, a symlink, a folder of the user's, another tool's
output) is refused with one :class:`NNError` line unless ``overwrite=True``. See
:func:`check_output_dir`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from nn_core.errors import NNError

MANIFEST_NAME = "manifest.json"
TMP_MARK = ".nn-tmp-"


# ----------------------------------------------------------------------- temp names, umask
def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def temp_prefix(path: str | os.PathLike, pid: int | None = None) -> str:
    """The name prefix of temporaries of ``path`` made by process ``pid`` (default: this
    one) on this host: ``.{name}.nn-tmp-{host}-{pid}-``; a random part follows."""
    name = Path(path).name
    return f".{name}{TMP_MARK}{_host_tag()}-{os.getpid() if pid is None else int(pid)}-"


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux
    ``/proc/self/status``), else by setting and restoring it."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a real pid: never sweep what we cannot judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # e.g. EPERM: it exists, owned by someone else
    return True


def sweep_stale(path: str | os.PathLike) -> list[Path]:
    """Remove temporaries of ``path`` left by dead processes of this host; returns them."""
    path = Path(path)
    parent = path.parent
    head = f".{path.name}{TMP_MARK}{_host_tag()}-"
    removed: list[Path] = []
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith(head)]
    except OSError:
        return removed
    for entry in entries:
        m = re.match(r"(\d+)-", entry.name[len(head):])
        if m is None or _pid_alive(int(m.group(1))):
            continue
        p = Path(entry.path)
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    return removed


def _mkstemp(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    return Path(tmp)


def _mkdtemp(path: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), dir=path.parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


# ----------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    tmp_path = _mkstemp(path)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj, *, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


# ----------------------------------------------------------------------- output folders
def output_tool(path: str | os.PathLike) -> str | None:
    """The ``"tool"`` recorded in ``path/manifest.json``, or None (no manifest, unreadable,
    or none recorded)."""
    try:
        data = json.loads((Path(path) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    tool = data.get("tool") if isinstance(data, dict) else None
    return tool if isinstance(tool, str) else None


def check_output_dir(path: str | os.PathLike, *, tool: str, overwrite: bool = False,
                     flag: str = "--out", markers: Sequence[str] = ()) -> Path:
    """Check, before any work, that ``tool`` may write its output folder at ``path``.

    Allowed: a path that does not exist yet and can be created (every existing ancestor
    is a folder, the nearest one writable); an empty folder; a folder whose
    ``manifest.json`` records ``"tool": tool`` (a previous output of the same tool) or
    that holds one of ``markers`` (files that only this tool writes, e.g. a training
    run's fingerprint before its manifest exists); anything at all with ``overwrite``.
    Everything else raises :class:`NNError` with one line naming the fix.
    """
    p = Path(path).expanduser()
    fix = f"choose another {flag}, or pass --overwrite to replace it"
    if p.is_symlink() or p.exists():
        if p.is_symlink() or not p.is_dir():
            if overwrite:
                return p
            kind = "a symlink" if p.is_symlink() else "an existing file"
            raise NNError(f"{flag} '{p}' is {kind}, not an output folder of {tool}: {fix}")
        if not overwrite:
            owner = output_tool(p)
            if owner != tool and not any((p / m).exists() for m in markers):
                try:
                    empty = not any(p.iterdir())
                except OSError:
                    empty = False
                if not empty:
                    what = (f"holds the output of {owner}" if owner else
                            f"is a folder that is not an output of {tool} (no {MANIFEST_NAME} "
                            "naming it)")
                    raise NNError(f"{flag} '{p}' {what}: {fix}")
        where = p.parent
    else:
        where = p.parent
        while not where.exists() and not where.is_symlink() and where != where.parent:
            where = where.parent
        if where.exists() and not where.is_dir():
            raise NNError(f"{flag} '{p}' cannot be created: '{where}' is a file, not a folder; "
                          f"choose another {flag}")
    where = where if str(where) else Path(".")
    if not os.access(where, os.W_OK | os.X_OK):
        raise NNError(f"{flag} '{p}' cannot be written: no write permission in '{where}'; "
                      f"choose another {flag}")
    return p


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, tool: str | None = None,
               overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name, then rename it to ``path``.

    With ``tool`` the folder is an output of that tool: :func:`check_output_dir` is applied
    before the temporary folder is made and again just before the swap, and the finished
    folder must hold a ``manifest.json`` recording ``"tool": tool`` (results and
    provenance arrive together, in one rename). Without ``tool`` (caches, internal
    folders) any previous ``path`` is replaced.

    A previous ``path`` is moved aside (under a temporary name) before the new folder is
    renamed in, so a reader never sees a half-deleted folder; on an exception the
    temporary folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    if tool is not None:
        check_output_dir(path, tool=tool, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    tmp = _mkdtemp(path)
    try:
        yield tmp
        if tool is not None:
            recorded = output_tool(tmp)
            if recorded != tool:
                raise RuntimeError(f"atomic_dir(tool={tool!r}): the folder holds no {MANIFEST_NAME} "
                                   f"recording that tool (found {recorded!r}); write it inside")
            check_output_dir(path, tool=tool, overwrite=overwrite)
        if path.exists() or path.is_symlink():
            old = _mkdtemp(path)
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def read_json(path: str | os.PathLike, *, what: str, fix: str = "check the path"):
    """Parse a user-given JSON file, or raise one :class:`NNError` line naming ``what`` the
    file should be and the fix (missing file, not UTF-8, invalid JSON)."""
    path = Path(path)
    if not path.is_file():
        raise NNError(f"{what} file '{path}' does not exist: {fix}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise NNError(f"'{path}' is not UTF-8 text: pass a {what} JSON file") from None
    except json.JSONDecodeError as exc:
        raise NNError(f"'{path}' is not valid JSON ({exc.msg} at line {exc.lineno}): "
                      f"pass a {what} file") from None
