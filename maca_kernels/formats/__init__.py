"""Checkpoint formats: the GPTQ packing of quantized weights, zero points and scales."""

from .gptq import (
    CONVENTIONS,
    SUPPORTED_BITS,
    dequantize_gptq,
    pack_gptq,
    pack_gptq_zeros,
    pack_scales,
    unpack_gptq,
    unpack_gptq_zeros,
    unpack_scales,
)

__all__ = [
    "CONVENTIONS",
    "SUPPORTED_BITS",
    "dequantize_gptq",
    "pack_gptq",
    "pack_gptq_zeros",
    "pack_scales",
    "unpack_gptq",
    "unpack_gptq_zeros",
    "unpack_scales",
]
