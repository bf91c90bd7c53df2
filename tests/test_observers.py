import numpy as np
import pytest
import torch

import octoquant as oq
from octoquant import PerChannel, PerTensor, QScheme
from octoquant.observers import OBSERVERS, CalibrationError, make_observer

# MSE clip from histogram bin centres must land this close (relative) to a brute-force search on raw data.
MSE_CLIP_RTOL = 0.02


def gaussian_with_outliers(n=200_000, outliers=20, value=40.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[torch.randperm(n, generator=g)[:outliers]] = value
    return x


def test_minmax_keeps_outliers_percentile_and_entropy_clip_them():
    # (mse is not in this list: with 1e-4 of the mass at 40, keeping the outliers is the MSE optimum;
    # test_mse_clip_close_to_bruteforce checks that it finds its optimum)
    x = gaussian_with_outliers()
    ranges = {}
    for kind in ["minmax", "percentile", "entropy"]:
        obs = make_observer(kind)
        obs.update(x)
        ranges[kind] = obs.compute_range()
    assert ranges["minmax"][1].item() == 40.0
    for kind in ["percentile", "entropy"]:
        assert 2.0 < ranges[kind][1].item() < 10.0, (kind, ranges[kind])


@pytest.mark.parametrize("pct", [99.0, 99.9, 99.99])
def test_percentile_is_where_the_empirical_cdf_crosses(pct):
    x = torch.randn(100_000)
    obs = oq.observers.PercentileObserver(percentile=pct)
    obs.update(x)
    lo, hi = obs.compute_range()
    w = obs.hist.bin_width().item()  # the histogram's resolution
    p = pct / 100
    # within one bin of the exact empirical quantile: the CDF crosses p between value - w and value + w
    assert (x <= hi - w).double().mean() <= p <= (x <= hi + w).double().mean()
    assert (x < lo - w).double().mean() <= 1 - p <= (x < lo + w).double().mean()


def _entropy_reference(x: np.ndarray, bins: int, levels: int = 128) -> float:
    """Loop-per-candidate reference of the KL search over the |x| histogram (same chunking rule)."""
    absmax = np.abs(x).max()
    top = 2.0 ** np.frexp(absmax)[1]
    h, edges = np.histogram(np.abs(x), bins=bins // 2, range=(0.0, top))
    h = h.astype(np.float64)
    last = np.nonzero(h)[0][-1] + 1
    h[0] = h[1]  # the zero-spike rule of the implementation
    cands = np.unique(np.round(np.linspace(levels, last, 384)).astype(int))
    best, best_kl = None, np.inf
    for i in cands:
        p = h[:i].copy()
        p[i - 1] += h[i:last].sum()
        chunk = (np.arange(i) * levels) // i
        q = np.zeros(i)
        for c in range(levels):
            m = (chunk == c) & (h[:i] > 0)
            if m.any():
                q[m] = h[:i][chunk == c].sum() / m.sum()
        p, q = p / p.sum(), q / q.sum()
        safe_p = np.where(p > 0, p, 1.0)
        kl = np.sum(np.where(p > 0, p * np.log(safe_p / np.where(q > 0, q, 1e-12)), 0.0))
        if kl < best_kl:
            best, best_kl = i, kl
    return best * (edges[1] - edges[0])


def test_entropy_matches_loop_reference():
    x = gaussian_with_outliers(n=50_000, outliers=5, value=12.0)
    obs = oq.observers.EntropyObserver(bins=2048)
    obs.update(x)
    _, hi = obs.compute_range()
    ref = _entropy_reference(x.numpy(), bins=2048)
    assert hi.item() == pytest.approx(ref, rel=1e-6)


def test_mse_clip_close_to_bruteforce():
    x = gaussian_with_outliers(n=100_000, outliers=10, value=25.0)
    obs = oq.observers.MSEObserver()
    obs.update(x)
    _, hi = obs.compute_range()
    xd = x.double()
    grid = torch.linspace(0.5, 25.0, 2000, dtype=torch.float64)
    errs = []
    for t in grid:
        s = t / 127
        errs.append(((xd - torch.clamp(torch.round(xd / s), -128, 127) * s) ** 2).mean())
    t_best = grid[int(torch.argmin(torch.stack(errs)))].item()
    assert hi.item() == pytest.approx(t_best, rel=MSE_CLIP_RTOL)


def _batches(x, sizes):
    out, i = [], 0
    for s in sizes:
        out.append(x[i : i + s])
        i += s
    return out


SCHEMES = {
    "per-tensor-sym": QScheme(),
    "per-tensor-asym-u8": QScheme(dtype="uint8", symmetric=False),
    "per-channel-1": QScheme(granularity=PerChannel(1)),
}


@pytest.mark.parametrize("kind", list(OBSERVERS))
@pytest.mark.parametrize("scheme", list(SCHEMES.values()), ids=list(SCHEMES))
def test_order_and_batch_size_independent(kind, scheme):
    if kind == "entropy" and not isinstance(scheme.granularity, PerTensor):
        pytest.skip("entropy is per-tensor only")
    x = torch.randn(96, 16) * torch.linspace(0.01, 30.0, 16)
    x[5, 3] = 200.0  # an outlier late in one ordering, early in the other
    a = make_observer(kind, scheme)
    for b in _batches(x, [32, 32, 32]):
        a.update(b)
    b_obs = make_observer(kind, scheme)
    perm = torch.randperm(96)
    for b in _batches(x[perm], [7, 50, 1, 38]):
        b_obs.update(b)
    ra, rb = a.compute_range(), b_obs.compute_range()
    assert torch.equal(ra[0], rb[0]) and torch.equal(ra[1], rb[1])
    assert all(torch.equal(p, q) for p, q in zip(a.qparams(), b_obs.qparams(), strict=True))


@pytest.mark.parametrize("kind", list(OBSERVERS))
def test_nan_batch_names_the_observer(kind):
    obs = make_observer(kind, name="encoder.layer.0.input")
    obs.update(torch.randn(4, 4))
    bad = torch.randn(4, 4)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"batch 1 for 'encoder.layer.0.input' contains Inf at index \[1, 2\]"):
        obs.update(bad)


@pytest.mark.parametrize("kind", list(OBSERVERS))
def test_no_data_raises(kind):
    obs = make_observer(kind, name="fc1")
    with pytest.raises(CalibrationError, match="'fc1' saw no data"):
        obs.compute_range()


@pytest.mark.parametrize("kind", list(OBSERVERS))
def test_all_zero_data_gives_valid_scale(kind):
    obs = make_observer(kind)
    obs.update(torch.zeros(8, 8))
    scale, zp = obs.qparams()
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(oq.fake_quantize(torch.zeros(8, 8), scale, zp), torch.zeros(8, 8))


def test_per_channel_with_all_zero_channel():
    x = torch.randn(64, 4)
    x[:, 2] = 0
    obs = make_observer("mse", QScheme(granularity=PerChannel(1)))
    obs.update(x)
    scale, _ = obs.qparams()
    assert scale[2].item() == 1.0 and (scale[[0, 1, 3]] < 1.0).all()


def test_unknown_calibrator_lists_valid():
    with pytest.raises(ValueError, match="valid: minmax, moving_average, percentile, entropy, mse"):
        make_observer("kl")


def test_channel_count_change_raises():
    obs = make_observer("minmax", QScheme(granularity=PerChannel(1)))
    obs.update(torch.randn(4, 8))
    with pytest.raises(ValueError, match="8"):
        obs.update(torch.randn(4, 6))


def test_entropy_on_relu_output_keeps_the_bulk():
    """Post-ReLU data: half exact zeros. The zero spike must not drive the KL search to the narrowest cut."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200_000, generator=g).relu() * 2.0
    obs = make_observer("entropy", QScheme(dtype="uint8", symmetric=False))
    obs.update(x)
    _, hi = obs.compute_range()
    # the positive half-normal with sigma 2 has its 99th percentile at 5.15; KL clips the far tail only
    assert 3.5 < hi.item() <= x.max().item()
