"""oq.save / oq.load: safetensors round trips (bit-identical outputs), the compressed-tensors layout, bad input.

Random weights here prove the plumbing; the real-model round trips are in test_real_models.py.
"""

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import octoquant as oq
from octoquant.checkpoint import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, CheckpointError

transformers = pytest.importorskip("transformers")
from tests._tiny import tiny_llama  # noqa: E402


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24))
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        return self.head(self.pw(self.dw(self.stem(x))).mean((2, 3)))


def _trained_like(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics so that folding changes the weights."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def cnn_setup():
    torch.manual_seed(0)
    model = _trained_like(SmallCNN())
    calib = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    q = oq.quantize(model, oq.W8A8, calib=calib, keep_float=1, progress=False)
    return q, torch.randn(3, 3, 16, 16)


def _tiny_llama(tie: bool = True):
    return tiny_llama(tie=tie)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_cnn_round_trip_bit_identical(cnn_setup, tmp_path):
    q, x = cnn_setup
    statuses = {r.status for r in oq.summary(q, print_table=False)}
    assert statuses == {"int8", "float"}  # a float layer that gained a folded-BatchNorm bias travels too
    path = oq.save(q, tmp_path / "cnn")
    assert sorted(os.listdir(path)) == [WEIGHTS_NAME, CONFIG_NAME]
    q2 = oq.load(path, SmallCNN())
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))


def test_cnn_loads_into_meta_architecture(cnn_setup, tmp_path):
    q, x = cnn_setup
    path = oq.save(q, tmp_path / "cnn")
    with torch.device("meta"):
        arch = SmallCNN()
    q2 = oq.load(path, arch)
    assert not any(t.is_meta for t in q2.state_dict().values())
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))


