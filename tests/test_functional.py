import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import octoquant as oq
from octoquant import PerChannel, PerGroup, PerTensor, PerToken, QDtype

# Float32 division before rounding may move a value by one ulp across a rounding boundary:
# the bound |x - x_hat| <= scale / 2 then holds up to this relative slack.
ROUNDING_SLACK = 1e-5

GRANULARITIES = [PerTensor(), PerChannel(0), PerChannel(1), PerToken(), PerGroup(4)]

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


def _qparams(x, g, dtype, symmetric):
    lo, hi = oq.reduce_minmax(x, g)
    return oq.choose_qparams(lo, hi, dtype, symmetric)


def _expand(p, x, g):
    """Parameter broadcast to x's shape (test-side, independent of functional._param_view)."""
    if isinstance(g, PerTensor):
        return p.expand_as(x)
    if isinstance(g, PerChannel):
        shape = [1] * x.dim()
        shape[g.axis] = -1
        return p.reshape(shape).expand_as(x)
    if isinstance(g, PerToken):
        return p.unsqueeze(-1).expand_as(x)
    return p.repeat_interleave(g.group_size, dim=-1)


@pytest.mark.parametrize("granularity", GRANULARITIES, ids=repr)
@pytest.mark.parametrize("dtype", [QDtype.INT8, QDtype.UINT8], ids=lambda d: d.value)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@settings(max_examples=40, deadline=None)
@given(
    data=hnp.arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(1, 3).map(lambda n: 4 * n)), elements=finite)
)
def test_roundtrip_error_within_half_scale(granularity, dtype, symmetric, data):
    x = torch.from_numpy(data)
    scale, zp = _qparams(x, granularity, dtype, symmetric)
    q = oq.quantize_tensor(x, scale, zp, granularity, dtype)
    assert q.dtype == dtype.torch_dtype
    x_hat = oq.dequantize(q, scale, zp, granularity)
    bound = _expand(scale, x, granularity) / 2 * (1 + ROUNDING_SLACK)
    assert ((x - x_hat).abs() <= bound).all()
    # fake_quantize is exactly dequantize(quantize(.))
    assert torch.equal(oq.fake_quantize(x, scale, zp, granularity, dtype), x_hat)


@pytest.mark.parametrize("granularity", GRANULARITIES, ids=repr)
@pytest.mark.parametrize("dtype", [QDtype.INT8, QDtype.UINT8], ids=lambda d: d.value)
@settings(max_examples=30, deadline=None)
@given(data=hnp.arrays(np.float32, (3, 8), elements=finite), factor=st.floats(1.5, 100.0))
def test_values_outside_range_saturate(granularity, dtype, data, factor):
    x = torch.from_numpy(data)
    scale, zp = _qparams(x, granularity, dtype, symmetric=False)
    qmin, qmax = dtype.qrange()
    big = (x.abs().max() + 256 * scale.max()) * factor  # beyond the clip range whatever the scale
    q_hi = oq.quantize_tensor(torch.full_like(x, big), scale, zp, granularity, dtype)
    q_lo = oq.quantize_tensor(torch.full_like(x, -big), scale, zp, granularity, dtype)
    assert (q_hi.to(torch.int32) == qmax).all() and (q_lo.to(torch.int32) == qmin).all()


@pytest.mark.parametrize("granularity", GRANULARITIES, ids=repr)
@pytest.mark.parametrize("dtype", [QDtype.INT8, QDtype.UINT8], ids=lambda d: d.value)
@settings(max_examples=30, deadline=None)
@given(data=hnp.arrays(np.float32, (2, 8), elements=finite))
def test_zero_roundtrips_exactly(granularity, dtype, data):
    x = torch.from_numpy(data)
    x[:, ::3] = 0.0
    scale, zp = _qparams(x, granularity, dtype, symmetric=False)
    x_hat = oq.fake_quantize(x, scale, zp, granularity, dtype)
    assert (x_hat[:, ::3] == 0.0).all()


def test_round_half_to_even():
    q = oq.quantize_tensor(torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5]), torch.tensor(1.0))
    assert q.tolist() == [0, 2, 2, 0, -2]


def test_narrow_range_never_emits_minus_128():
    q = oq.quantize_tensor(torch.tensor([-1000.0]), torch.tensor(1.0), narrow_range=True)
    assert q.item() == -127


def test_per_group_scales_are_independent():
    x = torch.cat([torch.full((1, 4), 0.01), torch.full((1, 4), 100.0)], dim=1)
    q, scale, zp = oq.quantize_dynamic(x, PerGroup(4))
    assert scale.shape == (1, 2)
    assert torch.allclose(oq.dequantize(q, scale, zp, PerGroup(4)), x, rtol=1e-2)


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        oq.quantize_tensor(torch.zeros(2, 10), torch.ones(2, 3), 0, PerGroup(3))


def test_scale_shape_mismatch_raises():
    with pytest.raises(ValueError, match="does not match"):
        oq.quantize_tensor(torch.zeros(4, 8), torch.ones(3), 0, PerChannel(0))


def test_dequantize_rejects_float():
    with pytest.raises(ValueError, match="int8/uint8"):
        oq.dequantize(torch.zeros(3), torch.tensor(1.0))


def test_nan_in_weight_names_location():
    w = torch.randn(4, 4)
    w[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN at index \[2, 3\]"):
        oq.reduce_minmax(w, PerChannel(0))


def test_metrics():
    x = torch.randn(1000)
    assert oq.sqnr_db(x, x) == float("inf")
    noisy = x + 0.01 * torch.randn(1000)
    assert 35 < oq.sqnr_db(x, noisy) < 45  # noise power 1e-4 of signal power 1: ~40 dB
    assert oq.cosine_similarity(x, 2 * x).item() == pytest.approx(1.0)
    assert oq.cosine_similarity(x, -x).item() == pytest.approx(-1.0)
    assert oq.max_abs_error(x, x + 0.5) == pytest.approx(0.5)
