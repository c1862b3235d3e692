"""nn.Modules built on the kernels."""

from .quant_linear import QuantLinear, enable_cuda_gemv

__all__ = ["QuantLinear", "enable_cuda_gemv"]