def test_int8_weights_take_one_byte(cnn_setup, tmp_path):
    q, _ = cnn_setup
    path = oq.save(q, tmp_path / "cnn")
    with safe_open(str(path / WEIGHTS_NAME), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    quantized = [k for k in dtypes if k.endswith(".weight") and dtypes[k] == "I8"]
    assert quantized and all(dtypes[k.replace(".weight", ".weight_scale")] == "F32" for k in quantized)


@pytest.mark.parametrize(
    "config",
    [oq.W8A8_DYNAMIC, oq.W8A16, oq.W8A16.replace(weight_granularity=oq.PerGroup(32)), oq.W8A8],
    ids=["w8a8-dynamic", "w8a16", "w8a16-group32", "w8a8-static-uint8"],
)
def test_hf_folder_round_trip_without_architecture(config, tmp_path):
    model = _tiny_llama()
    ids = torch.randint(0, 120, (2, 12))
    calib = [torch.randint(0, 120, (2, 16)) for _ in range(3)] if config.mode is oq.QuantMode.W8A8_STATIC else None
    q = oq.quantize(model, config, calib=calib, progress=False)
    path = oq.save(q, tmp_path / "llama")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    q2 = oq.load(path)  # the architecture comes from config.json, weights never allocated twice
    with torch.no_grad():
        assert torch.equal(q(ids).logits, q2(ids).logits)


def test_tied_float_embedding_stored_once(tmp_path):
    model = _tiny_llama(tie=True)
    q = oq.quantize(model, oq.W8A8_DYNAMIC, exclude=["lm_head"], progress=False)
    assert q.lm_head.weight is q.model.embed_tokens.weight
    path = oq.save(q, tmp_path / "tied")
    with safe_open(str(path / WEIGHTS_NAME), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    q2 = oq.load(path)
    assert q2.lm_head.weight is q2.model.embed_tokens.weight  # one matrix, as saved
    ids = torch.randint(0, 120, (1, 7))
    with torch.no_grad():
        assert torch.equal(q(ids).logits, q2(ids).logits)


# ---------------------------------------------------------------------------------------------------------------
# compressed-tensors: its pydantic models and its own loader read our folders; we read its checkpoints


def _ct():
    return pytest.importorskip("compressed_tensors")


@pytest.mark.parametrize("config", [oq.W8A8_DYNAMIC, oq.W8A16, oq.W8A8], ids=["w8a8-dynamic", "w8a16", "w8a8-static"])
def test_compressed_tensors_reads_our_folder(config, tmp_path):
    _ct()
    from compressed_tensors.quantization import QuantizationConfig
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = _tiny_llama()
    calib = [torch.randint(0, 120, (2, 16)) for _ in range(3)] if config.mode is oq.QuantMode.W8A8_STATIC else None
    q = oq.quantize(model, config, calib=calib, progress=False)
    path = oq.save(q, tmp_path / "ours")
    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate(qcfg)  # raises on a config its models reject
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=CompressedTensorsConfig(run_compressed=False)
    )
    for name, m in q.named_modules():
        if isinstance(m, oq.nn.QLinear):
            ours = oq.dequantize(m.weight, m.weight_scale.reshape(m.out_features, -1), 0, oq.PerGroup(
                m.group_size or m.in_features))  # fmt: skip
            assert torch.equal(theirs.get_submodule(name).weight.detach().float(), ours), name
            if m.mode is oq.QuantMode.W8A8_STATIC:  # uint8 codes: the int8 zero-point of the format is ours - 128
                with safe_open(str(path / WEIGHTS_NAME), "pt") as f:
                    scale, zp = f.get_tensor(f"{name}.input_scale"), f.get_tensor(f"{name}.input_zero_point")
                assert scale.shape == (1,) and torch.equal(scale[0], m.input_scale), name
                assert zp.dtype == torch.int8 and int(zp) == int(m.input_zero_point) - 128, name


def test_we_read_a_checkpoint_compressed_tensors_wrote(tmp_path):
    _ct()
    from compressed_tensors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    model = _tiny_llama(tie=False)
    float_state = {k: v.clone() for k, v in model.state_dict().items()}
    scheme = {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True},
    }
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    for m in model.modules():
        if hasattr(m, "weight_scale"):
            m.weight_scale.data = (m.weight.abs().amax(dim=1, keepdim=True) / 127).to(m.weight_scale.dtype)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(tmp_path / "theirs")
    compressor.update_config(tmp_path / "theirs")

    q = oq.load(tmp_path / "theirs")
    qlin = [n for n, m in q.named_modules() if isinstance(m, oq.nn.QLinear)]
    assert len(qlin) == 14 and "lm_head" not in qlin
    with safe_open(str(tmp_path / "theirs" / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.1.mlp.down_proj.weight")
    assert torch.equal(q.model.layers[1].mlp.down_proj.weight, w)  # their int8 codes, unchanged
    ref = _tiny_llama(tie=False)
    ref.load_state_dict(float_state)
    ids = torch.randint(0, 120, (1, 10))
    with torch.no_grad():
        cos = oq.cosine_similarity(q(ids).logits, ref(ids).logits).item()
    assert cos > 0.999  # int8 weights + per-token activations on a random tiny model


# ---------------------------------------------------------------------------------------------------------------
# bad input: clear errors, nothing written partially, the source untouched


@pytest.fixture()
def saved(cnn_setup, tmp_path):
    q, _ = cnn_setup
    return oq.save(q, tmp_path / "ckpt")


def _rewrite(path: Path, edit) -> None:
    file = path / WEIGHTS_NAME
    with safe_open(str(file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(file))


def _first_key(path: Path, suffix: str) -> str:
    with safe_open(str(path / WEIGHTS_NAME), "pt") as f:
        return next(k for k in sorted(f.keys()) if k.endswith(suffix))


def _truncate(p: Path) -> None:
    f = p / WEIGHTS_NAME
    f.write_bytes(f.read_bytes()[:-100])


def _header_lie(p: Path) -> None:
    f = p / WEIGHTS_NAME
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 2**40) + data[8:])


def _wrong_dtype(p: Path) -> None:
    k = _first_key(p, ".weight_scale")
    _rewrite(p, lambda t: t.__setitem__(k, t[k].to(torch.float16)))


def _wrong_shape(p: Path) -> None:
    k = _first_key(p, ".weight_scale")
    _rewrite(p, lambda t: t.__setitem__(k, t[k][:-1].clone()))


def _missing_scale(p: Path) -> None:
    k = _first_key(p, ".weight_scale")
    _rewrite(p, lambda t: t.pop(k))


def _nan_scale(p: Path) -> None:
    k = _first_key(p, ".weight_scale")

    def edit(t):
        t[k] = t[k].clone()
        t[k][0] = float("nan")

    _rewrite(p, edit)


def _future_version(p: Path) -> None:
    meta = json.loads((p / CONFIG_NAME).read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (p / CONFIG_NAME).write_text(json.dumps(meta))


BAD = {
    "truncated": (_truncate, "not a valid safetensors file"),
    "header-length-lie": (_header_lie, "not a valid safetensors file"),
    "wrong-dtype": (_wrong_dtype, "torch.float16"),
    "wrong-shape": (_wrong_shape, "the model expects"),
    "missing-scale": (_missing_scale, "missing tensors"),
    "nan-scale": (_nan_scale, "non-finite"),
    "future-version": (_future_version, "newer than this octoquant"),
}


@pytest.mark.parametrize("damage,match", list(BAD.values()), ids=list(BAD))
def test_damaged_checkpoint_clear_error_source_untouched(saved, damage, match):
    damage(saved)
    before = _digest(saved)
    with pytest.raises(CheckpointError, match=match):
        oq.load(saved, SmallCNN())
    assert _digest(saved) == before


def test_existing_output_refused_then_overwritten(cnn_setup, saved):
    q, x = cnn_setup
    before = _digest(saved)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        oq.save(q, saved)
    assert _digest(saved) == before
    oq.save(q, saved, overwrite=True)
    with torch.no_grad():
        assert torch.equal(oq.load(saved, SmallCNN())(x), q(x))
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]  # no temporary folders left


def test_failed_write_leaves_nothing(cnn_setup, tmp_path, monkeypatch):
    import safetensors.torch

    q, _ = cnn_setup

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        oq.save(q, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_unquantized_model_refused(tmp_path):
    with pytest.raises(CheckpointError, match="quantize it first"):
        oq.save(SmallCNN(), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_wrong_architecture_named(saved):
    with pytest.raises(CheckpointError, match="has no module"):
        oq.load(saved, nn.Sequential(nn.Linear(3, 3)))


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a quantized checkpoint"):
        oq.load(tmp_path)
