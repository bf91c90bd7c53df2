"""Every fast backend row against the reference: int32 results bit-equal, rescaled results within 1 LSB."""

import logging

import pytest
import torch

import octoquant as oq
import octoquant.kernels as kernels
from octoquant.config import QDtype
from octoquant.kernels import MAX_K, available_isas, get_backend
from octoquant.kernels.cpu import CpuBackend
from octoquant.kernels.reference import ActivationQParams

REF = get_backend("reference")
FAST = {f"cpu-{isa}": CpuBackend(isa) for isa in available_isas()}


@pytest.fixture(params=list(FAST), ids=list(FAST))
def fast(request):
    return FAST[request.param]


def rand_i8(*shape):
    return torch.randint(-128, 128, shape, dtype=torch.int8)


SHAPES = [(1, 1, 1), (1, 4096, 1), (1, 17, 33), (3, 5, 7), (7, 1, 9), (16, 64, 16), (33, 100, 47), (70, 257, 130)]
# K <= 32 with M > 1 runs the weights-in-registers kernel: column groups of 6 / 3 blocks and a partial block
SHAPES += [(50, 12, 100), (37, 29, 200), (5, 32, 33)]


@pytest.mark.parametrize("m,k,n", SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in SHAPES])
def test_int8_mm_bit_equal_random(fast, m, k, n):
    a, b = rand_i8(m, k), rand_i8(k, n)
    assert torch.equal(fast.int8_mm(a, b), REF.int8_mm(a, b))


EXTREMES = {
    "all-minus128": (-128, -128),
    "all-127": (127, 127),
    "minus128-x-127": (-128, 127),
    "127-x-minus128": (127, -128),
}


@pytest.mark.parametrize("av,bv", list(EXTREMES.values()), ids=list(EXTREMES))
def test_int8_mm_extremes_no_saturation(fast, av, bv):
    # u8 255 x s8 127 pair sums are what saturate vpmaddubsw; 1024 terms keep the test fast
    a = torch.full((3, 1024), av, dtype=torch.int8)
    b = torch.full((1024, 5), bv, dtype=torch.int8)
    out = fast.int8_mm(a, b)
    assert torch.equal(out, torch.full((3, 5), av * bv * 1024, dtype=torch.int32))


def test_int8_mm_at_the_int32_bound(fast):
    """K = MAX_K with all -128: 131071 * 16384 = 2147467264, the largest sum that must still be exact."""
    a = torch.full((1, MAX_K), -128, dtype=torch.int8)
    b = torch.full((MAX_K, 2), -128, dtype=torch.int8)
    assert fast.int8_mm(a, b).tolist() == [[MAX_K * 16384] * 2]


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_k_beyond_int32_bound_refused(backend):
    be = REF if backend == "reference" else FAST[backend]
    with pytest.raises(ValueError, match="exceeds 131071"):
        be.int8_mm(torch.zeros(1, MAX_K + 1, dtype=torch.int8), torch.zeros(MAX_K + 1, 1, dtype=torch.int8))


@pytest.mark.parametrize(
    "a,b,match",
    [
        (torch.zeros(2, 3), torch.zeros(3, 2, dtype=torch.int8), "a must be int8"),
        (torch.zeros(2, 3, dtype=torch.int8), torch.zeros(3, 2, dtype=torch.uint8), "b must be int8"),
        (torch.zeros(2, 3, 1, dtype=torch.int8), torch.zeros(3, 2, dtype=torch.int8), "must be 2-D"),
        (torch.zeros(2, 3, dtype=torch.int8), torch.zeros(4, 2, dtype=torch.int8), "K mismatch"),
    ],
    ids=["float-a", "uint8-b", "3d", "k-mismatch"],
)
def test_bad_operands(fast, a, b, match):
    with pytest.raises(ValueError, match=match):
        fast.int8_mm(a, b)


def test_wrong_device_rejected(fast):
    meta = torch.zeros(2, 2, dtype=torch.int8, device="meta")
    with pytest.raises(ValueError, match="meta"):
        fast.int8_mm(meta, torch.zeros(2, 2, dtype=torch.int8))


def _activations():
    x = torch.randn(9, 67) * 3
    x[1] = 0.0  # all-zero row: scale 1.0
    x[2] = 1e-30  # tiny values
    x[3, :5] = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5])  # ties after division
    x[4] *= 1e6
    return x


def test_quantize_per_token_bit_equal(fast):
    x = _activations()
    q_ref, s_ref = REF.quantize_per_token(x)
    q, s = fast.quantize_per_token(x)
    assert torch.equal(s, s_ref) and torch.equal(q, q_ref)


def _one_lsb(row_scale, col_scale):
    """One unit of the int32 accumulator after rescale, per output element."""
    return row_scale.reshape(-1, 1) * col_scale.reshape(1, -1)


@pytest.mark.parametrize("k", [64, 67, 1], ids=["k64", "k67", "k1"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_linear_dynamic_within_one_lsb(fast, k, with_bias):
    x = _activations()[:, :k] if k <= 67 else torch.randn(9, k)
    w = rand_i8(37, k)
    ws = torch.rand(37) * 0.01
    bias = torch.randn(37) if with_bias else None
    y_ref = REF.linear_dynamic(x, REF.pack_w8a8(w, ws, bias))
    y = fast.linear_dynamic(x, fast.pack_w8a8(w, ws, bias))
    _, row_scale = REF.quantize_per_token(x)
    assert (y - y_ref).abs().le(_one_lsb(row_scale, ws) + 1e-6).all()


@pytest.mark.parametrize(
    "dtype,zp", [(QDtype.INT8, 0), (QDtype.UINT8, 0), (QDtype.UINT8, 117)], ids=["s8", "u8-zp0", "u8-zp117"]
)
def test_linear_static_within_one_lsb(fast, dtype, zp):
    x = torch.randn(21, 50) * 2
    w, ws, bias = rand_i8(19, 50), torch.rand(19) * 0.01, torch.randn(19)
    y_ref = REF.linear_static(x, REF.pack_w8a8(w, ws, bias), 0.03, zp, dtype)
    y = fast.linear_static(x, fast.pack_w8a8(w, ws, bias), 0.03, zp, dtype)
    assert (y - y_ref).abs().le(_one_lsb(torch.tensor([0.03]), ws) + 1e-6).all()


def test_fused_linear_large_input_threads_the_quantizer(fast):
    # 301 x 259 floats (>= 2**16): the fused kernel quantizes rows on all threads; K pads to 260 (the zero-point)
    x = torch.randn(301, 300)[:, :259] * 3  # strided rows
    w, ws, bias = rand_i8(40, 259), torch.rand(40) * 0.01, torch.randn(40)
    y_ref = REF.linear_static(x, REF.pack_w8a8(w, ws, bias), 0.05, 101, QDtype.UINT8)
    y = fast.linear_static(x, fast.pack_w8a8(w, ws, bias), 0.05, 101, QDtype.UINT8)
    assert (y - y_ref).abs().le(_one_lsb(torch.tensor([0.05]), ws) + 1e-6).all()
    y_ref = REF.linear_dynamic(x, REF.pack_w8a8(w, ws, bias))
    y = fast.linear_dynamic(x, fast.pack_w8a8(w, ws, bias))
    _, row_scale = REF.quantize_per_token(x)
    assert (y - y_ref).abs().le(_one_lsb(row_scale, ws) + 1e-6).all()


# W8A16 sums float products in another order than the reference: float32 accumulation error only.
W8A16_RTOL = 1e-5


@pytest.mark.parametrize("m", [1, 3, 4, 9])
@pytest.mark.parametrize("group_size", [None, 16], ids=["per-channel", "group16"])
def test_linear_weight_only_matches_reference(fast, m, group_size):
    k, n = 64, 35
    x, w = torch.randn(m, k), rand_i8(n, k)
    ws = torch.rand(n, k // (group_size or k)) * 0.01
    bias = torch.randn(n)
    y_ref = REF.linear_weight_only(x, REF.pack_w8a16(w, ws, group_size or k, bias))
    y = fast.linear_weight_only(x, fast.pack_w8a16(w, ws, group_size or k, bias))
    assert torch.allclose(y, y_ref, rtol=W8A16_RTOL, atol=W8A16_RTOL * y_ref.abs().max().item())


CONVS = {
    # name: (C, O, k, stride, pad, dilation, groups)
    "stem-3x3-s2": (3, 8, 3, 2, 1, 1, 1),
    "pointwise": (32, 24, 1, 1, 0, 1, 1),
    "pointwise-s2": (32, 24, 1, 2, 0, 1, 1),
    "depthwise-s1": (16, 16, 3, 1, 1, 1, 16),
    "depthwise-s2": (24, 24, 3, 2, 1, 1, 24),
    "depthwise-5x5": (20, 20, 5, 1, 2, 1, 20),
    "depthwise-wide": (100, 100, 3, 2, 1, 1, 100),  # 64-channel blocks + a 16 block + 4 scalar channels
    # stride 1, 3 wide: 4 interior pixels share each kernel row's input columns; 32 + 16 + 8 scalar channels
    "depthwise-s1-56": (56, 56, 3, 1, 1, 1, 56),
    "grouped-dilated": (8, 12, 3, 1, 2, 2, 2),
    "k-not-mult-4": (5, 7, 3, 1, 1, 1, 1),
    "expand-16-to-200": (16, 200, 1, 1, 0, 1, 1),  # small K: 13 column blocks in groups, the last partial
    # codes written by one packed store per 4 (or 3) full column blocks, next to the per-block epilogue
    "expand-24-to-72": (24, 72, 1, 1, 0, 1, 1),  # small K: a packed group of 4, then a partial block
    "expand-32-to-48": (32, 48, 1, 1, 0, 1, 1),  # small K: a packed group of 3
    "pointwise-64-to-112": (64, 112, 1, 1, 0, 1, 1),  # tiled: a packed tile of 4 blocks, then one of 3
    "pointwise-64-to-100": (64, 100, 1, 1, 0, 1, 1),  # tiled: the second tile's last block partial: per block
}


@pytest.mark.parametrize("cfg", list(CONVS.values()), ids=list(CONVS))
@pytest.mark.parametrize("dtype,zp,scale", [(QDtype.UINT8, 100, 0.03), (QDtype.INT8, 0, 0.02)], ids=["u8", "s8"])
def test_conv2d_bit_equal(fast, cfg, dtype, zp, scale):
    c, o, k, s, p, d, g = cfg
    x = torch.randn(2, c, 9, 11)
    w, ws, bias = rand_i8(o, c // g, k, k), torch.rand(o) * 0.01, torch.randn(o)
    args = ((s, s), (p, p), (d, d), ActivationQParams(scale, zp, dtype))
    y_ref = REF.conv2d_static(x, REF.pack_conv(w, ws, bias, g), *args)
    y = fast.conv2d_static(x, fast.pack_conv(w, ws, bias, g), *args)
    assert y.shape == y_ref.shape and torch.equal(y.contiguous(), y_ref.contiguous())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "cfg",
    [(12, 40, 3, 1, 1, 1, 1), (16, 24, 3, 2, 2, 2, 2), (7, 70, 5, 1, 2, 1, 1)],
    ids=["3x3", "grouped-s2-d2", "5x5"],
)
@pytest.mark.parametrize("codes_out", [False, True], ids=["float", "codes"])
def test_conv2d_im2col_fused_in_row_blocks_bit_equal(fast, cfg, threads, codes_out):
    """Thousands of output pixels: im2col is done per GEMM row block (<= 256 rows) in each thread's buffer, several
    blocks per thread, a last partial one; the result equals the reference's."""
    c, o, k, s, p, d, g = cfg
    x = torch.randn(2, c, 33 * s, 37 * s)
    w, ws, bias = rand_i8(o, c // g, k, k), torch.rand(o) * 0.01, torch.randn(o)
    in_q = ActivationQParams(0.03, 100, QDtype.UINT8)
    out_q = ActivationQParams(0.01, 3, QDtype.UINT8) if codes_out else None
    a = REF.quantize_nhwc(x, in_q)
    geometry = ((s, s), (p, p), (d, d), in_q)
    y_ref = REF.conv2d_codes(a, REF.pack_conv(w, ws, bias, g), *geometry, out_q)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = fast.conv2d_codes(a, fast.pack_conv(w, ws, bias, g), *geometry, out_q)
    finally:
        torch.set_num_threads(before)
    assert y.shape == y_ref.shape and y.shape[0] * y.shape[1] * y.shape[2] > 4 * 256  # several row blocks
    assert torch.equal(y, y_ref)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("codes_out", [False, True], ids=["float", "codes"])
def test_depthwise_split_between_threads_bit_equal(fast, threads, codes_out):
    """Two threads take halves of the output pixels, the boundary inside a row and inside a 4-pixel block (273
    pixels: 137 / 136, row 10 at column 7; blocks from column 1 + 4k): the result equals the reference's."""
    x = torch.randn(1, 64, 21, 13)
    w, ws, bias = rand_i8(64, 1, 3, 3), torch.rand(64) * 0.01, torch.randn(64)
    in_q = ActivationQParams(0.03, 100, QDtype.UINT8)
    out_q = ActivationQParams(0.01, 3, QDtype.UINT8) if codes_out else None
    a = REF.quantize_nhwc(x, in_q)
    geometry = ((1, 1), (1, 1), (1, 1), in_q)
    y_ref = REF.conv2d_codes(a, REF.pack_conv(w, ws, bias, 64), *geometry, out_q)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = fast.conv2d_codes(a, fast.pack_conv(w, ws, bias, 64), *geometry, out_q)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y, y_ref)


# 3x3 depthwise geometries of the column-quad kernel (AVX-512 VBMI2; the per-tap kernels elsewhere): strides 1 and
# 2 in either direction, paddings 0..2, widths that leave 1..3 pixels in the last group of 4, images narrower than
# a group, channels in 64-blocks (the rearrangement's wide path), 32 / 16-blocks and a scalar tail.
DW_QUADS = [
    # (C, H, W, stride (h, w), pad (h, w))
    (16, 5, 4, (1, 1), (1, 1)),
    (24, 6, 7, (1, 1), (1, 1)),
    (64, 9, 13, (1, 1), (1, 1)),
    (96, 8, 8, (2, 2), (1, 1)),
    (136, 7, 9, (2, 2), (1, 1)),
    (48, 3, 1, (1, 1), (1, 1)),
    (32, 2, 3, (2, 2), (1, 1)),
    (80, 10, 11, (1, 1), (0, 0)),
    (40, 9, 10, (2, 2), (0, 0)),
    (32, 6, 6, (1, 1), (2, 2)),
    (32, 7, 9, (1, 2), (1, 0)),
    (200, 6, 5, (2, 1), (0, 2)),
    # enough work for several threads (the small ones above run on one): their claimed ranges split rows and groups
    (96, 30, 30, (2, 2), (1, 1)),
    (48, 20, 26, (1, 2), (1, 1)),
    (144, 14, 15, (1, 1), (1, 1)),
]


@pytest.mark.parametrize("geometry", DW_QUADS, ids=[f"c{g[0]}-{g[1]}x{g[2]}-s{g[3]}-p{g[4]}" for g in DW_QUADS])
@pytest.mark.parametrize("codes_out", [False, True], ids=["float", "codes"])
def test_depthwise_3x3_bit_equal(fast, geometry, codes_out):
    """Every output pixel of a 3x3 depthwise conv, borders and batch included, with 1, 2 and 3 threads (where the
    work is large enough to split), u8 and s8 inputs, a fused ReLU6: equal to the reference."""
    c, h, w_, stride, pad = geometry
    torch.manual_seed(c + h + w_)
    x = torch.randn(3, c, h, w_) * 2
    w, ws, bias = rand_i8(c, 1, 3, 3), torch.rand(c) * 0.01, torch.randn(c)
    out_q = ActivationQParams(0.01, 3, QDtype.UINT8) if codes_out else None
    before = torch.get_num_threads()
    for in_q in (ActivationQParams(0.03, 100, QDtype.UINT8), ActivationQParams(0.02, 0, QDtype.INT8)):
        a = REF.quantize_nhwc(x, in_q)
        geo = (stride, pad, (1, 1), in_q)
        ref = REF.pack_conv(w, ws, bias, c, clamp_hi=torch.full((c,), 0.5))
        packed = fast.pack_conv(w, ws, bias, c, clamp_hi=torch.full((c,), 0.5))
        y_ref = REF.conv2d_codes(a, ref, *geo, out_q)
        try:
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                y = fast.conv2d_codes(a, packed, *geo, out_q)
                assert y.shape == y_ref.shape and torch.equal(y, y_ref), (in_q.dtype, threads)
        finally:
            torch.set_num_threads(before)


# The next layer's input quantization, written by the epilogue: uint8 asymmetric and int8 symmetric.
OUT_QS = {"to-u8-zp3": ActivationQParams(0.01, 3, QDtype.UINT8), "to-s8": ActivationQParams(0.015, 0, QDtype.INT8)}


@pytest.mark.parametrize("out_name", list(OUT_QS))
@pytest.mark.parametrize("cfg", list(CONVS.values()), ids=list(CONVS))
@pytest.mark.parametrize("clamp", [False, True], ids=["linear", "relu6"])
def test_conv2d_codes_requantized_bit_equal(fast, cfg, out_name, clamp):
    """Codes in, codes out (the integer requantization, QLinearConv's arithmetic): equal to the reference, and within
    one code of quantizing the float output (float32(acc) * scale + bias divided by the output scale rounds
    differently only near a tie, and where the int32 bias rounded)."""
    c, o, k, s, p, d, g = cfg
    x = torch.randn(2, c, 9, 11)
    w, ws, bias = rand_i8(o, c // g, k, k), torch.rand(o) * 0.01, torch.randn(o)
    hi = torch.full((o,), 6.0) if clamp else None
    in_q, out_q = ActivationQParams(0.02, 0, QDtype.INT8), OUT_QS[out_name]
    a = REF.quantize_nhwc(x, in_q)
    assert torch.equal(fast.quantize_nhwc(x, in_q), a)
    geometry = ((s, s), (p, p), (d, d), in_q)
    y_ref = REF.conv2d_codes(a, REF.pack_conv(w, ws, bias, g, hi), *geometry, out_q)
    y = fast.conv2d_codes(a, fast.pack_conv(w, ws, bias, g, hi), *geometry, out_q)
    assert y.dtype == torch.uint8 and y.shape == y_ref.shape and torch.equal(y, y_ref)
    y_float = REF.conv2d_codes(a, REF.pack_conv(w, ws, bias, g, hi), *geometry)
    diff = (REF.quantize_nhwc(y_float.permute(0, 3, 1, 2), out_q).to(torch.int16) - y_ref.to(torch.int16)).abs()
    assert int(diff.max()) <= 1 and float((diff == 0).float().mean()) > 0.9
    assert len(y.unique()) > 20  # the scales above spread the outputs over many codes (not a saturated test)


@pytest.mark.parametrize("channels", [3, 5], ids=["rgb", "5ch"])  # 3: the image input's shuffle interleave
@pytest.mark.parametrize("q", list(OUT_QS.values()), ids=list(OUT_QS))
def test_quantize_nhwc_every_layout_bit_equal(fast, q, channels):
    """NCHW-contiguous input (the layout change fused with quantization), channels_last, a strided view and a
    non-float32 input all give the reference's codes, values beyond the range saturating; `out` is filled."""
    # 221 pixels: 64-pixel blocks and a 29-pixel tail (16 shuffled + 13 by bytes); |x| / scale beyond 255
    x = torch.randn(3, channels, 13, 17) * 3
    for view in (
        x,
        x.contiguous(memory_format=torch.channels_last),
        x[:, :, :, 2:15],
        x.double(),
    ):
        ref = REF.quantize_nhwc(view.float(), q)
        assert torch.equal(fast.quantize_nhwc(view, q), ref)
        out = torch.empty_like(ref)
        assert fast.quantize_nhwc(view, q, out) is out and torch.equal(out, ref)
    assert {0, 255} <= set(ref.unique().tolist())  # saturated both ways
    with pytest.raises(ValueError, match="out must be contiguous uint8"):
        fast.quantize_nhwc(x, q, torch.empty(3, 13, 17, channels - 1, dtype=torch.uint8))


def test_conv2d_codes_channel_mismatch_is_refused(fast):
    a = torch.zeros(1, 4, 4, 8, dtype=torch.uint8)
    p = fast.pack_conv(rand_i8(6, 16, 1, 1), torch.ones(6), None, 1)
    with pytest.raises(ValueError, match="8 channels, the convolution expects 16"):
        fast.conv2d_codes(a, p, (1, 1), (0, 0), (1, 1), ActivationQParams(0.1, 0, QDtype.UINT8))


def test_unknown_backend_lists_valid():
    with pytest.raises(ValueError, match="valid: reference, cpu"):
        get_backend("cuda-fast")


def test_unknown_isa_lists_valid():
    with pytest.raises(ValueError, match="valid: scalar, avx2, avx512vnni"):
        CpuBackend("neon")


def test_fallback_without_avx2_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "best_isa", lambda: "scalar")
    kernels.default_backend.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="octoquant.kernels"):
            first, second = kernels.default_backend(), kernels.default_backend()
        assert first is second and first.name == "reference"
        assert sum("reference kernels" in r.message for r in caplog.records) == 1
    finally:
        kernels.default_backend.cache_clear()  # the next caller re-detects the real CPU


@pytest.mark.parametrize("dtype,zp", [(QDtype.INT8, 0), (QDtype.UINT8, 37)], ids=["s8", "u8-zp37"])
def test_quantize_static_bit_equal_large(fast, dtype, zp):
    """> 64k values: the threaded, vectorised path; ties x.5 round half to even like torch.round."""
    x = torch.randn(3, 40_000) * 4
    x[0, :6] = torch.tensor([0.25, 0.75, -0.25, 1.25, 100.0, -100.0])  # scale 0.5: exact ties, saturation
    scale = 0.5
    q_ref = oq.quantize_tensor(x, torch.tensor(scale), zp, dtype=dtype)
    shift = 128 if dtype is QDtype.INT8 else 0
    q = fast.quantize_static_u8(x, x.shape[1], scale, zp, dtype)
    assert torch.equal((q.to(torch.int32) - shift), q_ref.to(torch.int32))


def test_own_thread_pool_and_openmp_agree():
    """Results do not depend on which thread pool runs the loops (torch's OpenMP or octoquant's own)."""
    from octoquant.kernels import cpu

    if not FAST:
        pytest.skip("no fast backend")
    be = next(iter(FAST.values()))
    a, b = rand_i8(64, 300), rand_i8(300, 1000)
    with_omp = be.int8_mm(a, b)
    cpu._C.use_openmp(0, 0)
    try:
        assert cpu._C.threading() == "own-pool"
        assert torch.equal(be.int8_mm(a, b), with_omp)
    finally:
        cpu._share_torch_openmp()
    assert cpu._C.threading() == cpu.THREADING


@pytest.mark.parametrize(
    "cfg", [CONVS["pointwise"], CONVS["depthwise-s2"], CONVS["stem-3x3-s2"]], ids=["1x1", "dw", "3x3"]
)
def test_conv2d_fused_clamp_bit_equal(fast, cfg):
    c, o, k, s, p, d, g = cfg
    x = torch.randn(2, c, 9, 11)
    w, ws, bias = rand_i8(o, c // g, k, k), torch.rand(o) * 0.01, torch.randn(o)
    hi = torch.rand(o) * 0.5  # per-channel upper bounds that actually clip
    args = ((s, s), (p, p), (d, d), ActivationQParams(0.03, 100, QDtype.UINT8))
    y_ref = REF.conv2d_static(x, REF.pack_conv(w, ws, bias, g, hi), *args)
    y = fast.conv2d_static(x, fast.pack_conv(w, ws, bias, g, hi), *args)
    assert torch.equal(y.contiguous(), y_ref.contiguous())
    assert (y_ref <= hi.reshape(1, -1, 1, 1)).all() and (y_ref >= 0).all() and (y_ref == 0).any()


def test_weight_buffers_are_disjoint_aligned_and_outlive_the_allocator():
    from octoquant.kernels import cpu

    shapes = [((100, 3), torch.int8), ((10, 16), torch.float32), ((7,), torch.int32), ((0, 4), torch.int8)]
    bufs = [cpu.weight_buffer(s, d) for s, d in shapes]
    for (shape, dtype), b in zip(shapes, bufs, strict=True):
        assert b.shape == shape and b.dtype == dtype and b.is_contiguous()
        assert b.data_ptr() % 64 == 0
    spans = sorted((b.data_ptr(), b.data_ptr() + b.numel() * b.element_size()) for b in bufs if b.numel())
    assert all(end <= start for (_, end), (start, _) in zip(spans[:-1], spans[1:], strict=True))  # no overlap
    for i, b in enumerate(bufs):
        b.fill_(i + 1)
    big = cpu.weight_buffer((3 << 20,), torch.uint8)  # >= 2 MiB: a mapping of its own
    if cpu._huge_pages is not None:
        assert big.data_ptr() % cpu.HUGE_PAGE == 0
    big.fill_(9)
    del big
    import gc

    gc.collect()
    for i, b in enumerate(bufs):  # the slab lives as long as a tensor in it
        assert bool((b == i + 1).all())


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages (KiB) of the mapping holding `address` in this process."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def _thp_fallbacks() -> int:
    with open("/proc/vmstat") as f:
        return sum(int(v) for k, v in (line.split() for line in f) if k == "thp_fault_fallback")


def test_large_packed_weights_sit_on_huge_pages_and_stay_exact():
    from octoquant.kernels import cpu

    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:
        pytest.skip("no transparent huge pages on this OS")
    if "[never]" in mode or cpu._huge_pages is None or "cpu-avx512vnni" not in FAST and "cpu-avx2" not in FAST:
        pytest.skip(f"THP off ({mode.strip()}) or no fast backend")
    fast = FAST["cpu-avx512vnni"] if "cpu-avx512vnni" in FAST else FAST["cpu-avx2"]
    a, b = rand_i8(3, 2048), rand_i8(2048, 2048)  # 4 MiB of packed weights: two whole huge pages
    before = _thp_fallbacks()
    p = fast.pack_w8a8(b.T, torch.ones(2048), None)
    huge = _anon_huge_kib(p.packed.data_ptr())
    if huge == 0 and _thp_fallbacks() > before:
        pytest.skip("the kernel had no free huge page (thp_fault_fallback rose)")
    assert huge >= 2048, f"packed weights on {huge} KiB of huge pages"
    assert p.packed.data_ptr() % cpu.HUGE_PAGE == 0
    assert torch.equal(fast.int8_mm(a, b), REF.int8_mm(a, b))
