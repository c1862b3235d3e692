"""Backends for other quantizers: their GPTQ accumulates with ``HessianAccumulator`` and solves with
``gptq_quantize``, MaCa weighting one argument away. Import the submodule of the tool you use
(``maca_kernels.integrations.gptqmodel`` or ``.llmcompressor``); each patches only inside its
``backend(...)`` context (or between ``enable()`` and ``disable()``)."""
