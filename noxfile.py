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
    """Build every package, install each wheel into a fresh venv with only its
    dependencies, and run its CLI --help there."""
    dist = Path(tempfile.mkdtemp(prefix="nn-wheels-"))
    try:
        for pkg in PACKAGES:
            session.run("uv", "build", "--wheel", "--package", pkg, "--out-dir", str(dist),
                        "--project", str(ROOT), silent=True)
        constraints = dist / "constraints.txt"
        constraints.write_text("\n".join(_pins()) + "\n")
        for pkg in PACKAGES:
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
    finally:
        shutil.rmtree(dist, ignore_errors=True)


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


def _pins() -> list[str]:
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return list(data["tool"]["uv"]["constraint-dependencies"])


if os.environ.get("CI"):
    nox.options.error_on_missing_interpreters = True
