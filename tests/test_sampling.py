import torch

from octoquant.sampling import SampleSketch


def _kept(batches, unit_dims, budget):
    sk = SampleSketch(unit_dims, budget)
    for b in batches:
        sk.add(b)
    return sk


def test_sketch_keeps_the_same_units_whatever_the_batching_and_order():
    g = torch.Generator().manual_seed(0)
    for shape, unit_dims, budget in [((12, 50, 1536), 1, 200 * 1536), ((24, 3, 40, 30), 3, 10 * 3600)]:
        x = torch.randn(*shape, generator=g)
        a = _kept(list(x.split(5)), unit_dims, budget)
        b = _kept(list(x.flip(0).split(7)), unit_dims, budget)
        c = _kept([x], unit_dims, budget)
        assert a.k < x.reshape(-1, *shape[len(shape) - unit_dims :]).shape[0]  # it did drop units
        for s in (b, c):
            assert torch.equal(a.units, s.units)
            # (a unit's key is a float64 dot product: its last bits may follow the batch's row count)
            assert torch.allclose(a.keys, s.keys, rtol=0, atol=1e-6)
        # every kept unit is one of the inputs, and the keys are the smallest ones, ascending
        units = x.reshape(-1, *shape[len(shape) - unit_dims :]).reshape(-1, a.units[0].numel())
        kept = a.units.reshape(a.k, -1)
        assert all(bool((units == row).all(dim=1).any()) for row in kept)
        assert bool((a.keys[1:] >= a.keys[:-1]).all()) and bool((a.keys >= 0).all() and (a.keys < 1).all())
