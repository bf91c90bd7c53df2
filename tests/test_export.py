"""ONNX QDQ export: graph structure, runtime integer kernels, parity with octoquant, bad input.

Random-weight models prove plumbing and placement; the real-model parity figures are in test_real_models.py.
"""

import warnings

import onnx
import pytest
import torch
from torch import nn

import octoquant as oq
from octoquant import export


class TinyNet(nn.Module):
    """conv-relu, a residual block whose projection conv feeds an Add, a ReLU6 conv, pooling, a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU6())
        self.project = nn.Conv2d(16, 8, 1)
        self.head = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU6())
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.expand(x))
        return self.fc(self.head(x).mean((2, 3)))


def _static_net():
    torch.manual_seed(0)
    net = TinyNet().eval()
    calib = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    return oq.quantize(net, oq.W8A8, calib=calib, progress=False), calib


def _ops(path) -> dict:
    out = {}
    for n in onnx.load(str(path)).graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


def test_static_cnn_exports_qdq_and_runs_integer_in_ort(tmp_path):
    q, calib = _static_net()
    path = tmp_path / "net.onnx"
    rep = export.onnx(q, calib[0], path, calib=calib)
    assert rep.check.problems == ()
    assert len(rep.check.integer) == 5 and rep.check.float_layers == ()
    g = onnx.load(str(path))
    inits = {t.name: t for t in g.graph.initializer}
    int_dq = [n for n in g.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    weight_dq = [n for n in int_dq if inits[n.input[0]].data_type != onnx.TensorProto.INT32]  # not conv biases
    assert len(weight_dq) == 5
    for n in weight_dq:  # int8 initializers with per-channel scales along the output channels
        assert inits[n.input[0]].data_type == onnx.TensorProto.INT8
        axis = next(a.i for a in n.attribute if a.name == "axis")
        assert onnx.numpy_helper.to_array(inits[n.input[1]]).shape[0] == inits[n.input[0]].dims[axis]
    # the octoquant scales, unchanged: the stem's input Q carries the calibrated scale / zero-point
    stem_q = next(n for n in g.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    gr = export._Graph(g)
    s, z = gr.qparams_of(stem_q)
    assert float(s) == float(q.stem[0].input_scale) and int(z) == int(q.stem[0].input_zero_point)
    assert rep.output_pairs >= 1  # the projection conv feeds the residual Add: it gets an output Q/DQ pair
    v = export.verify(q, path, [torch.randn(4, 3, 16, 16) for _ in range(3)])
    assert v.integer_ops.get("QLinearConv") == 4 and v.integer_ops.get("MatMulIntegerToFloat") == 1
    assert v.dequantized_float == 0 and "Conv" not in v.float_ops
    # same integer pipeline: only rounding-order differences and the projection output pair (~int8 noise)
    assert v.outputs[0]["sqnr_db"] >= 25.0


class ExactNet(nn.Module):
    """TinyNet's trunk with a depthwise conv, a wide conv whose sums exceed float32's integers, a channels-last
    Linear head on the un-pooled map: every output value passes through the integer pipeline only."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU6())
        self.project = nn.Conv2d(16, 8, 1)
        self.wide = nn.Sequential(nn.Conv2d(8, 1200, 1), nn.ReLU())
        self.narrow = nn.Conv2d(1200, 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        return self.fc(self.narrow(self.wide(x)).permute(0, 2, 3, 1))


@pytest.mark.parametrize(
    ("activation_dtype", "weights"),
    [("uint8", oq.PerChannel(0)), ("int8", oq.PerChannel(0)), ("uint8", oq.PerTensor())],
)
def test_exact_export_reproduces_octoquant_bit_for_bit(tmp_path, activation_dtype, weights):

    import onnxruntime as ort

    torch.manual_seed(0)
    net = ExactNet().eval()
    with torch.no_grad():
        net.narrow.weight.uniform_(-1, 1)  # int8 rows summing to ~76k in |w|: x 255 codes > 2**24
    calib = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    # equalization off: keep the wide weights as drawn
    cfg = oq.W8A8.replace(equalize_channels=False, activation_dtype=activation_dtype, weight_granularity=weights)
    q = oq.quantize(net, cfg, calib=calib, progress=False)
    path = tmp_path / "exact.onnx"
    rep = export.onnx(q, calib[0], path, exact=True)
    assert rep.check.problems == () and len(rep.check.integer) == 7 and rep.output_pairs == 0
    ops = _ops(path)
    # sums that float32 holds exactly run as a Conv of integers; the wide one as ConvInteger (with uint8 codes,
    # |q - zp| <= 255; symmetric int8 codes have |q| <= 128 and fit); the Linear as MatMulInteger
    wide = 1 if activation_dtype == "uint8" else 0
    assert ops.get("ConvInteger", 0) == wide and ops.get("Conv") == 6 - wide and ops.get("MatMulInteger") == 1
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for i in range(3):
        x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(i)) * 1.5
        with torch.no_grad():
            assert torch.equal(torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]), q(x))
    # the default (QDQ) export of the same model requantizes with ORT's own rounding: not bit-equal
    export.onnx(q, calib[0], tmp_path / "qdq.onnx", calib=calib)
    qdq = ort.InferenceSession(str(tmp_path / "qdq.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert not torch.equal(torch.from_numpy(qdq.run(None, {"input": x.numpy()})[0]), q(x))


def test_requantization_is_qlinearconv_bit_for_bit():
    """octoquant's integer requantization (reference.requantize_codes) is ONNX Runtime's QLinearConv arithmetic: the
    op itself (not a QDQ fusion), given octoquant's int32 bias, returns the reference's codes on pointwise, strided,
    depthwise and 5x5 convolutions with random zero-points, with and without a ReLU bound at the zero-point."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from octoquant.kernels.reference import ActivationQParams, ReferenceBackend, requantization

    ref, gen = ReferenceBackend(), torch.Generator().manual_seed(0)
    for c, o, k, stride, groups, relu, ties in [
        (32, 48, 1, 1, 1, False, False),
        (3, 16, 3, 2, 1, True, False),
        (24, 24, 3, 1, 24, True, False),
        (40, 40, 3, 2, 40, False, False),
        (8, 12, 5, 1, 1, False, False),
        (16, 16, 3, 1, 16, False, True),  # multiplier 2**-9: many exact halves (round half to even)
    ]:
        w = torch.randint(-127, 128, (o, c // groups, k, k), dtype=torch.int8, generator=gen)
        ws = torch.full((o,), 2.0**-6) if ties else torch.rand(o, generator=gen) * 0.02 + 1e-3
        bias = torch.randn(o, generator=gen)
        in_s = 2.0**-3 if ties else float(torch.rand(1, generator=gen)) * 0.1 + 0.01
        out_s = 1.0 if ties else float(torch.rand(1, generator=gen)) * 0.5 + 0.05
        in_q = ActivationQParams(in_s, 37, oq.QDtype.UINT8)
        out_q = ActivationQParams(out_s, 0 if relu else 140, oq.QDtype.UINT8)
        hi = torch.full((o,), float("inf")) if relu else None
        a = torch.randint(0, 256, (2, 11, 13, c), dtype=torch.uint8, generator=gen)  # NHWC codes
        geometry = ((stride, stride), (k // 2, k // 2), (1, 1), in_q)
        codes = ref.conv2d_codes(a, ref.pack_conv(w, ws, bias, groups, hi), *geometry, out_q)
        _, bias_q = requantization(in_q.scale, ws, bias, out_q.scale)
        consts = {
            "xs": np.float32(in_q.scale), "xz": np.uint8(in_q.zero_point), "w": w.numpy(), "ws": ws.numpy(),
            "wz": np.zeros(o, np.int8), "ys": np.float32(out_q.scale), "yz": np.uint8(out_q.zero_point),
            "b": bias_q.numpy(),
        }  # fmt: skip
        node = helper.make_node(
            "QLinearConv",
            ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"],
            ["y"],
            group=groups,
            strides=[stride, stride],
            pads=[k // 2] * 4,
        )
        graph = helper.make_graph(
            [node],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.UINT8, None)],
            [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
            [numpy_helper.from_array(np.asarray(v), n) for n, v in consts.items()],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        y = torch.from_numpy(sess.run(None, {"x": a.permute(0, 3, 1, 2).numpy()})[0]).permute(0, 2, 3, 1)
        assert torch.equal(y, codes), (c, o, k, stride, groups)
        assert len(codes.unique()) > 20  # spread over many codes, not saturated


class Inverted(nn.Module):
    """MobileNetV2's inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project (+ the input when shapes allow)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        h = 4 * c_in
        self.residual = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, h, 1),
            nn.ReLU6(),
            nn.Conv2d(h, h, 3, stride, 1, groups=h),
            nn.ReLU6(),
            nn.Conv2d(h, c_out, 1),
        )

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


def _mobile_net() -> nn.Module:
    torch.manual_seed(3)
    features = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU6()),
        Inverted(8, 8, 1),
        Inverted(8, 12, 2),  # not residual: its projection requantizes for the next block's expand conv
        Inverted(12, 16, 1),
        Inverted(16, 16, 1),
        nn.Sequential(nn.Conv2d(16, 32, 1), nn.ReLU6()),
    )
    return nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 7)).eval()


def test_exact_export_requantizing_convs_run_as_qlinearconv_bit_for_bit(tmp_path):
    """Convolutions that hand their output to the next one (inside and across blocks) requantize in integer
    arithmetic, which ONNX Runtime's QLinearConv computes bit for bit: the exact file runs them as QLinearConv
    and still equals octoquant; convolutions whose float output an add reads stay octoquant's float arithmetic.
    (uint8 activations: ORT fuses a ReLU into QLinearConv only where the zero-point is the lowest code.)"""
    import onnxruntime as ort

    from octoquant.nn import BlockChain, QConv2d

    net = _mobile_net()
    calib = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    q = oq.quantize(net, oq.W8A8, calib=calib, progress=False)
    convs = [m for m in q.modules() if isinstance(m, QConv2d)]
    linked = [m for m in convs if m.reader is not None]
    assert isinstance(q[0], BlockChain)
    # per block expand -> dw -> project; block 2's projection -> block 3's expand (across blocks)
    assert len(linked) == 2 * 4 + 1 and q[0][2].conv[4].reader is q[0][3].conv[0]
    # float where an add reads it: a residual block's projection, and the stem (block 1 adds its input)
    assert q[0][1].conv[4].reader is None and q[0][0][0].reader is None
    path = tmp_path / "exact.onnx"
    rep = export.onnx(q, calib[0], path, exact=True)
    assert rep.check.problems == () and len(rep.check.integer) == len(convs) + 1
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for i in range(3):
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(10 + i)) * 1.5
        with torch.no_grad():
            assert torch.equal(torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]), q(x))
    v = export.verify(q, path, [torch.randn(2, 3, 32, 32)])
    assert v.integer_ops.get("QLinearConv") == len(linked) and v.dequantized_float == 0
    # the 1x1 projections that read codes and give float (blocks 1, 3, 4) run as MatMulInteger, like the Linear;
    # the stem and the last conv read float: Conv of integers
    assert v.integer_ops.get("MatMulInteger") == 4 and sum(v.float_ops.values()) == 2, (v.integer_ops, v.float_ops)


def test_a_per_channel_clamp_runs_on_the_codes(tmp_path, monkeypatch):
    """A per-channel ReLU6 bound below the next quantizer's range (left by equalization) is applied to the uint8
    codes between two QLinearConvs (Q(min(y, u)) == min(Q(y), Q(u))), not as DQ -> float Min -> Q."""
    import onnxruntime as ort

    q, calib = _static_net()
    upper = torch.full((16,), float("inf"))
    upper[::2] = 0.05  # every other channel clamped well inside the next conv's input range
    q.expand[0].fuse_activation(upper)
    export.onnx(q, calib[0], tmp_path / "codes.onnx", calib=calib)
    g = onnx.load(str(tmp_path / "codes.onnx"))
    inits = {t.name: t for t in g.graph.initializer}
    mins = [n for n in g.graph.node if n.op_type == "Min"]
    assert len(mins) == 1 and inits[mins[0].input[1]].data_type == onnx.TensorProto.UINT8
    monkeypatch.setattr(export, "_integer_clamps", lambda gr: 0)  # the float form, for comparison
    export.onnx(q, calib[0], tmp_path / "float.onnx", calib=calib)
    assert any(n.op_type == "Min" for n in onnx.load(str(tmp_path / "float.onnx")).graph.node)
    x = torch.randn(4, 3, 16, 16).numpy()
    a, b = (
        ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"])
        for f in ("codes.onnx", "float.onnx")
    )
    assert (a.run(None, {"input": x})[0] == b.run(None, {"input": x})[0]).all()  # the same integers
    v = export.verify(q, tmp_path / "codes.onnx", [torch.from_numpy(x)])
    assert v.integer_ops.get("QLinearConv") == 4 and v.outputs[0]["sqnr_db"] >= 25.0


@pytest.mark.parametrize(("k", "zero_point", "fits"), [(518, 0, True), (519, 0, False), (1032, 128, True)])
def test_float32_holds_the_conv_sums_up_to_two_to_the_24(k, zero_point, fits):
    from types import SimpleNamespace

    # all-127 weights: the largest sum is 127 * k * max(zp, 255 - zp); 2**24 = 16,777,216
    conv = SimpleNamespace(weight=torch.full((2, k, 1, 1), 127, dtype=torch.int8))
    assert export._sums_fit_float32(conv, zero_point) is fits


def test_dynamic_and_weight_only_linear_in_ort(tmp_path):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).eval()
    x = torch.randn(2, 7, 64)
    dyn = oq.quantize(mlp, oq.W8A8_DYNAMIC, progress=False)
    # default: octoquant's per-token numerics (row absmax, Round, MatMulInteger int8 x int8 -> int32)
    rep = export.onnx(dyn, x, tmp_path / "dyn.onnx")
    assert rep.check.problems == () and len(rep.check.integer) == 2
    assert _ops(tmp_path / "dyn.onnx")["MatMulInteger"] == 2
    v = export.verify(dyn, tmp_path / "dyn.onnx", [x, torch.randn(3, 7, 64)])
    assert v.integer_ops.get("MatMulInteger") == 2 and v.dequantized_float == 0 and not v.float_ops
    assert v.outputs[0]["sqnr_db"] >= 100.0  # the same integers; only the float rescale order differs
    # the QDQ form: DynamicQuantizeLinear (per-tensor uint8), fused by ORT into DynamicQuantizeMatMul
    export.onnx(dyn, x, tmp_path / "dyn_t.onnx", dynamic="per-tensor")
    assert _ops(tmp_path / "dyn_t.onnx")["DynamicQuantizeLinear"] == 2
    v = export.verify(dyn, tmp_path / "dyn_t.onnx", x)
    assert v.integer_ops.get("DynamicQuantizeMatMul") == 2 and v.dequantized_float == 0
    # per-tensor uint8 in ONNX vs octoquant's per-token int8: two int8 quantizations of the same layer
    assert 30.0 <= v.outputs[0]["sqnr_db"] < 100.0
    with pytest.raises(export.ExportError, match="valid: per-token, per-tensor"):
        export.onnx(dyn, x, tmp_path / "bad.onnx", dynamic="per-row")
    w16 = oq.quantize(mlp, oq.W8A16, progress=False)
    export.onnx(w16, x, tmp_path / "w16.onnx")
    v = export.verify(w16, tmp_path / "w16.onnx", x)
    assert v.outputs[0]["sqnr_db"] >= 60.0  # weight-only: the same dequantized weights, float activations


