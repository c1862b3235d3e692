"""Operations: one folder per op, each with a plain-PyTorch reference beside its kernels."""
