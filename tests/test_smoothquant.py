"""SmoothQuant: a float identity on known architectures, an accuracy gain where activation outliers live."""

import logging

import pytest
import torch

import octoquant as oq
from octoquant.transforms.smoothquant import find_pairs, smooth

transformers = pytest.importorskip("transformers")
from tests._tiny import tiny_llama  # noqa: E402


def _llama(outlier_gain: float = 1.0):
    m = tiny_llama(vocab=100)
    for layer in m.model.layers:  # LLM-like activation outliers: a few channels of the norm output x gain
        layer.input_layernorm.weight.data[[3, 17]] *= outlier_gain
        layer.post_attention_layernorm.weight.data[[5, 40]] *= outlier_gain
    return m


def _gpt2():
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 100, (2, 24), generator=g) for _ in range(4)]


@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_smoothing_is_a_float_identity(make):
    model = make()
    ids = torch.randint(0, 100, (2, 20))
    with torch.no_grad():
        ref = model(ids).logits
    pairs = find_pairs(model)
    assert pairs and all(len(p.consumers) >= 1 for p in pairs)
    chosen = smooth(model, lambda: [model(b) for b in _calib()], oq.QuantMode.W8A8_DYNAMIC, pairs)
    assert set(chosen) == {p.producer for p in pairs}
    with torch.no_grad():
        out = model(ids).logits
    # float rounding only: the scales move between norm/linear weights and the next linears' columns
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_llama_pairs_cover_attention_mlp_and_down_proj():
    pairs = {p.producer: p.consumers for p in find_pairs(_llama())}
    assert pairs["model.layers.0.input_layernorm"] == (
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj",
    )
    mlp = ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj")
    assert pairs["model.layers.1.post_attention_layernorm"] == mlp
    assert pairs["model.layers.1.mlp.up_proj"] == ("model.layers.1.mlp.down_proj",)


@pytest.mark.parametrize("config", [oq.W8A8_DYNAMIC, oq.W8A8], ids=["dynamic", "static"])
def test_smoothquant_reduces_error_on_outlier_channels(config):
    model = _llama(outlier_gain=40.0)
    ids = torch.randint(0, 100, (8, 32), generator=torch.Generator().manual_seed(7))  # enough tokens for a stable mean
    with torch.no_grad():
        ref = model(ids).logits
    errs = {}
    for sq in (False, True):
        q = oq.quantize(model, config.replace(smoothquant=sq), calib=_calib(), progress=False)
        with torch.no_grad():
            errs[sq] = (q(ids).logits - ref).pow(2).mean().item()
        if sq:
            chosen = q.octoquant_smoothquant
            assert chosen["model.layers.0.input_layernorm"] is not None  # the outlier pair was smoothed
    assert errs[True] < 0.7 * errs[False], errs


def test_unknown_transformer_warns_and_still_quantizes(caplog):
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100
    )
    model = transformers.BertModel(cfg).eval()
    with caplog.at_level(logging.WARNING, logger="octoquant"):
        q = oq.quantize(model, oq.W8A8_DYNAMIC, calib=_calib(), progress=False)
    assert "SmoothQuant skipped" in caplog.text and "encoder.layer.0" in caplog.text
    assert all(r.status == "int8" for r in oq.summary(q, print_table=False))


def test_smoothquant_off_by_config():
    q = oq.quantize(_llama(), oq.W8A8_DYNAMIC.replace(smoothquant=False), calib=_calib(), progress=False)
    assert not hasattr(q, "octoquant_smoothquant")


# ---------------------------------------------------------------------------------------------------------------
# LLM.int8(): outlier input columns in float, the rest int8


def test_llm_int8_outlier_columns_beat_plain_per_token():
    model = _llama(outlier_gain=40.0)
    ids = torch.randint(0, 100, (8, 32), generator=torch.Generator().manual_seed(7))  # enough tokens for a stable mean
    with torch.no_grad():
        ref = model(ids).logits
        plain = oq.quantize(model, oq.W8A8_DYNAMIC, progress=False)(ids).logits
        q = oq.quantize(model, oq.LLM_INT8, progress=False)
        out = q(ids).logits
    assert q.model.layers[0].self_attn.q_proj.outlier_threshold == 6.0
    assert (out - ref).pow(2).mean() < 0.5 * (plain - ref).pow(2).mean()


def test_llm_int8_decomposition_is_exact_split():
    """Outlier columns in float + the rest through the int8 kernel == the two parts computed separately."""
    from octoquant.nn import QLinear
    from octoquant.nn.linear import linear_dynamic_outliers

    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 8)
    q = QLinear.from_float(lin, "w8a8_dynamic", outlier_threshold=6.0, backend="reference")
    x = torch.randn(5, 32)
    x[:, 7] *= 20.0  # one outlier column
    y = linear_dynamic_outliers(q.backend, x, q.packed(), q.weight, q.weight_scale, 6.0)
    inliers = x.clone()
    inliers[:, 7] = 0.0
    w7 = q.weight[:, 7].float() * q.weight_scale
    expected = q.backend.linear_dynamic(inliers, q.packed()) + x[:, 7:8] @ w7.reshape(1, -1)
    assert torch.equal(y, expected)
    assert torch.equal(q(x), y)


def test_outlier_threshold_only_for_dynamic():
    with pytest.raises(ValueError, match="dynamic W8A8 only"):
        oq.W8A8.replace(outlier_threshold=6.0)


def test_dynamic_fallback_skips_the_weight_only_head():
    """Static W8A8 + fallback on an LLM: the W8A16 (group) head is never turned into an invalid dynamic layer."""
    q = oq.quantize(_llama(), oq.W8A8, calib=_calib(), keep_float=20, fallback="dynamic", progress=False)
    modes = {r.name: r.mode for r in oq.summary(q, print_table=False)}
    assert modes["lm_head"] == "w8a16"
    assert sum(m == "w8a8_dynamic" for m in modes.values()) >= 1
