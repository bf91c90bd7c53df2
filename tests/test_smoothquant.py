"""SmoothQuant: a float identity on known architectures, an accuracy gain where activation outliers live."""

import logging

import pytest
import torch

import octoquant as oq
from octoquant.transforms.smoothquant import discover_pairs, find_pairs, smooth

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


# ---------------------------------------------------------------------------------------------------------------
# Pair discovery on architectures without a table entry: traced candidates, kept only where they fold exactly


def _tiny(config_cls, model_cls, **kw):
    torch.manual_seed(0)
    return model_cls(config_cls(vocab_size=100, num_hidden_layers=2, **kw)).eval()


_UNKNOWN = {  # model_type -> (tiny model, the block-0 pairs a correct search finds, names after "layers.0.")
    "gpt_neox": (
        lambda: _tiny(
            transformers.GPTNeoXConfig,
            transformers.GPTNeoXForCausalLM,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
        ),
        {("input_layernorm", ("attention.query_key_value",)), ("post_attention_layernorm", ("mlp.dense_h_to_4h",))},
    ),
    "opt": (  # pre-norm; attention is linear in V and ReLU is positively homogeneous: v -> out and fc1 -> fc2 too
        lambda: _tiny(
            transformers.OPTConfig,
            transformers.OPTForCausalLM,
            hidden_size=64,
            ffn_dim=128,
            num_attention_heads=4,
            word_embed_proj_dim=64,
        ),
        {
            ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("final_layer_norm", ("fc1",)),
            ("self_attn.v_proj", ("self_attn.out_proj",)),
            ("fc1", ("fc2",)),
        },
    ),
    "phi3": (  # fused qkv and gate_up projections
        lambda: _tiny(
            transformers.Phi3Config,
            transformers.Phi3ForCausalLM,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=4,
            pad_token_id=0,
        ),
        {("input_layernorm", ("self_attn.qkv_proj",)), ("post_attention_layernorm", ("mlp.gate_up_proj",))},
    ),
    "gemma": (  # its norms compute (1 + weight) * x_hat: folded as (1 + weight) / s - 1
        lambda: _tiny(
            transformers.GemmaConfig,
            transformers.GemmaForCausalLM,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        ),
        {
            ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
            ("mlp.up_proj", ("mlp.down_proj",)),
        },
    ),
    "bert": (  # post-norm: every LayerNorm output also feeds a residual add, nothing folds
        lambda: _tiny(
            transformers.BertConfig,
            transformers.BertModel,
            hidden_size=32,
            num_attention_heads=2,
            intermediate_size=64,
        ),
        set(),
    ),
}


def _block0(pairs) -> set:
    out = set()
    for p in pairs:
        for marker in ("layers.0.", "layer.0."):
            if marker in p.producer:
                out.add((p.producer.split(marker)[1], tuple(c.split(marker)[1] for c in p.consumers)))
    return out


def _run_on(model, ids):
    return lambda: model(ids)[0].detach().float()


@pytest.mark.parametrize("name", sorted(_UNKNOWN))
def test_discovered_pairs_are_exactly_the_foldable_ones(name):
    make, expected = _UNKNOWN[name]
    model = make()
    ids = torch.randint(0, 100, (1, 20), generator=torch.Generator().manual_seed(3))
    pairs, rejected = discover_pairs(model, _run_on(model, ids))
    assert _block0(pairs) == expected
    assert rejected  # candidates were tested, not only found
    assert len(pairs) == 2 * len(expected)  # the same pairs in block 1
    offsets = {p.norm_offset for p in pairs if "norm" in p.producer}
    assert offsets <= ({1.0} if name == "gemma" else {0.0})
    if pairs:  # smoothing along them is a float identity
        ref = _run_on(model, ids)()
        smooth(model, lambda: [model(b) for b in _calib()], oq.QuantMode.W8A8_DYNAMIC, pairs)
        out = _run_on(model, ids)()
        assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_discovery_agrees_with_the_architecture_table(make):
    model = make()
    ids = torch.randint(0, 100, (1, 20), generator=torch.Generator().manual_seed(3))
    pairs, _ = discover_pairs(model, _run_on(model, ids))
    assert {(p.producer, p.consumers) for p in pairs} == {(p.producer, p.consumers) for p in find_pairs(model)}


