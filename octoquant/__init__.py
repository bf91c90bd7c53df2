"""octoquant: INT8 post-training quantization for PyTorch.

import octoquant as oq
scale, zp = oq.choose_qparams(x.min(), x.max())
x_hat = oq.fake_quantize(x, scale, zp)
"""

from . import evaluate, export, hf
from .checkpoint import CheckpointError, load, save
from .config import (
    LLM_INT8,
    W8A8,
    W8A8_DYNAMIC,
    W8A16,
    Calibrator,
    Config,
    Granularity,
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    QDtype,
    QScheme,
    QuantMode,
)
from .convert import quantize, search_dynamic_fallback, sensitivity, static_to_dynamic, summary
from .functional import (
    check_finite,
    cosine_similarity,
    dequantize,
    fake_quantize,
    max_abs_error,
    quantize_dynamic,
    reduce_minmax,
    sqnr_db,
)
from .functional import quantize as quantize_tensor
from .observers import CalibrationError, make_observer
from .qparams import choose_qparams
from .streaming import quantize_checkpoint

__version__ = "0.1.0"

__all__ = [
    "quantize",
    "sensitivity",
    "static_to_dynamic",
    "search_dynamic_fallback",
    "summary",
    "save",
    "load",
    "CheckpointError",
    "quantize_checkpoint",
    "evaluate",
    "export",
    "hf",
    "Config",
    "W8A8",
    "W8A8_DYNAMIC",
    "LLM_INT8",
    "W8A16",
    "QuantMode",
    "Calibrator",
    "QDtype",
    "QScheme",
    "Granularity",
    "PerTensor",
    "PerChannel",
    "PerToken",
    "PerGroup",
    "choose_qparams",
    "quantize_tensor",
    "dequantize",
    "fake_quantize",
    "quantize_dynamic",
    "reduce_minmax",
    "check_finite",
    "sqnr_db",
    "cosine_similarity",
    "max_abs_error",
    "make_observer",
    "CalibrationError",
    "__version__",
]
