"""nn-core installed without its extras (peft, gguf, datasets, bitsandbytes): every module
imports, and using a feature of a missing extra names the pip command that installs it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

BLOCKED = ("peft", "gguf", "datasets", "bitsandbytes")

# Runs in a fresh interpreter: a meta path finder that replaces the others makes these
# packages (and their submodules) unimportable, as if they were not installed, before
# anything loads.
SCRIPT = textwrap.dedent("""
    import importlib, json, pkgutil, sys

    BLOCKED = {blocked!r}

    class Block:
        # Stands in for every finder: blocked names are found by none (find_spec -> None, so
        # `import peft` raises ModuleNotFoundError and availability probes such as
        # transformers' importlib.util.find_spec("peft") see it absent, as when it is not
        # installed); other names go to the original finders in order.

        def __init__(self, finders):
            self.finders = finders

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                return None
            for finder in self.finders:
                spec = getattr(finder, "find_spec", None) and finder.find_spec(name, path, target)
                if spec is not None:
                    return spec
            return None

        def find_distributions(self, context=None):
            # importlib.metadata asks meta path finders too: blocked distributions are absent
            from importlib.metadata import DistributionFinder

            context = context or DistributionFinder.Context()
            for finder in self.finders:
                for dist in getattr(finder, "find_distributions", lambda c: ())(context):
                    if (dist.metadata["Name"] or "").lower() not in BLOCKED:
                        yield dist

        def invalidate_caches(self):
            for finder in self.finders:
                getattr(finder, "invalidate_caches", lambda: None)()

    assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
    sys.meta_path[:] = [Block(list(sys.meta_path))]
    for name in BLOCKED:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"{{name}} was not blocked")

    import nn_core

    imported, failed = [], {{}}
    for info in pkgutil.walk_packages(nn_core.__path__, "nn_core.", onerror=lambda n: failed.setdefault(n, "walk")):
        if info.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(info.name)
            imported.append(info.name)
        except Exception as exc:
            failed[info.name] = f"{{type(exc).__name__}}: {{exc}}"
    for name in nn_core.__all__:
        getattr(nn_core, name)

    from nn_core.errors import MissingExtraError
    from nn_core.model.loading import load_model
    from nn_core.train import SFTConfig, prepare_model

    model, _ = load_model("tiny-llama")
    try:
        prepare_model(model, SFTConfig(method="lora"))
    except MissingExtraError as exc:
        lora = str(exc)
    else:
        lora = None
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    from importlib import metadata
    for name in BLOCKED:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
        else:
            leaked.append("metadata:" + name)
    print(json.dumps({{"imported": imported, "failed": failed, "lora": lora, "leaked": leaked}}))
""").format(blocked=BLOCKED)


def test_every_module_imports_and_lora_names_its_extra():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["failed"] == {}
    # the walk reached every layer of the package, down to the extra-using modules
    assert {"nn_core.train.lora", "nn_core.train.saving", "nn_core.model.loading", "nn_core.data.readers",
            "nn_core.intervene.lora_views", "nn_core.run.cli", "nn_core.cli"} <= set(report["imported"])
    assert report["lora"] is not None, "prepare_model(method='lora') did not raise MissingExtraError"
    assert 'pip install "nn-core[lora]"' in report["lora"] and "'peft'" in report["lora"]
    assert report["leaked"] == []