def test_discovery_on_a_plain_torch_model():
    """No Hugging Face config at all: a pre-norm MLP block with a residual, written in plain torch."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(32)
            self.fc1, self.fc2 = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)
            self.gelu_in, self.gelu_out = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)

        def forward(self, x):
            x = x + self.fc2(torch.relu(self.fc1(self.norm(x))))
            return x + self.gelu_out(torch.nn.functional.gelu(self.gelu_in(x)))

    torch.manual_seed(0)
    model = torch.nn.Sequential(Block(), Block()).eval()
    x = torch.randn(4, 32)
    pairs, rejected = discover_pairs(model, lambda: model(x))
    found = {(p.producer, p.consumers) for p in pairs}
    assert found == {(f"{i}.norm", (f"{i}.fc1",)) for i in "01"} | {(f"{i}.fc1", (f"{i}.fc2",)) for i in "01"}
    assert ("0.gelu_in", ("0.gelu_out",)) in {(p.producer, p.consumers) for p in rejected}


def _neox(outlier_gain: float = 1.0):
    model = _UNKNOWN["gpt_neox"][0]()
    for layer in model.gpt_neox.layers:
        layer.input_layernorm.weight.data[[3, 17]] *= outlier_gain
        layer.post_attention_layernorm.weight.data[[5, 40]] *= outlier_gain
    return model


def test_smoothquant_on_an_architecture_without_a_table_entry():
    """oq.quantize on GPT-NeoX (not in the table): pairs found by tracing, outlier error reduced."""
    model = _neox(outlier_gain=40.0)
    assert find_pairs(model) is None
    ids = torch.randint(0, 100, (8, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(ids).logits
    errs = {}
    for sq in (False, True):
        q = oq.quantize(model, oq.W8A8_DYNAMIC.replace(smoothquant=sq), calib=_calib(), progress=False)
        with torch.no_grad():
            errs[sq] = (q(ids).logits - ref).pow(2).mean().item()
    assert q.octoquant_smoothquant["gpt_neox.layers.0.input_layernorm"] is not None
    assert errs[True] < 0.7 * errs[False], errs


def test_traced_pairs_are_smoothed_only_where_activations_have_outlier_channels():
    """Outside the table, a pair is searched only if its input has an outlier channel (SmoothQuant's case)."""
    chosen = oq.quantize(_neox(1.0), oq.W8A8, calib=_calib(), progress=False).octoquant_smoothquant
    assert chosen and all(a is None for a in chosen.values())  # random weights: no outlier channel anywhere
    chosen = oq.quantize(_neox(40.0), oq.W8A8, calib=_calib(), progress=False).octoquant_smoothquant
    assert chosen["gpt_neox.layers.0.input_layernorm"] is not None


@pytest.mark.parametrize("config", [oq.W8A8_DYNAMIC, oq.W8A8, oq.W8A16], ids=["dynamic", "static", "weight-only"])
def test_smoothquant_reduces_error_on_outlier_channels(config):
    # weight-only: the same search on float activations scales up the weight columns that meet large inputs
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


def test_probe_sample_is_one_short_sample():
    from octoquant.convert import PROBE_TOKENS, _probe_sample

    ids = torch.randint(0, 100, (3, 200))
    assert torch.equal(_probe_sample(ids), ids[:1, :PROBE_TOKENS])
    batch = _probe_sample({"input_ids": ids, "attention_mask": torch.ones(3, 200), "scale": torch.tensor(2.0)})
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (1, PROBE_TOKENS)
    assert batch["scale"].dim() == 0  # not batch-shaped: as given
    images = torch.randn(4, 3, 8, 8)
    a, b = _probe_sample((images, images))
    assert torch.equal(a, images[:1]) and torch.equal(b, images[:1])


def test_a_norm_whose_weight_cannot_divide_its_output_is_not_smoothed():
    class SquareNorm(torch.nn.Module):  # (weight ** 2) * x: neither weight / s nor (1 + weight) / s - 1 divides it
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.rand(16) + 0.5)

        def forward(self, x):
            return x * self.weight**2

    torch.manual_seed(0)
    model = torch.nn.Sequential(SquareNorm(), torch.nn.Linear(16, 8)).eval()
    x = torch.randn(4, 16)
    pairs, rejected = discover_pairs(model, lambda: model(x))
    assert pairs == [] and [(p.producer, p.consumers) for p in rejected] == [("0", ("1",))]


def test_pair_search_refuses_a_model_that_is_not_deterministic(caplog):
    model = torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.Linear(16, 8), torch.nn.Dropout(0.5)).train()
    x = torch.randn(4, 16)
    with caplog.at_level(logging.WARNING, logger="octoquant"):
        assert discover_pairs(model, lambda: model(x)) == ([], [])
    assert "changes between identical runs" in caplog.text
