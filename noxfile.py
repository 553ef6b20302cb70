"""Cross-package checks. `uv run nox` runs the default sessions; `uv run nox -l` lists all.

Every package is tested in a venv of its own that holds only that package (with its
extras), its declared dependencies and its `test` group: an import that only a sibling
declares fails here, which is how "pip install nn-x alone works" is proven.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import nox

nox.options.default_venv_backend = "uv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "contracts", "tests", "integration", "wheels"]

ROOT = Path(__file__).parent
PACKAGES = sorted(p.name for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").is_file())


def _sync(session: nox.Session, *args: str) -> None:
    """`uv sync` into this session's own venv (not the workspace .venv)."""
    session.run_install(
        "uv", "sync", "--project", str(ROOT), *args,
        env={"UV_PROJECT_ENVIRONMENT": session.virtualenv.location},
        silent=True,
    )


def _pytest_env() -> dict[str, str]:
    # Tests never touch the network; keep thread counts modest on small CI machines.
    return {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the whole workspace."""
    session.install(_pin("ruff"))
    session.run("ruff", "check", ".")


@nox.session
def contracts(session: nox.Session) -> None:
    """import-linter (dependency direction) and deptry (declared third-party imports) per package."""
    _sync(session, "--all-packages", "--all-extras")
    session.run("lint-imports")
    for pkg in PACKAGES:
        with session.chdir(ROOT / "packages" / pkg):
            session.run("deptry", "src")


@nox.session
@nox.parametrize("package", PACKAGES, ids=PACKAGES)
def tests(session: nox.Session, package: str) -> None:
    """Unit tests of one package, in a venv holding only it and its declared dependencies."""
    _sync(session, "--package", package, "--no-default-groups", "--group", "test", "--all-extras")
    session.run("pytest", f"packages/{package}/tests", "-q", *session.posargs, env=_pytest_env())


@nox.session
def integration(session: nox.Session) -> None:
    """Flows across packages on the real embedded smollm2-135m (offline)."""
    _sync(session, "--all-packages", "--all-extras")
    session.run("pytest", "integration_tests", "-q", *session.posargs, env=_pytest_env())


@nox.session
def wheels(session: nox.Session) -> None:
    """Build every package (wheel and sdist), install each wheel into a fresh venv with only
    its dependencies, and run its CLI --help there; then install nn-sensitivity the way a
    user does (plain pip in a fresh ``python -m venv``, siblings from the built wheels) and
    run a tiny study with its CLI, offline. ``nox -s wheels -- PKG ...`` checks only those
    packages (their workspace dependencies are built too)."""
    packages = _selected(session)
    dist = Path(tempfile.mkdtemp(prefix="nn-wheels-"))
    try:
        constraints = _build_all(session, dist, _with_workspace_deps(packages))
        for pkg in packages:
            venv = dist / f"venv-{pkg}"
            session.run("uv", "venv", "-q", "-p", "3.11", str(venv), silent=True)
            py = str(venv / "bin" / "python")
            wheel = next(dist.glob(f"{pkg.replace('-', '_')}-*.whl"))
            # siblings come from the freshly built wheels, third-party deps from the index
            session.run("uv", "pip", "install", "-q", "-p", py, "--find-links", str(dist),
                        "-c", str(constraints), str(wheel), silent=True)
            cli = venv / "bin" / pkg
            session.run(str(cli), "--help", silent=True, external=True)
            module = pkg.replace("-", "_")
            # the public API imports with only the declared dependencies installed
            session.run(py, "-c", f"import {module}; [getattr({module}, n) for n in {module}.__all__]",
                        silent=True, external=True)
            session.log(f"{pkg}: wheel installs alone, imports, and `{pkg} --help` works")
        if "nn-sensitivity" in packages:
            _plain_pip_install(session, dist, constraints, "nn-sensitivity")
    finally:
        shutil.rmtree(dist, ignore_errors=True)


@nox.session(default=False)
def dist(session: nox.Session) -> None:
    """Write every package's wheel and sdist to dist/, with dist/constraints.txt (the root
    pyproject's pins plus the packages' own versions); see the README for installing one
    package from there with plain pip."""
    out = ROOT / "dist"
    packages = _with_workspace_deps(_selected(session))
    for pkg in PACKAGES:  # drop this workspace's previous builds, nothing else
        for old in out.glob(f"{pkg.replace('-', '_')}-*"):
            old.unlink()
    constraints = _build_all(session, out, packages)
    for path in sorted(out.iterdir()):
        session.log(f"dist/{path.name}")
    session.log(f"install one package: pip install --find-links dist -c {constraints.relative_to(ROOT)} "
                "nn-sensitivity")


def _selected(session: nox.Session) -> list[str]:
    """The packages named after ``--`` (``nox -s wheels -- nn-sensitivity``), else all."""
    unknown = sorted(set(session.posargs) - set(PACKAGES))
    if unknown:
        session.error(f"unknown package(s) {unknown}: choose from {PACKAGES}")
    return [p for p in PACKAGES if p in session.posargs] or PACKAGES


def _with_workspace_deps(packages: list[str]) -> list[str]:
    """``packages`` and, transitively, the workspace packages they depend on."""
    import re
    import tomllib

    todo, seen = list(packages), set()
    while todo:
        pkg = todo.pop()
        if pkg in seen:
            continue
        seen.add(pkg)
        deps = tomllib.loads((ROOT / "packages" / pkg / "pyproject.toml").read_text())["project"].get(
            "dependencies", [])
        todo += [n for n in (re.split(r"[\s\[<>=!~;@]", d, maxsplit=1)[0].lower() for d in deps)
                 if n in PACKAGES]
    return [p for p in PACKAGES if p in seen]


def _build_all(session: nox.Session, out: Path, packages: list[str]) -> Path:
    """Build the wheel and the sdist of ``packages`` into ``out`` and write
    ``out/constraints.txt``; returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    for pkg in packages:
        # no --wheel/--sdist: the sdist is built, then the wheel from it (both are checked)
        session.run("uv", "build", "--package", pkg, "--out-dir", str(out),
                    "--project", str(ROOT), silent=True)
    constraints = out / "constraints.txt"
    constraints.write_text("\n".join(_pins() + _own_pins()) + "\n")
    return constraints


