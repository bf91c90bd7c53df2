"""`octoquant report`: the measured table, its files and plots, rendered in headless Chromium.

A tiny random Llama (with the MiniLM tokenizer) proves the plumbing quickly; the README's main job runs the same
code on SmolLM2 (see README.md for its measured table).
"""

import json
import re
import shutil
import subprocess

import pytest
import torch

from octoquant import report


@pytest.fixture(scope="module")
def tiny_report(tiny_lm_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("rep") / "report"
    torch.manual_seed(0)
    result = report.run(str(tiny_lm_folder), out, calib_windows=2, eval_windows=2, seq_len=64, reps=1, progress=False)
    return out, result


def test_report_files_and_table_match_the_json(tiny_report):
    out, result = tiny_report
    for name in ("report.json", "report.md", "index.html", "sqnr.png", "activations.png", "latency.png"):
        assert (out / name).is_file(), name
    assert (out / "checkpoint" / "model.safetensors").is_file()
    saved = json.loads((out / "report.json").read_text())
    assert saved["accuracy"] == result["accuracy"] and saved["preset"] == "smoothquant"
    # every number in report.md is the measured one, formatted from the JSON
    md = (out / "report.md").read_text()
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]]
        for line in md.splitlines()
        if line.startswith("| ") and not line.startswith("| |")
    }
    acc = saved["accuracy"]
    assert rows["perplexity"][0] == f"{acc['fp32']:.3f}" and rows["perplexity"][1] == f"{acc['int8']:.3f}"
    assert rows["perplexity"][2] == f"change {acc['drop_pct']:+.2f}%"
    assert acc["drop_pct"] == pytest.approx(100 * (acc["int8"] / acc["fp32"] - 1))
    mem = saved["memory"]
    assert rows["bytes per weight (Linear / Conv)"][:2] == [
        f"{mem['fp32']['bytes_per_weight']:.2f}",
        f"{mem['int8']['bytes_per_weight']:.2f}",
    ]
    assert mem["fp32"]["bytes_per_weight"] == pytest.approx(4.0)
    assert 1.0 <= mem["int8"]["bytes_per_weight"] < 1.2  # int8 weights + float32 scales
    ck = (out / "checkpoint" / "model.safetensors").stat().st_size
    assert saved["checkpoint"]["int8_bytes"] == ck and rows["checkpoint (MB)"][1] == f"{ck / 1e6:.1f}"
    for s in saved["speed"]:
        row = rows[f"{s['what']} ({s['unit']})"]
        assert row[:2] == [f"{s['fp32']['throughput']:.1f}", f"{s['int8']['throughput']:.1f}"]
    assert rows["CPU-seconds per token"][0] == f"{saved['speed'][0]['fp32']['cpu_s_per_item']:.4f}"
    assert rows["layers int8"][1] == f"{saved['layers_int8']}/{len(saved['layers'])}"
    # the terminal table is the same table
    term = report.terminal(saved)
    assert all(v in term for v in rows["perplexity"][:2])


def test_activation_plot_data_has_each_calibrator(tiny_report):
    _, result = tiny_report
    assert len(result["activations"]) == 3  # the three least-SQNR layers
    for a in result["activations"].values():
        assert set(a["clip"]) == set(report.CALIBRATORS)
        lo, hi = a["clip"]["minmax"]
        assert lo <= a["min"] + 1e-6 and hi >= a["max"] - 1e-6  # min-max covers every value
        for kind in ("percentile", "entropy", "mse"):  # the others clip inside it
            assert a["clip"][kind][1] <= hi + 1e-5


def _chromium_dom(path) -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium not installed (scripts/setup.sh installs it)")
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--virtual-time-budget=5000",
        "--dump-dom",
        path.as_uri(),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout


def test_html_renders_in_chromium_with_every_image(tiny_report, tmp_path):
    out, _ = tiny_report
    dom = _chromium_dom(out / "index.html")
    assert 'data-images="ok"' in dom, dom[-500:]
    assert "perplexity" in dom
    # the check can fail: a report missing a plot is caught
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "latency.png").unlink()
    assert re.search(r'data-images="missing:latency\.png"', _chromium_dom(broken / "index.html"))


def test_report_refuses_existing_folder_and_quantized_model(tiny_report, tmp_path):
    out, _ = tiny_report
    with pytest.raises(FileExistsError, match="exists"):
        report.run("mobilenetv2", out)
    with pytest.raises(ValueError, match="already quantized"):
        report.run(str(out / "checkpoint"), tmp_path / "r2")


def test_readme_documents_the_current_table(tiny_report):
    """The README shows the report's table: its row labels are the ones the code prints today."""
    from pathlib import Path

    _, result = tiny_report
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("The report ends with this table")[1].split("```")[1]
    labels = [r[0] for r in report.table(result)]
    for label in labels:
        assert label in block, label
