import pytest
import torch
from torch import nn

import octoquant as oq
import octoquant.kernels.cpu as cpu_kernels
from octoquant.kernels import available_isas
from octoquant.nn import QConv2d, QLinear

# SQNR floors on Gaussian data (dB). int8 per-channel weights alone give ~48 dB on a Gaussian layer;
# quantizing the activations too costs a few dB; 35 dB leaves margin for the seeds and shapes below
# while failing loudly on any real bug (a wrong scale or transposed weight gives < 10 dB).
SQNR_W8A16_DB = 40.0
SQNR_W8A8_DB = 35.0
SQNR_CONV_DB = 35.0

BACKENDS = ["reference"] + (["cpu"] if "avx2" in available_isas() else [])


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def _calibrated_range(x):
    return float(x.min()), float(x.max())


@pytest.mark.parametrize(
    "mode,kwargs,floor",
    [
        ("w8a8_dynamic", {}, SQNR_W8A8_DB),
        ("w8a8_static", {"input_dtype": "int8"}, SQNR_W8A8_DB),
        ("w8a8_static", {"input_dtype": "uint8"}, SQNR_W8A8_DB),
        ("w8a16", {}, SQNR_W8A16_DB),
        ("w8a16", {"group_size": 32}, SQNR_W8A16_DB),
    ],
    ids=["dynamic", "static-s8", "static-u8", "w8a16", "w8a16-g32"],
)
def test_qlinear_sqnr(backend, mode, kwargs, floor):
    lin = nn.Linear(128, 96)
    x = torch.randn(4, 10, 128)
    if mode == "w8a8_static":
        kwargs = {**kwargs, "input_range": _calibrated_range(x)}
    q = QLinear.from_float(lin, mode, backend=backend, **kwargs)
    y = q(x)
    assert y.shape == (4, 10, 96) and y.dtype == torch.float32
    assert oq.sqnr_db(lin(x), y) >= floor


def test_qlinear_backends_agree():
    if "cpu" not in BACKENDS:
        pytest.skip("no fast backend on this CPU")
    lin, x = nn.Linear(64, 40), torch.randn(7, 64)
    a = QLinear.from_float(lin, "w8a8_dynamic", backend="reference")
    b = QLinear.from_float(lin, "w8a8_dynamic", backend="cpu")
    assert torch.equal(a.weight, b.weight)
    assert torch.allclose(a(x), b(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "cfg", [(16, 32, 3, 1, 1, 1), (24, 24, 3, 2, 1, 24), (32, 16, 1, 1, 0, 1)], ids=["3x3", "dw-s2", "1x1"]
)
def test_qconv2d_sqnr(backend, cfg):
    c, o, k, s, p, g = cfg
    conv = nn.Conv2d(c, o, k, s, p, groups=g)
    x = torch.randn(2, c, 12, 12).relu()  # post-ReLU input: the uint8 asymmetric default fits
    q = QConv2d.from_float(conv, input_range=_calibrated_range(x), backend=backend)
    y = q(x)
    assert y.shape == conv(x).shape
    assert oq.sqnr_db(conv(x), y) >= SQNR_CONV_DB


def test_w8a8_forward_runs_integer_gemm_not_float_matmul(monkeypatch):
    if "cpu" not in BACKENDS:
        pytest.skip("no fast backend on this CPU")
    calls = []

    def spy(name):
        real = getattr(cpu_kernels._C, name)

        def call(*args):
            calls.append(name)
            return real(*args)

        monkeypatch.setattr(cpu_kernels._C, name, call)

    def no_float(*args, **kwargs):
        raise AssertionError("float matmul called in a W8A8 forward")

    def spy_plans(name):  # a plan class (its calls: "name:<what it runs>")
        real = getattr(cpu_kernels._C, name)

        class Spy:
            def __init__(self, *args):
                self._plan = real(*args)
                self._what = "+".join(s[0] for s in args[0]) if name == "ChainProgram" else "u8s8"

            def run(self, *args):
                calls.append(f"{name}:{self._what}")
                return self._plan.run(*args)

        monkeypatch.setattr(cpu_kernels._C, name, Spy)

    spy("linear_u8s8")  # the linear's quantization + GEMM (the general path: a layer's first call)
    spy_plans("LinearPlan")  # the same from the second call on
    spy_plans("ChainProgram")  # a convolution's im2col + GEMM (a one-step kernel program)
    monkeypatch.setattr(torch.nn.functional, "linear", no_float)
    monkeypatch.setattr(torch, "matmul", no_float)
    monkeypatch.setattr(torch.nn.functional, "conv2d", no_float)
    lin = nn.Linear(32, 16)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(3, 32)
    dynamic = QLinear.from_float(lin, "w8a8_dynamic", backend="cpu")
    dynamic(x), dynamic(x)
    QLinear.from_float(lin, "w8a8_static", input_range=(-3.0, 3.0), backend="cpu")(x)
    QConv2d.from_float(conv, input_range=(0.0, 3.0), backend="cpu")(torch.rand(1, 8, 6, 6))
    assert calls == ["linear_u8s8", "LinearPlan:u8s8", "linear_u8s8", "ChainProgram:gemm"]


def test_gpt2_conv1d_is_covered():
    transformers = pytest.importorskip("transformers")
    conv1d = transformers.pytorch_utils.Conv1D(48, 32)  # nf=48 outputs, nx=32 inputs; weight (32, 48)
    nn.init.normal_(conv1d.weight)
    x = torch.randn(5, 32)
    q = QLinear.from_float(conv1d, "w8a8_dynamic")
    assert q.weight.shape == (48, 32)
    assert oq.sqnr_db(conv1d(x), q(x)) >= SQNR_W8A8_DB


def test_state_dict_is_plain_and_reload_repacks():
    lin = nn.Linear(16, 8)
    q = QLinear.from_float(lin, "w8a8_dynamic")
    x = torch.randn(2, 16)
    y = q(x)
    sd = q.state_dict()
    assert {k: v.dtype for k, v in sd.items()} == {
        "weight": torch.int8,
        "weight_scale": torch.float32,
        "bias": torch.float32,
    }
    fresh = QLinear(16, 8, mode="w8a8_dynamic")
    fresh(x)  # packs the zero weights
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), y)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="no fast backend on this CPU")
@pytest.mark.parametrize(
    "mode,kwargs",
    [("w8a8_dynamic", {}), ("w8a8_static", {"input_range": (-3.0, 3.0), "input_dtype": "uint8"}), ("w8a16", {})],
    ids=["dynamic", "static", "w8a16"],
)
def test_qlinear_call_plan_matches_the_general_path(mode, kwargs):
    """From the second call a contiguous float32 input takes the module's call plan (no reshapes): the same
    numbers as the general path for 2-D and 3-D inputs; a non-contiguous input and new weights take the general
    path again."""
    torch.manual_seed(3)
    lin = nn.Linear(40, 24)
    q = QLinear.from_float(lin, mode, backend="cpu", **kwargs)
    x3 = torch.randn(2, 5, 40)
    first = q(x3)  # general path (reshapes), builds the plan
    assert "_linear_plan" in q.__dict__
    assert torch.equal(q(x3), first)  # the plan
    if mode == "w8a16":  # float sums: the order can depend on how rows group into register tiles
        assert torch.allclose(q(x3[1]), first[1], rtol=1e-5, atol=1e-6)
    else:  # integer arithmetic: row results do not depend on the other rows
        assert torch.equal(q(x3[1]), first[1])  # 2-D through the plan: the same rows
        assert torch.equal(q(x3[1, 2:3]), first[1, 2:3])  # one row (decode): a single row tile
    transposed = x3.transpose(0, 1).contiguous().transpose(0, 1)  # same values, not contiguous
    assert torch.equal(q(transposed), first)
    sd = q.state_dict()
    sd["weight"] = -sd["weight"]
    q.load_state_dict(sd)  # repacks: the old plan must not run
    assert torch.allclose(q(x3), -first + 2 * lin.bias.detach(), atol=1e-4)


def test_bad_inputs():
    lin = nn.Linear(16, 8)
    with pytest.raises(ValueError, match="needs a calibrated input_range"):
        QLinear.from_float(lin, "w8a8_static")
    with pytest.raises(ValueError, match="unknown quant mode 'int4'"):
        QLinear.from_float(lin, "int4")
    with pytest.raises(ValueError, match="W8A16 mode only"):
        QLinear.from_float(lin, "w8a8_dynamic", group_size=8)
    with pytest.raises(ValueError, match="does not divide"):
        QLinear.from_float(lin, "w8a16", group_size=5)
    with pytest.raises(ValueError, match="last dim 16"):
        QLinear.from_float(lin, "w8a8_dynamic")(torch.randn(2, 15))
    lin.weight.data[3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"weight of 'linear' contains NaN at index \[3, 4\]"):
        QLinear.from_float(lin, "w8a8_dynamic")
    with pytest.raises(TypeError, match="expects nn.Conv2d"):
        QConv2d.from_float(nn.Linear(2, 2), input_range=(0.0, 1.0))


def test_all_zero_channel_weight():
    lin = nn.Linear(8, 4)
    lin.weight.data[2] = 0.0
    q = QLinear.from_float(lin, "w8a8_dynamic")
    assert q.weight_scale[2].item() == 1.0 and (q.weight[2] == 0).all()
    x = torch.randn(3, 8)
    assert torch.allclose(q(x)[:, 2], lin.bias.data[2].expand(3), atol=1e-6)


def test_bf16_input_returns_bf16():
    lin = nn.Linear(16, 8)
    q = QLinear.from_float(lin, "w8a8_dynamic")
    y = q(torch.randn(2, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_qconv2d_dynamic_mode(backend):
    conv = nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(2, 8, 10, 10)  # signed input: the dynamic range includes negatives
    q = QConv2d.from_float(conv, mode="w8a8_dynamic", backend=backend)
    assert "input_scale" not in q.state_dict()
    assert oq.sqnr_db(conv(x), q(x)) >= SQNR_CONV_DB
    with pytest.raises(ValueError, match="weight-only convolution"):
        QConv2d(8, 16, 3, mode="w8a16")
