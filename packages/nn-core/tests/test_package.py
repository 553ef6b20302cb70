from __future__ import annotations

import subprocess
import sys

import nn_core


def test_every_export_resolves():
    for name in nn_core.__all__:
        assert getattr(nn_core, name) is not None, name


def test_import_and_help_do_not_load_torch():
    code = ("import sys, nn_core, nn_core.cli; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_attribute():
    import pytest

    with pytest.raises(AttributeError):
        nn_core.not_a_thing  # noqa: B018
