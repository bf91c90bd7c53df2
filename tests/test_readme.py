"""The README's promises: its Python example runs, and .ci/run runs exactly its test command."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_has_exactly_two_commands():
    assert len(_blocks("bash")) == 2


def test_ci_runs_the_readme_test_command():
    test_cmd = _blocks("bash")[1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines()


def test_readme_python_example_runs():
    (code,) = _blocks("python")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "output SQNR" in out.stdout and "2/2 layers int8" in out.stdout
    assert "reloaded bit-identical: True" in out.stdout
    assert "onnxruntime: integer ops {'QLinearConv': 1, 'MatMulIntegerToFloat': 1}" in out.stdout
