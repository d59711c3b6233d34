"""docs/toolbox.md's Python examples run as written, in order, on the bundled model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "toolbox.md"


@pytest.mark.skipif(not (ROOT / "checkpoints" / "shapes-sd").is_dir(), reason="the bundled model is not here")
def test_toolbox_page_examples_run(monkeypatch):
    monkeypatch.chdir(ROOT)
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 (the docs' own code)
    assert len(namespace["edited"]) == 2 and len(namespace["styled"]) == 2
    assert namespace["maps"] is not None
    assert namespace["out"].images[0].size == namespace["photo"].size
    assert not namespace["ours"].image_adapters  # the page unloads what it loaded
