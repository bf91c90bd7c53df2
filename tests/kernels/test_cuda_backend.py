"""The `cuda` row of the backend table against the reference.

Without a GPU the Triton kernels run in Triton's interpreter on CPU (the GPU's numerics: int32 accumulation,
float32 epilogue); with one, the same tests run on the device. int32 results bit-equal, rescaled within 1 LSB.
"""

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed", allow_module_level=True)

from octoquant.config import QDtype, QuantMode  # noqa: E402
from octoquant.kernels import get_backend  # noqa: E402
from octoquant.kernels.cuda import int_mm_padded  # noqa: E402
from octoquant.nn import QLinear  # noqa: E402

REF = get_backend("reference")
CUDA = get_backend("cuda")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rand_i8(*shape):
    return torch.randint(-128, 128, shape, dtype=torch.int8)


def on_dev(*ts):
    return [None if t is None else t.to(DEV) for t in ts]


SHAPES = [(1, 1, 1), (1, 17, 33), (3, 5, 7), (16, 64, 16), (33, 100, 47), (70, 257, 130)]


@pytest.mark.parametrize("m,k,n", SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in SHAPES])
def test_int8_mm_bit_equal(m, k, n):
    a, b = rand_i8(m, k), rand_i8(k, n)
    out = CUDA.int8_mm(*on_dev(a, b)).cpu()
    assert out.dtype == torch.int32 and torch.equal(out, REF.int8_mm(a, b))


@pytest.mark.parametrize("av,bv", [(-128, -128), (127, -128)], ids=["minus128-sq", "127-x-minus128"])
def test_int8_mm_extremes(av, bv):
    a = torch.full((3, 1024), av, dtype=torch.int8)
    b = torch.full((1024, 5), bv, dtype=torch.int8)
    assert torch.equal(CUDA.int8_mm(*on_dev(a, b)).cpu(), torch.full((3, 5), av * bv * 1024, dtype=torch.int32))


@pytest.mark.parametrize("m,k,n", [(1, 3, 5), (16, 8, 8), (17, 9, 13)], ids=["m1", "m16", "odd-kn"])
def test_int_mm_padding_meets_cublas_rules_exactly(m, k, n):
    """torch._int_mm needs M > 16 and K, N multiples of 8 on CUDA: zero padding must not change the sum."""
    a, b = rand_i8(m, k), rand_i8(k, n)
    assert torch.equal(int_mm_padded(a, b), REF.int8_mm(a, b))


def _activations():
    x = torch.randn(9, 67) * 3
    x[1] = 0.0  # all-zero row: scale 1.0
    x[2] = 1e-30  # tiny values
    x[3, :5] = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5])  # ties after division
    x[4] *= 1e6
    x[5, 7] = 127.0 * 3  # the row's absmax lands exactly on 127
    return x


@pytest.mark.parametrize("k", [64, 67], ids=["one-pass", "two-pass"])  # the interpreter's row block is 64
def test_quantize_per_token_bit_equal(k):
    x = _activations()[:, :k].contiguous()
    q_ref, s_ref = REF.quantize_per_token(x)
    q, s = CUDA.quantize_per_token(x.to(DEV))
    assert torch.equal(s.cpu(), s_ref) and torch.equal(q.cpu(), q_ref)


def test_quantize_per_token_bf16_input_bit_equal():
    x = _activations().to(torch.bfloat16)
    q_ref, s_ref = REF.quantize_per_token(x)
    q, s = CUDA.quantize_per_token(x.to(DEV))
    assert torch.equal(s.cpu(), s_ref) and torch.equal(q.cpu(), q_ref)


def _one_lsb(row_scale, col_scale):
    return row_scale.reshape(-1, 1) * col_scale.reshape(1, -1)


@pytest.mark.parametrize("k", [64, 67, 1], ids=["k64", "k67", "k1"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_linear_dynamic_within_one_lsb(k, with_bias):
    x = _activations()[:, :k]
    w, ws = rand_i8(37, k), torch.rand(37) * 0.01
    bias = torch.randn(37) if with_bias else None
    y_ref = REF.linear_dynamic(x, REF.pack_w8a8(w, ws, bias))
    y = CUDA.linear_dynamic(*on_dev(x), CUDA.pack_w8a8(*on_dev(w, ws, bias))).cpu()
    _, row_scale = REF.quantize_per_token(x)
    assert y.dtype == torch.float32
    assert (y - y_ref).abs().le(_one_lsb(row_scale, ws) + 1e-6).all()


@pytest.mark.parametrize(
    "dtype,zp", [(QDtype.INT8, 0), (QDtype.UINT8, 0), (QDtype.UINT8, 117)], ids=["s8", "u8-zp0", "u8-zp117"]
)
def test_linear_static_within_one_lsb(dtype, zp):
    x = torch.randn(21, 50) * 2
    w, ws, bias = rand_i8(19, 50), torch.rand(19) * 0.01, torch.randn(19)
    y_ref = REF.linear_static(x, REF.pack_w8a8(w, ws, bias), 0.03, zp, dtype)
    y = CUDA.linear_static(*on_dev(x), CUDA.pack_w8a8(*on_dev(w, ws, bias)), 0.03, zp, dtype).cpu()
    assert (y - y_ref).abs().le(_one_lsb(torch.tensor([0.03]), ws) + 1e-6).all()


# W8A16 sums float products in another order than the reference (and applies per-channel scales after the sum):
# float32 rounding only.
W8A16_RTOL = 1e-5


@pytest.mark.parametrize("m", [1, 3, 5, 20], ids=["gemv-m1", "gemv-m3", "mm-m5", "mm-m20"])
@pytest.mark.parametrize("group_size", [None, 64], ids=["per-channel", "group64"])
def test_linear_weight_only_matches_reference(m, group_size):
    k, n = 192, 35
    x, w = torch.randn(m, k), rand_i8(n, k)
    ws = torch.rand(n, k // (group_size or k)) * 0.01
    bias = torch.randn(n)
    y_ref = REF.linear_weight_only(x, REF.pack_w8a16(w, ws, group_size or k, bias))
    y = CUDA.linear_weight_only(*on_dev(x), CUDA.pack_w8a16(*on_dev(w, ws), group_size or k, bias.to(DEV))).cpu()
    assert torch.allclose(y, y_ref, rtol=W8A16_RTOL, atol=W8A16_RTOL * y_ref.abs().max().item())


def test_weight_only_group_not_tile_aligned_falls_back_exactly():
    k, n, g = 60, 9, 20  # 20 is no multiple of the kernels' K tile: the reference computes it
    x, w, ws = torch.randn(2, k), rand_i8(n, k), torch.rand(n, k // g) * 0.01
    y_ref = REF.linear_weight_only(x, REF.pack_w8a16(w, ws, g, None))
    y = CUDA.linear_weight_only(*on_dev(x), CUDA.pack_w8a16(*on_dev(w, ws), g, None)).cpu()
    assert torch.equal(y, y_ref)


@pytest.mark.parametrize("mode", [QuantMode.W8A8_DYNAMIC, QuantMode.W8A16], ids=lambda m: m.value)
def test_qlinear_on_cuda_backend_matches_cpu_module(mode):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 24)
    q_cpu = QLinear.from_float(lin, mode, backend="reference")
    q_gpu = QLinear.from_float(lin, mode, backend="cuda").to(DEV)
    x = torch.randn(2, 5, 64)
    y_ref, y = q_cpu(x), q_gpu(x.to(DEV)).cpu()
    assert y.shape == (2, 5, 24)
    assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-5 * y_ref.abs().max().item())


def test_dtype_cast_keeps_scales_float32_and_outputs_follow_input():
    lin = torch.nn.Linear(64, 24)
    q = QLinear.from_float(lin, QuantMode.W8A8_DYNAMIC, backend="cuda")
    scale_before = q.weight_scale.clone()
    q = q.to(DEV, torch.bfloat16)
    assert q.weight_scale.dtype == torch.float32 and torch.equal(q.weight_scale.cpu(), scale_before)
    assert q.bias.dtype == torch.float32 and q.weight.dtype == torch.int8
    y = q(torch.randn(3, 64, dtype=torch.bfloat16, device=DEV))
    assert y.dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_module_on_gpu_picks_cuda_backend():
    q = QLinear.from_float(torch.nn.Linear(64, 24), QuantMode.W8A8_DYNAMIC).cuda()
    assert q.backend.name == "cuda"
