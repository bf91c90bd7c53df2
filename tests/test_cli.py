import re
import subprocess
import sys

import pytest


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "octoquant", *args], capture_output=True, text=True, timeout=timeout)


def run_in_process(capsys, *args) -> subprocess.CompletedProcess:
    """`octoquant.cli.main` in this process (no interpreter start-up), as run_cli's result."""
    from octoquant.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out.out, out.err)


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


# ---------------------------------------------------------------------------------------------------------------
# eval / bench / export / report


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_lm_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "q"
    r = run_cli("quantize", str(tiny_lm_folder), "--preset", "w8a8-dynamic", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    return out


def test_eval_checkpoint_and_fp32_model(tiny_checkpoint, tiny_lm_folder):
    import json

    r = run_cli("eval", str(tiny_checkpoint), "--windows", "2", "--seq-len", "64", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["task"] == "perplexity" and res["compared"] == "checkpoint vs its dequantized weights"
    assert res["drop_pct"] == pytest.approx(100 * (res["int8"] / res["fp32"] - 1))
    # an FP32 model: quantized with --preset, compared with itself in FP32
    r = run_cli("eval", str(tiny_lm_folder), "--preset", "w8a16", "--windows", "2", "--seq-len", "64")
    assert r.returncode == 0, r.stderr
    assert "perplexity (FP32 vs w8a16)" in r.stdout


def test_bench_checkpoint(tiny_checkpoint):
    import json

    r = run_cli("bench", str(tiny_checkpoint), "--batches", "1", "2", "--reps", "1", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert [s["batch"] for s in res["speed"]] == [1, 2]
    assert res["memory"]["tested"]["weight_bytes"] < res["memory"]["reference"]["weight_bytes"]
    assert all(s["int8"]["latency_ms"] > 0 and s["fp32"]["latency_ms"] > 0 for s in res["speed"])


def test_export_checkpoint_to_onnx(tiny_checkpoint, tmp_path):
    r = run_cli("export", str(tiny_checkpoint), "--format", "onnx", "--out", str(tmp_path / "m.onnx"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m.onnx").is_file()
    assert "MatMulInteger" in r.stdout and "output_0: SQNR" in r.stdout


def test_report_cli_prints_the_table(tiny_lm_folder, tmp_path):
    args = ["--calib-windows", "2", "--eval-windows", "2", "--seq-len", "64", "--reps", "1"]
    r = run_cli("report", str(tiny_lm_folder), "--out", str(tmp_path / "rep"), *args)
    assert r.returncode == 0, r.stderr
    for row in ("bytes per weight", "decode 32 tokens, batch 1", "perplexity", "hardware path", "layers int8"):
        assert row in r.stdout, row
    assert (tmp_path / "rep" / "index.html").is_file()


@pytest.mark.parametrize(
    "args,match",
    [
        (["report", "{lm}", "--preset", "bogus", "--out", "{tmp}/r"], "unknown preset 'bogus'; valid: w8a8, "),
        (["eval", "{lm}", "--preset", "int4"], "unknown preset 'int4'; valid:"),
        (["bench", "{tmp}/nothing-here"], "not found"),
        (["eval", "{tmp}/nothing-here"], "not found"),
        (["report", "{tmp}/nothing-here", "--out", "{tmp}/r"], "not found"),
        (["report", "{lm}", "--calib", "{tmp}/no-such-text", "--out", "{tmp}/r"], "calibration data"),
        (["report", "{lm}", "--out", "{tmp}"], "exists"),
        (["export", "{ck}", "--out", "{tmp}/exists.onnx"], "exists"),
        (["export", "{lm}", "--out", "{tmp}/m.onnx"], "not a quantized checkpoint"),
        (["export", "{ck}", "--format", "tflite", "--out", "{tmp}/m.tflite"], "unknown format 'tflite'"),
        (["export", "{ck}", "--dynamic", "per-row", "--out", "{tmp}/m.onnx"], "valid: per-token, per-tensor"),
        (["eval", "{ck}", "--task", "top1"], "does not fit a causal model; valid for it: perplexity"),
        (["eval", "{ck}", "--preset", "w8a8"], "already quantized"),
    ],
)
def test_new_commands_user_errors_one_line_exit_2(tiny_lm_folder, tiny_checkpoint, tmp_path, args, match):
    (tmp_path / "exists.onnx").write_bytes(b"keep")
    fmt = {"lm": str(tiny_lm_folder), "ck": str(tiny_checkpoint), "tmp": str(tmp_path)}
    _one_line_error(run_cli(*[a.format(**fmt) for a in args]), match.format(**fmt))
    assert (tmp_path / "exists.onnx").read_bytes() == b"keep"


def _drop_args(max_drop):
    import argparse

    return argparse.Namespace(eval_windows=1, seq_len=64, json=True, max_drop=max_drop, exclude=[])


def _vision_workload():
    import torch
    from torch import nn

    from octoquant import workloads as wl

    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()]
    layers += [m for _ in range(8) for m in (nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    calib = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    return wl.Workload("tiny", "vision", model, None, False), calib


def test_max_drop_escalates_fallback_until_the_bound_holds(monkeypatch):
    """--max-drop control: 1, 2, 4 ... layers leave int8 until the (here: scripted) drop is within the bound."""
    import torch

    import octoquant as oq
    from octoquant import cli
    from octoquant import workloads as wl

    w, calib = _vision_workload()
    monkeypatch.setattr(wl, "eval_data", lambda w, windows: torch.randn(4, 3, 16, 16))

    def scripted(w_, ref, out):  # the drop falls by 3 points per float layer of the model last evaluated
        n_float = sum(r.status == "float" for r in oq.summary(state["model"], print_table=False))
        return {"metric": "m", "fp32": 1.0, "int8": 1.0, "drop_pct": 10.0 - 3.0 * n_float}

    state = {}
    real_outputs = wl.outputs
    monkeypatch.setattr(wl, "outputs", lambda w_, m, *a, **k: state.__setitem__("model", m) or real_outputs(w_, m, *a))
    monkeypatch.setattr(wl, "compare", scripted)
    q = oq.quantize(w.model, oq.W8A8, calib=calib, progress=False)
    q, drops = cli._within_drop(w, oq.W8A8, calib, _drop_args(1.0), q)
    assert drops == [10.0, 7.0, 4.0, -2.0]  # 0, 1, 2, then 4 layers out of int8
    assert sum(r.status == "float" for r in oq.summary(q, print_table=False)) == 4
    with pytest.raises(cli.UsageError, match="stays above 0.5%"):
        monkeypatch.setattr(wl, "compare", lambda *a: {"metric": "m", "fp32": 1.0, "int8": 0.5, "drop_pct": 50.0})
        cli._within_drop(w, oq.W8A8, calib, _drop_args(0.5), oq.quantize(w.model, oq.W8A8, calib=calib, progress=False))


def test_max_drop_argument_is_a_percentage(tiny_lm_folder, tmp_path):
    r = run_cli("quantize", str(tiny_lm_folder), "--max-drop", "lots", "--out", str(tmp_path / "q"))
    assert r.returncode == 2 and "not a percentage" in r.stderr
    _one_line_error(
        run_cli("quantize", str(tiny_lm_folder), "--stream", "--max-drop", "1%", "--out", str(tmp_path / "q")),
        "does not combine with --stream",
    )


def test_max_drop_on_text_models_moves_static_layers_to_dynamic_in_place(monkeypatch):
    """Text models: no re-quantization; the static Linears that gain most from per-token scales become dynamic,
    1, 2, 4 ... of them."""
    import torch
    from torch import nn

    import octoquant as oq
    from octoquant import cli
    from octoquant import workloads as wl
    from octoquant.nn import QLinear

    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(10) for m in (nn.Linear(16, 16), nn.GELU())]).eval()
    calib = [torch.randn(8, 16) for _ in range(2)]
    w = wl.Workload("tiny-text", "encoder", model, None, False)
    monkeypatch.setattr(wl, "eval_data", lambda w, windows: torch.randn(4, 16))

    def dynamic(m):
        return sum(isinstance(x, QLinear) and x.mode is oq.QuantMode.W8A8_DYNAMIC for x in m.modules())

    state = {}
    monkeypatch.setattr(wl, "outputs", lambda w_, m, *a, **k: state.__setitem__("model", m) or m(torch.ones(1, 16)))
    monkeypatch.setattr(
        wl,
        "compare",
        lambda w_, ref, out: {"metric": "m", "fp32": 1, "int8": 1, "drop_pct": 9.0 - 2 * dynamic(state["model"])},
    )
    monkeypatch.setattr(oq, "quantize", lambda *a, **k: pytest.fail("text models must not be re-quantized"))
    q = oq.convert.quantize(model, oq.W8A8, calib=calib, progress=False)
    gain = {n: 10 ** (-r.sqnr_db / 10) - 10 ** (-r.dynamic_sqnr_db / 10) for n, r in q.octoquant_layers.items()}
    q2, drops = cli._within_drop(w, oq.W8A8, calib, _drop_args(3.5), q)
    assert q2 is q and drops == [9.0, 7.0, 5.0, 1.0, 3.0]  # 0, 1, 2, 4 layers dynamic; bisection: 3 suffice
    moved = [n for n, m in q.named_modules() if isinstance(m, QLinear) and m.mode is oq.QuantMode.W8A8_DYNAMIC]
    assert sorted(moved) == sorted(sorted(gain, key=gain.get)[-3:])  # the three that gain most from dynamic
    assert all(q.octoquant_layers[n].mode == "w8a8_dynamic" for n in moved)
    static = [n for n, r in q.octoquant_layers.items() if r.mode == "w8a8_static"]
    assert len(static) == 7 and all(q.get_submodule(n).mode is oq.QuantMode.W8A8_STATIC for n in static)
    monkeypatch.setattr(wl, "compare", lambda *a: {"metric": "m", "fp32": 1, "int8": 0.5, "drop_pct": 50.0})
    with pytest.raises(cli.UsageError, match="stays at 50.00 > 0.5 even with all 10 static layers"):
        cli._within_drop(w, oq.W8A8, calib, _drop_args(0.5), q)


def test_gpt2_style_lm_head_folder_is_a_causal_lm(tmp_path, capsys):
    """An LM whose class is not named *ForCausalLM (GPT2LMHeadModel) is a causal LM: perplexity, not cosine, and its
    checkpoint loads back with its head (it was saved as a bare GPT2Model)."""
    import json

    T = pytest.importorskip("transformers")
    import torch

    from octoquant.models.minilm import load_minilm

    tok, _ = load_minilm()
    torch.manual_seed(0)
    lm = T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=len(tok), n_positions=128))
    lm.save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    r = run_in_process(capsys, "quantize", tmp_path / "gpt2", "--preset", "w8a8-dynamic", "--out", tmp_path / "q")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "q" / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    r = run_in_process(capsys, "eval", tmp_path / "q", "--windows", "2", "--seq-len", "64", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["task"] == "perplexity"


@pytest.fixture(scope="module")
def hf_vision_folder(tmp_path_factory):
    """A Hugging Face image classifier folder (tiny random ResNet, 64-pixel input with its own normalisation) and a
    folder of the user's images."""
    T = pytest.importorskip("transformers")
    import json

    import numpy as np
    import torch
    from PIL import Image

    from octoquant.evaluate.vision import load_photos

    root = tmp_path_factory.mktemp("vision")
    torch.manual_seed(0)
    cfg = T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)
    T.ResNetForImageClassification(cfg).save_pretrained(root / "resnet")
    pre = {"crop_size": {"height": 64, "width": 64}, "image_mean": [0.5] * 3, "image_std": [0.25] * 3}
    (root / "resnet" / "preprocessor_config.json").write_text(json.dumps(pre))
    (root / "images").mkdir()
    for i, photo in enumerate(load_photos()[:3]):
        Image.fromarray((photo.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(root / "images" / f"{i}.png")
    (root / "images" / "notes.md").write_text("not an image: ignored")
    return root


def test_hf_image_classifier_folder_quantizes_with_the_users_images(hf_vision_folder, tmp_path, capsys):
    import json

    from octoquant import workloads as wl

    root = hf_vision_folder
    w = wl.load_workload(str(root / "resnet"))
    assert w.kind == "vision" and w.image == wl.ImageSpec(64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert wl.calibration(w, None, 2, 0)[0].shape == (16, 3, 64, 64)
    out = tmp_path / "q"
    args = ("quantize", str(root / "resnet"), "--preset", "w8a8", "--calib", str(root / "images"), "--out", str(out))
    r = run_in_process(capsys, *args, "--calib-windows", "2", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["layers_int8"] == res["layers"] > 0
    r = run_in_process(capsys, "eval", out, "--data", root / "images", "--windows", "1", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["task"] == "top1" and 0.0 <= res["int8"] <= 1.0
    r = run_in_process(capsys, "export", out, "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert r.returncode == 0, r.stderr
    assert "QLinearConv" in r.stdout
    r = run_in_process(capsys, "export", out, "--exact", "--out", tmp_path / "exact.onnx")
    assert r.returncode == 0, r.stderr
    sqnr = float(re.search(r"SQNR (\S+) dB", r.stdout).group(1))  # octoquant's integers: only the pool's order
    assert sqnr >= 60.0, r.stdout
    wiki = ("quantize", str(root / "resnet"), "--calib", "wiki", "--out", str(tmp_path / "q2"))
    _one_line_error(run_cli(*wiki), "image or a folder of images")  # the real command line: one line, exit 2
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("text, not images")
    r = run_in_process(capsys, "quantize", root / "resnet", "--calib", empty, "--out", tmp_path / "q4")
    assert r.returncode == 2 and "image or a folder of images" in r.stderr
