import subprocess
import sys

import pytest


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "octoquant", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.real_model
def test_demo_quantizes_real_mobilenet_and_compares():
    out = run_cli("demo", "--calib", "32", "--eval", "64")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "53/53 layers int8" in text  # every conv and the classifier run on int8 kernels
    agree = float(next(line for line in text.splitlines() if line.startswith("top-1 agreement")).split()[5])
    assert 0.80 <= agree <= 1.0  # a working INT8 model (measured ~0.89 on 128 crops), not a collapsed one
    size = next(line for line in text.splitlines() if line.startswith("weights + buffers"))
    assert float(size.split()[-2].rstrip("x")) > 3.0  # ~3.7x smaller (biases stay float)


def test_unknown_command_exits_2():
    out = run_cli("frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr
