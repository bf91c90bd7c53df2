import pytest
import torch

from octoquant import PerChannel, QDtype, choose_qparams, dequantize
from octoquant import quantize_tensor as quantize


@pytest.mark.parametrize("dtype", [QDtype.INT8, QDtype.UINT8], ids=lambda d: d.value)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("narrow", [False, True], ids=["full", "narrow"])
def test_zero_exactly_representable_and_zp_in_range(dtype, symmetric, narrow):
    lo = torch.tensor([-3.7, 0.5, -0.001, -10.0, 0.0])
    hi = torch.tensor([1.3, 2.0, 0.002, -1.0, 0.0])
    scale, zp = choose_qparams(lo, hi, dtype, symmetric, narrow)
    qmin, qmax = dtype.qrange(narrow)
    assert zp.dtype == torch.int32 and (zp >= qmin).all() and (zp <= qmax).all()
    assert (scale > 0).all() and torch.isfinite(scale).all()
    q = quantize(torch.zeros(5), scale, zp, dtype=dtype, narrow_range=narrow, granularity=PerChannel(0))
    assert torch.equal(q.to(torch.int32), zp)
    assert torch.equal(dequantize(q, scale, zp, PerChannel(0)), torch.zeros(5))


def test_symmetric_int8_scale_is_absmax_over_127():
    scale, zp = choose_qparams(torch.tensor(-2.54), torch.tensor(1.0), QDtype.INT8, symmetric=True)
    assert scale.item() == pytest.approx(2.54 / 127, rel=1e-7) and zp.item() == 0
    scale_u, zp_u = choose_qparams(torch.tensor(-2.54), torch.tensor(1.0), QDtype.UINT8, symmetric=True)
    assert scale_u.item() == scale.item() and zp_u.item() == 128


def test_asymmetric_uint8_covers_range():
    scale, zp = choose_qparams(torch.tensor(0.0), torch.tensor(6.0), QDtype.UINT8, symmetric=False)
    assert zp.item() == 0 and scale.item() == pytest.approx(6.0 / 255)


def test_all_zero_range_gives_valid_scale():
    scale, zp = choose_qparams(torch.zeros(3), torch.zeros(3), QDtype.INT8, symmetric=False)
    assert torch.equal(scale, torch.ones(3))
    x = torch.zeros(3)
    q = quantize(x, scale, zp, PerChannel(0))
    assert torch.equal(dequantize(q, scale, zp, PerChannel(0)), x)


@pytest.mark.parametrize(
    "lo, hi, match",
    [
        (1.0, -1.0, "min > max"),
        (float("nan"), 1.0, "NaN or Inf"),
        (0.0, float("inf"), "NaN or Inf"),
    ],
    ids=["min-gt-max", "nan", "inf"],
)
def test_bad_ranges_raise(lo, hi, match):
    with pytest.raises(ValueError, match=match):
        choose_qparams(lo, hi)


def test_unsupported_dtype_raises_listing_valid():
    with pytest.raises(ValueError, match="valid: int8, uint8"):
        choose_qparams(-1.0, 1.0, dtype="int4")
    with pytest.raises(ValueError, match="unknown quantized dtype"):
        choose_qparams(-1.0, 1.0, dtype=torch.float16)
