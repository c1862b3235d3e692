"""maca_kernels: fast, exact kernels for length-aware (MaCa) post-training quantization of LLMs."""

from .formats.gptq import dequantize_gptq, pack_gptq, unpack_gptq
from .nn import QuantLinear
from .ops.gptq import GPTQResult, gptq_quantize
from .ops.hessian import accumulate_hessian
from .ops.hessian.accumulator import HessianAccumulator
from .ops.quant_matmul.op import quant_matmul

__version__ = "0.1.0"

__all__ = [
    "GPTQResult",
    "HessianAccumulator",
    "QuantLinear",
    "__version__",
    "accumulate_hessian",
    "dequantize_gptq",
    "gptq_quantize",
    "pack_gptq",
    "quant_matmul",
    "unpack_gptq",
]
