import subprocess
import sys

import pytest


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "octoquant", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.real_model
def test_demo_prints_real_mobilenet_table():
    out = run_cli("demo")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith(("features.", "classifier."))]
    assert len(rows) == 53  # 52 convs + the classifier of MobileNetV2
    # per-channel scales can never be worse than one scale for the whole tensor on real weights
    assert all(float(r[-2]) >= float(r[-3]) for r in rows)


def test_unknown_command_exits_2():
    out = run_cli("frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr
