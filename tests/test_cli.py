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


# ---------------------------------------------------------------------------------------------------------------
# octoquant quantize


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    pytest.importorskip("transformers")
    from tests._tiny import tiny_llama

    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    tiny_llama().save_pretrained(folder)
    return folder


def _one_line_error(out, match):
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert match in lines[0], lines[0]


def test_quantize_hf_folder_writes_a_loadable_checkpoint(hf_folder, tmp_path):
    import json

    import octoquant as oq

    out = run_cli("quantize", str(hf_folder), "--preset", "w8a8-dynamic", "--out", str(tmp_path / "q"), "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["layers_int8"] == result["layers"] == 15  # 14 linears + the head
    q = oq.load(tmp_path / "q")
    assert isinstance(q.model.layers[0].mlp.down_proj, oq.nn.QLinear)


def test_quantize_stream(hf_folder, tmp_path):
    out = run_cli("quantize", str(hf_folder), "--preset", "w8a16", "--stream", "--out", str(tmp_path / "q"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "q" / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize(
    "args,match",
    [
        (["--preset", "int4"], "valid: w8a8, w8a8-dynamic, w8a16, llm-int8, smoothquant"),
        (["--preset", "w8a8"], "needs calibration data"),
        (["--preset", "w8a8", "--calib", "/nonexistent/calib.txt"], "not found"),
    ],
    ids=["unknown-preset", "static-without-calibration", "missing-calibration-file"],
)
def test_quantize_user_errors_one_line_exit_2(hf_folder, tmp_path, args, match):
    _one_line_error(run_cli("quantize", str(hf_folder), *args, "--out", str(tmp_path / "q")), match)
    assert not (tmp_path / "q").exists()


def test_quantize_missing_model_path(tmp_path):
    _one_line_error(run_cli("quantize", str(tmp_path / "nope"), "--out", str(tmp_path / "q")), "not found")


def test_quantize_output_exists(hf_folder, tmp_path):
    (tmp_path / "q").mkdir()
    _one_line_error(run_cli("quantize", str(hf_folder), "--out", str(tmp_path / "q")), "exists")
