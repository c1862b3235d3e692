"""maca_kernels: fast, exact kernels for length-aware (MaCa) post-training quantization of LLMs."""

from .formats.gptq import dequantize_gptq, pack_gptq, unpack_gptq
from .ops.gptq import GPTQResult, gptq_quantize
from .ops.hessian import accumulate_hessian
from .ops.hessian.accumulator import HessianAccumulator

__version__ = "0.1.0"

__all__ = [
    "GPTQResult",
    "HessianAccumulator",
    "__version__",
    "accumulate_hessian",
    "dequantize_gptq",
    "gptq_quantize",
    "pack_gptq",
    "unpack_gptq",
]
