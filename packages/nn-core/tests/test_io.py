from __future__ import annotations

import pytest

from nn_core.errors import NNError
from nn_core.io import atomic_write_json, read_json


def test_read_json_round_trip(tmp_path):
    path = atomic_write_json(tmp_path / "x.json", {"a": [1, 2]})
    assert read_json(path, what="test") == {"a": [1, 2]}


@pytest.mark.parametrize(("content", "match"), [
    (None, "test file .* does not exist: make one"),
    (b"\xff\xfe\x00", "not UTF-8 text"),
    (b"{not json", "not valid JSON .* at line 1"),
])
def test_read_json_bad_files_are_one_line_errors(tmp_path, content, match):
    path = tmp_path / "x.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(NNError, match=match) as exc:
        read_json(path, what="test", fix="make one")
    assert "\n" not in str(exc.value)
