"""BlockChain: a Sequential of convolution blocks (stem conv, inverted residuals `x + conv(x)` / `conv(x)`, last conv)
runs as one kernel program, bit-identical to running the blocks one by one; anything else takes the plain path."""

import copy
import pickle

import pytest
import torch
from torch import nn

import octoquant as oq
from octoquant.kernels import available_isas
from octoquant.nn import BlockChain, QConv2d
from octoquant.nn.conv import BlockForm, _block_form
from tests.nn.test_chain import _unchained as _plain  # block by block, layer by layer
from tests.nn.test_chain import with_bn_statistics

CPU = "avx2" in available_isas()


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU6()
    )


class Inverted(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, order: str = "x+f") -> None:
        super().__init__()
        hidden = 4 * cin
        self.residual, self.order = stride == 1 and cin == cout, order
        self.conv = nn.Sequential(
            _cbr(cin, hidden, 1),
            _cbr(hidden, hidden, 3, stride, hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        if not self.residual:
            return self.conv(x)
        return x + self.conv(x) if self.order == "x+f" else self.conv(x) + x


def block_net() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        _cbr(3, 8, stride=2),
        Inverted(8, 8, 1),  # residual first after the stem
        Inverted(8, 12, 2),  # plain, then a residual reads its float output
        Inverted(12, 12, 1, order="f+x"),
        Inverted(12, 12, 1),
        Inverted(12, 16, 1),  # plain, followed by a plain conv: codes handed over directly
        _cbr(16, 24, 1),
    )
    return with_bn_statistics(m)


class Basic(nn.Module):
    """torchvision's ResNet BasicBlock: one ReLU module called after conv1 and after the residual add."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 8, stride=2)
        self.layers = nn.Sequential(Basic(8, 8, 1), Basic(8, 8, 1), Basic(8, 16, 2), Basic(16, 16, 1))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


def resnet() -> nn.Module:
    torch.manual_seed(0)
    m = TinyResNet()
    return with_bn_statistics(m)


@pytest.fixture(scope="module")
def calib():
    torch.manual_seed(1)
    return [torch.randn(4, 3, 32, 32) for _ in range(3)]


@pytest.mark.skipif(not CPU, reason="no fast backend on this CPU")
def test_blocks_run_as_one_program_bit_identical(calib, monkeypatch):
    from octoquant.kernels.cpu import BlockPlan

    float_model = block_net()
    q = oq.quantize(float_model, oq.W8A8, calib=calib, progress=False)
    assert isinstance(q, BlockChain)
    runs, layer_calls = [], []
    orig_plan, orig_fwd = BlockPlan.__call__, QConv2d.forward

    def spy_plan(self, *a, **k):
        runs.append(self)
        return orig_plan(self, *a, **k)

    def spy_fwd(self, x):
        layer_calls.append(self)
        return orig_fwd(self, x)

    monkeypatch.setattr(BlockPlan, "__call__", spy_plan)
    monkeypatch.setattr(QConv2d, "forward", spy_fwd)
    threads = torch.get_num_threads()
    with torch.no_grad():
        for shape in [(2, 3, 32, 32), (1, 3, 24, 40), (2, 3, 32, 32)]:
            x = torch.randn(shape)
            runs.clear(), layer_calls.clear()
            y = q(x)
            assert len(runs) == 1 and not layer_calls  # one program, no layer called on its own
            plain = _plain(q, x)
            assert layer_calls  # the plain path did run layer by layer
            assert torch.equal(y, plain) and y.stride() == plain.stride()
            torch.set_num_threads(1)
            try:
                assert torch.equal(q(x), y)
            finally:
                torch.set_num_threads(threads)
        assert oq.sqnr_db(float_model(x), y) > 25


def test_block_forms():
    class Relu(Inverted):
        def forward(self, x):
            return torch.relu(x + self.conv(x))

    class Twice(Inverted):
        def forward(self, x):
            return x + self.conv(self.conv(x))

    class Scaled(Inverted):
        def forward(self, x):
            return x + 2 * self.conv(x)

    class Extra(Inverted):
        def forward(self, x, y=None):
            return x + self.conv(x)

    class Sub(Inverted):
        def forward(self, x):
            return x - self.conv(x)

    assert _block_form(Inverted(4, 4, 1)) == BlockForm(("conv",), True)
    assert _block_form(Inverted(4, 4, 1, order="f+x")) == BlockForm(("conv",), True)
    assert _block_form(Inverted(4, 8, 2)) == BlockForm(("conv",), False)
    assert _block_form(Relu(4, 4, 1)) == BlockForm(("conv",), True, None, True)
    assert _block_form(Basic(4, 8, 2)) == BlockForm(("conv1", "bn1", "relu", "conv2", "bn2"), True, "downsample", True)
    for cls in (Twice, Scaled, Extra, Sub):
        assert _block_form(cls(4, 4, 1)) is None, cls.__name__


def test_reference_backend_and_dynamic_models_take_the_plain_path(calib):
    q = oq.quantize(block_net(), oq.W8A8, calib=calib, backend="reference", progress=False)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(q(x), _plain(q, x))  # no block programs in the reference backend: plain path
    qd = oq.quantize(block_net(), oq.W8A8_DYNAMIC, progress=False)
    assert not any(isinstance(m, BlockChain) for m in qd.modules())  # dynamic layers need their float input


def test_save_load_copy_and_pickle(calib, tmp_path):
    q = oq.quantize(block_net(), oq.W8A8, calib=calib, progress=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = q(x)
        oq.save(q, tmp_path / "q")
        with torch.device("meta"):
            arch = block_net()
        loaded = oq.load(tmp_path / "q", arch)
        assert isinstance(loaded, BlockChain) and torch.equal(loaded(x), y)
        assert list(loaded.state_dict()) == list(q.state_dict())
        twin, blob = copy.deepcopy(q), pickle.dumps(q)  # after running: cached programs hold raw addresses
        del q
        assert torch.equal(twin(x), y) and torch.equal(pickle.loads(blob)(x), y)


def test_swapped_block_is_seen(calib):
    q = oq.quantize(block_net(), oq.W8A8, calib=calib, progress=False)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = q(x)
        q[3].conv[2] = nn.Conv2d(48, 12, 1, bias=False)  # a project conv back in float: no longer one program
        after = q(x)
        assert not torch.equal(before, after) and torch.equal(after, _plain(q, x))


@pytest.mark.skipif(not CPU, reason="no fast backend on this CPU")
def test_block_program_refuses_units_that_do_not_fit():
    from octoquant.config import QDtype
    from octoquant.kernels import get_backend
    from octoquant.kernels.reference import ActivationQParams

    be = get_backend("cpu")
    a, b = (QConv2d.from_float(nn.Conv2d(4, 4, 1), input_range=(-1.0, 1.0), backend="cpu") for _ in range(2))
    q = ActivationQParams(0.01, 0, QDtype.UINT8)
    geometry = ((1, 1), (0, 0), (1, 1), q)
    to_float = be.conv_spec((1, 5, 5, 4), a.packed(), *geometry)
    to_codes = be.conv_spec((1, 5, 5, 4), b.packed(), *geometry, q)
    assert not be.block_program([(False, [to_float], q, None, False), (True, [to_float], None, None, True)]).float_input
    # a first block adding its own input reads the program's float input
    assert be.block_program([(True, [to_float], q, None, False), (False, [to_float], None, None, False)]).float_input
    with pytest.raises(ValueError, match="must give float"):
        be.block_program(
            [
                (False, [to_float], q, None, False),
                (True, [to_codes], q, None, False),
                (False, [to_float], None, None, False),
            ]
        )
    with pytest.raises(ValueError, match="branch only with a residual"):
        be.block_program([(False, [to_float], q, to_float, False), (False, [to_float], None, None, False)])


def test_empty_batch(calib):
    """A batch of 0 images (null data pointers) runs and gives an empty result, as the plain path does."""
    q = oq.quantize(block_net(), oq.W8A8, calib=calib, progress=False)
    x = torch.randn(0, 3, 32, 32)
    with torch.no_grad():
        y = q(x)
        assert y.shape == _plain(q, x).shape == (0, 24, 8, 8)


@pytest.mark.skipif(not CPU, reason="no fast backend on this CPU")
def test_resnet_blocks_run_as_one_program_bit_identical(calib, monkeypatch):
    """torchvision-style BasicBlocks (identity and downsample branches, ReLU after the add; the stage starts with a
    block that adds its own float input) as one program, bit-identical to the block-by-block path."""
    from octoquant.kernels.cpu import BlockPlan

    float_model = resnet()
    q = oq.quantize(float_model, oq.W8A8, calib=calib, progress=False)
    assert isinstance(q.layers, BlockChain)
    runs = []
    orig = BlockPlan.__call__

    def spy(self, *a, **k):
        runs.append(self.float_input)
        return orig(self, *a, **k)

    monkeypatch.setattr(BlockPlan, "__call__", spy)
    with torch.no_grad():
        for shape in [(2, 3, 32, 32), (1, 3, 20, 28)]:
            x = torch.randn(shape)
            runs.clear()
            y = q(x)
            assert runs == [True]  # one program; its first block reads the stage's float input
            assert torch.equal(y, _plain(q, x))
            feats = q.layers(q.stem(x))
            assert float(feats.min()) >= 0.0  # the ReLU after the last add
        assert oq.sqnr_db(float_model(x), y) > 25


@pytest.mark.skipif(not CPU, reason="no fast backend on this CPU")
def test_a_program_times_its_steps_when_asked(calib):
    """ChainProgram.set_profile / step_ns: per-step wall time for layer-by-layer comparisons with other runtimes;
    off, nothing is recorded; the outputs are the same either way."""
    q = oq.quantize(block_net(), oq.W8A8, calib=calib, progress=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for _ in range(3):  # the first calls pack the weights and settle the cached program
            ref = q(x)
        plan = q._units()[1][x.shape[:1] + x.shape[2:] + x.shape[1:2]]
        prog = plan.program
        assert all(t == 0 for t in prog.step_ns())
        prog.set_profile(True)
        assert torch.equal(q(x), ref)
        times = prog.step_ns()
        prog.set_profile(False)
        assert torch.equal(q(x), ref) and all(t == 0 for t in prog.step_ns())
    assert len(times) >= 5 and all(t > 0 for t in times)


@pytest.mark.skipif(not CPU, reason="no fast backend on this CPU")
def test_the_second_call_reuses_the_first_calls_program(calib):
    """The block structure and its program are derived once: packing the weights (first call) does not count as a
    change of the model."""
    q = copy.deepcopy(oq.quantize(block_net(), oq.W8A8, calib=calib, progress=False))  # a copy packs lazily
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        q(x)
        plans = q._block_cache[2]  # the first call's (reading `_units()` here would already re-check)
        q(x)
        assert q._block_cache[2] is plans and len(plans) == 1


@pytest.mark.skipif(not CPU, reason="no fast backend on this CPU")
@pytest.mark.parametrize("how", ["forward hook", "pre-hook", "patched forward"])
def test_observing_any_bypassed_module_runs_it(calib, how):
    """A hook, or a forward patched on the instance, of a module the program bypasses (here the BatchNorm-folded
    Identity inside a block, not a convolution) is honoured: that module is called, by the plain path."""
    q = oq.quantize(block_net(), oq.W8A8, calib=calib, progress=False)
    x = torch.randn(2, 3, 32, 32)
    inner = q[3].conv[3]
    assert isinstance(inner, nn.Identity)
    seen = []
    with torch.no_grad():
        y = q(x)
        if how == "forward hook":
            handle = inner.register_forward_hook(lambda m, i, o: seen.append(m))
        elif how == "pre-hook":
            handle = inner.register_forward_pre_hook(lambda m, i: seen.append(m))
        else:
            inner.forward = lambda t: seen.append(inner) or t
        assert torch.equal(q(x), y) and seen == [inner]
        if how == "patched forward":
            del inner.forward
        else:
            handle.remove()
        seen.clear()
        assert torch.equal(q(x), y) and not seen  # unobserved: the program again


@pytest.mark.skipif(not CPU, reason="no fast backend on this CPU")
def test_program_threads_do_not_change_the_result(calib):
    """A program's kernels split their work between threads (torch's OpenMP pool or octoquant's own): the same
    bits with 1, 2 or 3 threads (more threads than this machine's cores too) and with either pool."""
    from octoquant.kernels import cpu

    x = torch.randn(3, 3, 40, 40)
    quantized = oq.quantize(block_net(), oq.W8A8, calib=calib, progress=False)
    threads = torch.get_num_threads()
    results = []
    try:
        for pool in ("omp", "own"):
            if pool == "own":
                cpu._C.use_openmp(0, 0)
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                q = copy.deepcopy(quantized)  # its programs built in this setting
                with torch.no_grad():
                    results.append((pool, n, q(x), q(x)))
    finally:
        torch.set_num_threads(threads)
        cpu._share_torch_openmp()
    assert cpu._C.threading() == cpu.THREADING
    ref = results[0][2]
    for pool, n, y, again in results:
        assert torch.equal(y, ref) and torch.equal(again, ref), (pool, n)
