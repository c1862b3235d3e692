"""Checkpoint formats: the GPTQ packing of quantized weights, zero points and scales."""

from .gptq import (
    CHECKPOINT_FORMATS,
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
    "CHECKPOINT_FORMATS",
    "SUPPORTED_BITS",
    "dequantize_gptq",
    "pack_gptq",
    "pack_gptq_zeros",
    "pack_scales",
    "unpack_gptq",
    "unpack_gptq_zeros",
    "unpack_scales",
]
