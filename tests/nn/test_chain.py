"""ConvChain: consecutive QConv2d layers hand over uint8 codes; the result is bit-identical to running them one by
one, the module tree and state dict are unchanged, and anything observing the layers gets the plain path."""

import copy
import gc
import pickle
from collections import OrderedDict

import pytest
import torch
from torch import nn

import octoquant as oq
from octoquant.kernels import available_isas
from octoquant.kernels.cpu import ChainPlan
from octoquant.nn import ConvChain, QConv2d, chain_convolutions

BACKENDS = ["reference"] + (["cpu"] if "avx2" in available_isas() else [])


class Residual(nn.Module):
    """A block with its own forward: a chain boundary (its inner Sequential may chain)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Sequential(nn.Conv2d(c, 4 * c, 1), nn.BatchNorm2d(4 * c), nn.ReLU6()),
            nn.Sequential(nn.Conv2d(4 * c, 4 * c, 3, padding=1, groups=4 * c), nn.BatchNorm2d(4 * c), nn.ReLU6()),
            nn.Conv2d(4 * c, c, 1),
        )

    def forward(self, x):
        return x + self.conv(x)


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2),  # grouped, dilated
        nn.ReLU(),
        Residual(8),
        nn.MaxPool2d(2),  # not a convolution: the chain hands it float
        nn.Conv2d(8, 12, 1, stride=2),
        nn.Conv2d(12, 5, 3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return with_bn_statistics(m)


def with_bn_statistics(m: nn.Module) -> nn.Module:
    """`m` in eval mode with non-trivial BatchNorm statistics (so that folding them changes the weights)."""
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


@pytest.fixture(scope="module")
def calib():
    torch.manual_seed(1)
    return [torch.randn(4, 3, 32, 32) for _ in range(3)]


def _unchained(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer-by-layer result: a forward hook on every QConv2d makes each ConvChain run them one by one."""
    handles = [m.register_forward_hook(lambda *a: None) for m in model.modules() if isinstance(m, QConv2d)]
    try:
        return model(x)
    finally:
        for h in handles:
            h.remove()


def _spy_requantized(monkeypatch, model) -> list:
    """Record the out_q of every QConv2d.forward_codes call (not None = an epilogue wrote codes for the next
    layer; the plain path calls it with None, or not at all), and for a run of layers executed as one kernel
    program (cpu backend) one "program" entry per layer that handed its codes on."""
    calls = []
    orig = QConv2d.forward_codes

    def spy(self, a, in_q, out_q=None, scratch_slot=None):
        calls.append(out_q)
        return orig(self, a, in_q, out_q, scratch_slot)

    monkeypatch.setattr(QConv2d, "forward_codes", spy)
    if "cpu" in BACKENDS:
        orig_plan = ChainPlan.__call__

        def spy_plan(self, *args, **kwargs):
            calls.extend(["program"] * self.handovers)
            return orig_plan(self, *args, **kwargs)

        monkeypatch.setattr(ChainPlan, "__call__", spy_plan)
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_chained_model_is_bit_identical_and_hands_over_codes(backend, calib, monkeypatch):
    float_model = small_cnn()
    q = oq.quantize(float_model, oq.W8A8, calib=calib, backend=backend, progress=False)
    chains = [n for n, m in q.named_modules() if isinstance(m, ConvChain)]
    # the root Sequential (stem conv -> grouped conv; 1x1 s2 -> 3x3) and the residual block's inner Sequential
    assert sorted(chains) == ["", "4.conv"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        calls = _spy_requantized(monkeypatch, q)
        y = q(x)
        requantized = sum(c is not None for c in calls)
        calls.clear()
        y_plain = _unchained(q, x)
    assert requantized == 4  # stem -> grouped, expand -> depthwise -> project, 1x1 s2 -> 3x3
    # hooks: the plain path, each linked layer requantizing for its reader on its own and handing over the
    # dequantized codes (which the reader quantizes back): the same numbers
    assert sum(c is not None for c in calls) == 4 and "program" not in calls
    assert sum(m.reader is not None for m in q.modules() if isinstance(m, QConv2d)) == 4
    assert torch.equal(y, y_plain)
    assert oq.sqnr_db(float_model(x), y) > 25  # and it is still the quantized model of the float one


def test_state_dict_keys_unchanged_and_reload(calib):
    float_model = small_cnn()
    q = oq.quantize(float_model, oq.W8A8, calib=calib, progress=False)
    plain = Residual(8)
    plain.conv = nn.Sequential(OrderedDict(q[4].conv._modules))  # the same children in a plain Sequential
    assert isinstance(q[4].conv, ConvChain)
    assert list(q[4].state_dict()) == list(plain.state_dict())
    again = copy.deepcopy(q)
    again.load_state_dict(q.state_dict())
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(again(x), q(x))


def test_copies_and_pickles_after_running(calib):
    """A model that has run (packed weights, call plans holding raw addresses, cached structure) deep-copies and
    pickles: the copy packs its own weights and runs the same after the original is gone."""
    q = oq.quantize(small_cnn(), oq.W8A8, calib=calib, progress=False)
    x = torch.randn(2, 3, 32, 32)
    y = q(x)
    twin = copy.deepcopy(q)
    blob = pickle.dumps(q)  # call plans are closures: pickling fails if they are part of the state
    del q
    gc.collect()
    assert torch.equal(twin(x), y)
    assert torch.equal(pickle.loads(blob)(x), y)  # our own object, serialized just above


def test_swapped_child_is_seen(calib):
    """Layers are looked up at each call: swapping a child (fallback to float) takes effect."""
    q = oq.quantize(small_cnn(), oq.W8A8, calib=calib, progress=False)
    x = torch.randn(1, 3, 32, 32)
    before = q(x)
    q[4].conv[2] = nn.Conv2d(32, 8, 1)  # the project conv back in float (random weights: a different output)
    after = q(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, _unchained(q, x))
    # inside a nested Sequential the chain looks through (its structure is cached between calls)
    q[4].conv[0][0] = nn.Conv2d(8, 32, 1)
    nested = q(x)
    assert not torch.equal(nested, after)
    assert torch.equal(nested, _unchained(q, x))
    # new weights in place (load_state_dict repacks): the chain runs the new weights
    reloaded = copy.deepcopy(q)
    sd = reloaded.state_dict()
    sd["0.weight"] = torch.flip(sd["0.weight"], dims=[0])
    reloaded.load_state_dict(sd)
    assert not torch.equal(reloaded(x), nested)
    assert torch.equal(reloaded(x), _unchained(reloaded, x))


def test_non_float32_input_takes_plain_path(calib):
    q = oq.quantize(small_cnn(), oq.W8A8, calib=calib, progress=False)
    x = torch.randn(1, 3, 32, 32)
    y16 = q(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    assert torch.equal(y16, _unchained(q, x.to(torch.bfloat16)))


def test_dynamic_consumer_is_not_linked():
    conv = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1))
    seq = nn.Sequential(*(QConv2d.from_float(c, mode="w8a8_dynamic") for c in conv))
    assert chain_convolutions(seq) is seq  # a dynamic consumer needs its float input's range


