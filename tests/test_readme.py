"""Every Python block of the README runs as written, in a fresh interpreter and an empty folder.

A block that needs a package the README tells the reader to install first is skipped, with the
reason, where that package is absent (CI installs everything, so there every block runs).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_a_readme_python_block_runs_as_written(block, tmp_path):
    imported = set(re.findall(r"^\s*(?:import|from)\s+([A-Za-z_][\w]*)", block, flags=re.M))
    imported |= set(re.findall(r"find_spec\(\"([\w]+)\"\)", block))
    for name in sorted(imported):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"the block needs {name}, which is not installed here")
    src = str(README.parent / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
