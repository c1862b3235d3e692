"""Packed low-bit matmul ``y = x @ dequant(W)ᵀ`` straight from GPTQ checkpoint tensors.

``cpu_kernel.cpu_quant_matmul`` runs the C++ kernel (``csrc/quant_matmul``) on CPU tensors;
``reference.quant_matmul_reference`` is the plain-PyTorch definition it is tested against.
"""
