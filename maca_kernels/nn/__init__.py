"""nn.Modules built on the kernels."""

from .quant_linear import QuantLinear

__all__ = ["QuantLinear"]