def test_two_dimensional_linear_input_still_fuses(tmp_path):
    """A (M, K) input: ORT would fold MatMul + bias into a float Gemm before its QDQ fusion; it must not."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    q = oq.quantize(m, oq.W8A8, calib=[torch.randn(8, 32) for _ in range(4)], progress=False)
    export.onnx(q, torch.randn(8, 32), tmp_path / "m.onnx")
    v = export.verify(q, tmp_path / "m.onnx", torch.randn(8, 32))
    assert v.integer_ops.get("MatMulIntegerToFloat") == 2 and not v.float_ops
    assert v.outputs[0]["sqnr_db"] >= 40.0


def test_dynamic_axes_batch_and_sequence(tmp_path):
    torch.manual_seed(0)

    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lin = nn.Embedding(50, 32), nn.Linear(32, 8)

        def forward(self, input_ids):
            return self.lin(self.emb(input_ids))

    q = oq.quantize(Tok().eval(), oq.W8A8_DYNAMIC, progress=False)
    export.onnx(q, {"input_ids": torch.randint(0, 50, (1, 5))}, tmp_path / "t.onnx")
    g = onnx.load(str(tmp_path / "t.onnx"))
    dims = [d.dim_param for d in g.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]
    v = export.verify(q, tmp_path / "t.onnx", {"input_ids": torch.randint(0, 50, (3, 11))})
    assert v.outputs[0]["sqnr_db"] >= 30.0


def test_float_layers_export_with_a_warning(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    q = oq.quantize(m, oq.W8A8_DYNAMIC, exclude=["2"], progress=False)
    with pytest.warns(UserWarning, match="export in float: 2"):
        rep = export.onnx(q, torch.randn(2, 16), tmp_path / "m.onnx")
    assert rep.float_modules == ("2",) and len(rep.check.float_layers) == 1


def test_refusals(tmp_path):
    m = nn.Sequential(nn.Linear(8, 8)).eval()
    with pytest.raises(export.ExportError, match="no quantized layers"):
        export.onnx(m, torch.randn(1, 8), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    q = oq.quantize(m, oq.W8A8_DYNAMIC, progress=False)
    (tmp_path / "exists.onnx").write_bytes(b"keep me")
    with pytest.raises(export.ExportError, match="exists"):
        export.onnx(q, torch.randn(1, 8), tmp_path / "exists.onnx")
    assert (tmp_path / "exists.onnx").read_bytes() == b"keep me"
    export.onnx(q, torch.randn(1, 8), tmp_path / "exists.onnx", overwrite=True)
    assert onnx.load(str(tmp_path / "exists.onnx")).graph.node
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.onnx"]  # no temporary file left
    with pytest.raises(export.ExportError, match="opset"):
        export.onnx(q, torch.randn(1, 8), tmp_path / "o.onnx", opset=11)
    with pytest.raises(export.ExportError, match="cannot also quantize them"):
        export.onnx(q, torch.randn(1, 8), tmp_path / "e.onnx", exact=True, quantize_adds=True)
    with pytest.raises(ValueError, match="valid: onnxruntime, openvino"):
        export.verify(q, tmp_path / "exists.onnx", torch.randn(1, 8), runtime="tensorrt")


def test_check_reports_broken_placement(tmp_path):
    q, calib = _static_net()
    path = tmp_path / "net.onnx"
    export.onnx(q, calib[0], path, calib=calib)
    g = onnx.load(str(path))
    gr = export._Graph(g)
    # tamper: a weight DQ gets a non-zero zero-point (asymmetric int8 weights are not what was exported)
    dq = next(n for n in gr.nodes if n.op_type == "DequantizeLinear" and n.input[0] in gr.inits)
    zp = onnx.numpy_helper.to_array(gr.inits[dq.input[2]]).copy()
    zp[0] = 3
    gr.inits[dq.input[2]].CopyFrom(onnx.numpy_helper.from_array(zp, dq.input[2]))
    problems = export.check(g).problems
    assert any("not symmetric int8" in p for p in problems)
    # tamper: a Conv output no longer reaches a QuantizeLinear
    g2 = onnx.load(str(path))
    conv = next(n for n in g2.graph.node if n.op_type == "Conv")
    relu = onnx.helper.make_node("Sigmoid", [conv.output[0]], ["extra"])
    g2.graph.node.append(relu)
    g2.graph.output.append(onnx.helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, ["b", "c", "h", "w"]))
    assert any("exactly one QuantizeLinear" in p for p in export.check(g2).problems)


def test_openvino_runs_the_file_in_int8(tmp_path):
    pytest.importorskip("openvino")
    q, calib = _static_net()
    path = tmp_path / "net.onnx"
    export.onnx(q, calib[0], path, calib=calib)
    v = export.verify(q, path, torch.randn(4, 3, 16, 16), runtime="openvino")
    assert sum(v.integer_ops.values()) == 5 and v.dequantized_float == 0
    assert v.outputs[0]["sqnr_db"] >= 25.0


def test_requantizing_convs_get_int32_biases_and_openvino_matches_octoquant(tmp_path):
    """A conv whose output is requantized gets its bias as int32 + DequantizeLinear (octoquant's bias_q), so that
    OpenVINO, which adds a float bias as given, computes octoquant's integers too: a chain of convolutions with
    no float branch gives octoquant's output bit for bit in OpenVINO (with float biases 17% of the outputs
    differed, checked) and up to the float order of its last, float Conv in ONNX Runtime. The last conv's output
    is float in octoquant: its bias stays float."""
    ov = pytest.importorskip("openvino")
    import numpy as np
    import onnxruntime as ort

    from octoquant.kernels import cpu
    from octoquant.kernels.reference import requantization

    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU6(),
        nn.Conv2d(16, 32, 1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, 1, 1, groups=32), nn.ReLU6(),
        nn.Conv2d(32, 24, 1), nn.ReLU(),
        nn.Conv2d(24, 24, 3, 2, 1, groups=24), nn.ReLU(),
        nn.Conv2d(24, 10, 1),
    ).eval()  # fmt: skip
    calib = [torch.randn(4, 3, 28, 28) for _ in range(3)]
    q = oq.quantize(net, oq.W8A8, calib=calib, progress=False)
    path = tmp_path / "chain.onnx"
    export.onnx(q, calib[0], path, calib=calib)
    g = onnx.load(str(path)).graph
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    convs = [n for n in g.node if n.op_type == "Conv"]
    qconvs = [m for m in q.modules() if isinstance(m, oq.nn.QConv2d)]
    assert len(convs) == len(qconvs) == 6
    for n, m in zip(convs, qconvs, strict=True):
        if m is qconvs[-1]:
            assert n.input[2] in inits and inits[n.input[2]].dtype == np.float32
            continue
        dq = producer[n.input[2]]
        assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].dtype == np.int32
        _, bias_q = requantization(m._static_qparams()[0], m.weight_scale, m.bias, 1.0)
        assert np.array_equal(inits[dq.input[0]], bias_q.numpy())
    x = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(7)) * 1.5
    with torch.no_grad():
        want = q(x)
    got_ort = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    # (ORT runs the last conv, float output, as a float Conv of dequantized values: float rounding order only)
    assert torch.allclose(torch.from_numpy(got_ort), want, rtol=1e-5, atol=1e-6)
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got_ov = torch.from_numpy(compiled(x.numpy())[0].copy())
    if "avx512vnni" in cpu.available_isas():  # (OpenVINO's u8 kernels without VNNI may saturate pair sums)
        assert torch.equal(got_ov, want)
    else:
        assert oq.sqnr_db(want, got_ov) > 40


def test_model_is_left_unchanged(tmp_path):
    q, calib = _static_net()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y0 = q(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export.onnx(q, calib[0], tmp_path / "n.onnx", calib=calib)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
    assert not any(hasattr(m, "_export_name") or "forward" in vars(m) for m in q.modules())
    with torch.no_grad():
        assert torch.equal(q(x), y0)


def test_llm_with_tied_int8_head_exports_compactly(tmp_path):
    """A tied W8A16 head (per-group scales) and its QEmbedding export as int8 tables, dequantized in the graph."""
    pytest.importorskip("transformers")
    import numpy as np

    from tests._tiny import tiny_llama

    lm = tiny_llama(tie=True, vocab=512)
    q = oq.quantize(lm, oq.W8A16, progress=False)
    assert isinstance(q.model.embed_tokens, oq.nn.QEmbedding) and q.lm_head.group_size == 64
    ids = torch.randint(0, 512, (2, 9))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    export.onnx(export.LogitsOnly(q), example, tmp_path / "lm.onnx")
    g = onnx.load(str(tmp_path / "lm.onnx"))
    arrays = [onnx.numpy_helper.to_array(t) for t in g.graph.initializer]
    table = 512 * 64
    assert not [a for a in arrays if a.dtype == np.float32 and a.size >= table]  # no float copy of the table
    assert sum(a.size for a in arrays if a.dtype == np.int8 and a.size == table) == table  # one int8 copy
    v = export.verify(export.LogitsOnly(q), tmp_path / "lm.onnx", example)
    assert v.outputs[0]["sqnr_db"] >= 60.0
