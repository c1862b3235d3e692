"""maca_kernels: fast, exact kernels for length-aware (MaCa) post-training quantization of LLMs."""

from .ops.hessian import accumulate_hessian
from .ops.hessian.accumulator import HessianAccumulator

__version__ = "0.1.0"

__all__ = ["HessianAccumulator", "__version__", "accumulate_hessian"]
