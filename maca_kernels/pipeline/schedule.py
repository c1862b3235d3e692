"""Which rank solves which module: every rank derives the same assignment from the modules' shapes.

A layer's groups are solved in true-sequential order (a group's Hessian needs the quantized outputs of the groups
before it), so only the modules of one group can be solved at once: q/k/v, gate/up, or, for RTN (no Hessian), all of a
layer's modules. They go to ranks by cost, longest first, ties broken by name.
"""

from __future__ import annotations

from .shards import balance


def solve_cost(n: int, k: int, method: str) -> int:
    """GPTQ's work on an [n, k] weight: the Cholesky factorisation of H⁻¹ (≈ k³/3) and the column sweep (≈ n·k²);
    round-to-nearest touches each weight once."""
    return n * k if method == "rtn" else k**3 // 3 + n * k * k


def assign_solves(shapes: dict[str, tuple[int, int]], method: str, world_size: int) -> dict[str, int]:
    """module name -> rank, from ``shapes`` (name -> (out_features, in_features))."""
    names = sorted(shapes)
    where = balance([solve_cost(*shapes[n], method) for n in names], world_size)
    return dict(zip(names, where, strict=True))


__all__ = ["assign_solves", "solve_cost"]