def test_chain_of_root_and_nested(calib):
    seq = nn.Sequential(
        nn.Sequential(QConv2d.from_float(nn.Conv2d(3, 4, 1), input_range=(-3.0, 3.0)), nn.Identity()),
        QConv2d.from_float(nn.Conv2d(4, 4, 1), input_range=(-1.0, 1.0)),
    )
    chained = chain_convolutions(seq)
    assert isinstance(chained, ConvChain) and chained is not seq
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(chained(x), seq(x))


def test_global_hooks_take_plain_path(calib, monkeypatch):
    q = oq.quantize(small_cnn(), oq.W8A8, calib=calib, progress=False)
    x = torch.randn(1, 3, 32, 32)
    calls = _spy_requantized(monkeypatch, q)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    try:
        y = q(x)
    finally:
        handle.remove()
    # layer by layer: every QConv2d called (and seen by the hook), no kernel program over several layers
    assert seen.count("QConv2d") == sum(isinstance(m, QConv2d) for m in q.modules()) and "program" not in calls
    calls.clear()
    assert torch.equal(q(x), y) and any(c is not None for c in calls)  # hook gone: chained again, same result


def test_each_input_shape_gets_its_own_program(calib):
    """The kernel program of a run of layers is built per input shape: shapes in turn, each bit-identical."""
    q = oq.quantize(small_cnn(), oq.W8A8, calib=calib, progress=False)
    for shape in [(1, 3, 32, 32), (2, 3, 24, 40), (1, 3, 32, 32), (3, 3, 40, 28)]:
        x = torch.randn(shape)
        assert torch.equal(q(x), _unchained(q, x))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="no fast backend on this CPU")
def test_chain_program_refuses_specs_that_do_not_chain():
    from octoquant.config import QDtype
    from octoquant.kernels import get_backend
    from octoquant.kernels.reference import ActivationQParams

    be = get_backend("cpu")
    a, b = (QConv2d.from_float(nn.Conv2d(4, 4, 1), input_range=(-1.0, 1.0), backend="cpu") for _ in range(2))
    q = ActivationQParams(0.01, 0, QDtype.INT8)
    geometry = ((1, 1), (0, 0), (1, 1), q)
    codes_out = be.conv_spec((1, 5, 5, 4), a.packed(), *geometry, q)
    float_out = be.conv_spec((1, 5, 5, 4), b.packed(), *geometry)
    assert be.chain_program([codes_out, float_out]).handovers == 1
    with pytest.raises(ValueError, match="must chain"):
        be.chain_program([float_out, float_out])  # the first must hand codes on
    with pytest.raises(ValueError, match="must chain"):
        be.chain_program([codes_out, be.conv_spec((1, 6, 6, 4), b.packed(), *geometry)])  # shapes differ
