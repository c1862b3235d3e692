"""maca_kernels: fast, exact kernels for length-aware (MaCa) post-training quantization of LLMs."""

from . import calibration
from .checkpoint import load_quantized, quantization_config, save_quantized
from .formats.gptq import dequantize_gptq, pack_gptq, pack_gptq_zeros, pack_scales, unpack_gptq
from .nn import QuantLinear, enable_cuda_gemv
from .ops.gptq import GPTQResult, HessianFactor, gptq_factor, gptq_quantize, gptq_quantize_batched
from .ops.gptq.rtn import rtn_quantize
from .ops.hessian import accumulate_hessian
from .ops.hessian.accumulator import HessianAccumulator
from .ops.quant_matmul.decode_layout import DecodeWeight, to_decode_weight
from .ops.quant_matmul.op import quant_matmul
from .pipeline import quantize_model
from .pipeline.streamed import quantize_folder

__version__ = "0.1.0"

__all__ = [
    "DecodeWeight",
    "GPTQResult",
    "HessianFactor",
    "HessianAccumulator",
    "QuantLinear",
    "__version__",
    "accumulate_hessian",
    "calibration",
    "dequantize_gptq",
    "enable_cuda_gemv",
    "gptq_factor",
    "gptq_quantize",
    "gptq_quantize_batched",
    "load_quantized",
    "pack_gptq",
    "pack_gptq_zeros",
    "pack_scales",
    "quant_matmul",
    "quantization_config",
    "quantize_folder",
    "quantize_model",
    "rtn_quantize",
    "save_quantized",
    "to_decode_weight",
    "unpack_gptq",
]