def _plain_pip_install(session: nox.Session, dist: Path, constraints: Path, pkg: str) -> None:
    """Install ``pkg`` with plain pip (no uv) into a fresh ``python -m venv``: siblings from
    the wheels in ``dist`` (``--find-links``), third-party versions pinned by ``-c``. Then
    run its CLI on a tiny random-init model, offline, and check what it wrote."""
    import json

    venv = dist / f"pip-venv-{pkg}"
    session.run("python", "-m", "venv", str(venv), silent=True)
    py = str(venv / "bin" / "python")
    session.run(py, "-m", "pip", "install", "-q", "--find-links", str(dist), "-c", str(constraints),
                pkg, silent=True, external=True)
    env = {**_pytest_env(), "NN_CACHE": str(dist / "nn-cache")}
    # the packages came from the wheels, not from this checkout
    where = session.run(py, "-c", "import nn_core, nn_sensitivity; print(nn_core.__file__); "
                        "print(nn_sensitivity.__file__)", silent=True, external=True, env=env)
    if str(ROOT) in where or "site-packages" not in where:
        session.error(f"{pkg} in the pip venv imports from outside its site-packages:\n{where}")
    cli = str(venv / "bin" / pkg)
    session.run(cli, "metrics", silent=True, external=True, env=env)
    out = dist / f"{pkg}-run"
    session.run(cli, "run", "--model", "tiny-llama", "--device", "cpu", "--metric", "magnitude",
                "--topk", "10", "--controls", "none", "--seeds", "0", "--no-stability",
                "--calib-blocks", "1", "--block-len", "16", "--batch-size", "1",
                "--eval-tokens", "64", "--eval-len", "32", "--out", str(out),
                silent=True, external=True, env=env)
    manifest = json.loads((out / "manifest.json").read_text())
    results = json.loads((out / "perturbation_results.json").read_text())
    if manifest.get("tool") != f"{pkg} run" or not results:
        session.error(f"{pkg} run wrote an unexpected folder: tool {manifest.get('tool')!r}")
    session.log(f"{pkg}: plain pip installs it from dist/ in a fresh venv, and `{pkg} run "
                "--model tiny-llama` works there offline")


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Benchmark scripts of every package; each prints JSON figures."""
    _sync(session, "--all-packages", "--all-extras")
    for script in sorted(ROOT.glob("packages/*/benchmarks/bench_*.py")):
        session.run("python", str(script), *session.posargs, env=_pytest_env())


def _pin(name: str) -> str:
    """The exact pin of ``name`` from the root pyproject's constraint-dependencies."""
    for spec in _pins():
        if spec.split("==")[0].strip().lower() == name:
            return spec
    return name


def _own_pins() -> list[str]:
    """``name==version`` of every workspace package, so pip takes the built wheels and
    never a same-named distribution of another version from an index."""
    import tomllib

    pins = []
    for pkg in PACKAGES:
        project = tomllib.loads((ROOT / "packages" / pkg / "pyproject.toml").read_text())["project"]
        pins.append(f"{project['name']}=={project['version']}")
    return pins


def _pins() -> list[str]:
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return list(data["tool"]["uv"]["constraint-dependencies"])


if os.environ.get("CI"):
    nox.options.error_on_missing_interpreters = True
