"""PSA's random walk per image at VOC size on the CPU: the official dense squarings (T^256 by 8
squarings of the cells x cells matrix) against 256 sparse products (`psa.walk_steps`), which
give the same maps to float tolerance.

A 500 x 375 image has 63 x 47 = 2,961 feature cells; AffinityNet's features are random here (the
walk's cost does not depend on their values), 21 score channels. Rounds interleave the two ways,
so that a burst of load elsewhere hits both, and the table gives the median over the rounds of
each round's ratio. The maps are checked equal (relative 1e-4: eight float32 squarings let the
column sums drift by about 2e-5) in every round.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from mcis_cli import psa

TOLERANCE = 1e-4


def inputs(grid: tuple[int, int] = (47, 63), channels: int = 448, classes: int = 21, radius: int = 5, seed: int = 0):
    """AffinityNet-like features (ELU outputs, so about [-1, 3]) and walk vectors of one image."""
    g = torch.Generator().manual_seed(seed)
    f = torch.nn.functional.elu(torch.randn(1, channels, *grid, generator=g))
    frm, to = (torch.from_numpy(a) for a in psa.pair_indices(radius, grid))
    aff = psa.affinity(f, frm, to)[0]
    return aff, frm, to, torch.rand(classes, grid[0] * grid[1], generator=g)


def dense(aff, frm, to, vectors, beta: float = 8, logt: int = 8) -> torch.Tensor:
    cells = vectors.shape[1]
    return psa.walk(vectors, psa.transition(psa.dense_affinity(aff, frm, to, cells), beta), logt)


def sparse(aff, frm, to, vectors, beta: float = 8, logt: int = 8) -> torch.Tensor:
    cells = vectors.shape[1]
    return psa.walk_steps(vectors, psa.sparse_transition(aff, frm, to, cells, beta), 2 ** logt)


def _timed(call) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = call()
    return time.perf_counter() - start, out


def main(rounds: int = 5) -> dict[str, float]:
    aff, frm, to, vectors = inputs()
    dense(aff, frm, to, vectors[:, :]), sparse(aff, frm, to, vectors)  # warm both up
    seen: dict[str, list[float]] = {"dense": [], "sparse": [], "ratio": [], "diff": []}
    for _ in range(rounds):
        t_dense, a = _timed(lambda: dense(aff, frm, to, vectors))
        t_sparse, b = _timed(lambda: sparse(aff, frm, to, vectors))
        diff = ((a - b).abs() / a.abs().clamp(min=1e-6)).max().item()
        if diff > TOLERANCE:
            raise AssertionError(f"the sparse walk differs from the dense one by {diff:.2e} (relative)")
        for key, value in zip(seen, (t_dense, t_sparse, t_dense / t_sparse, diff), strict=True):
            seen[key].append(value)
    med = {key: statistics.median(values) for key, values in seen.items()}
    table = Table(title=f"random walk of one 500 x 375 image (2,961 cells, 21 channels, t = 256), "
                        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs visible; "
                        f"medians of {rounds} interleaved rounds")
    for column in ("walk", "s / image", "speed-up"):
        table.add_column(column, justify="left" if column == "walk" else "right")
    table.add_row("dense: 8 squarings (official)", f"{med['dense']:.3f}", "1.00x")
    table.add_row("sparse: 256 products", f"{med['sparse']:.3f}", f"{med['ratio']:.1f}x")
    table.add_row("max relative difference of the maps", f"{med['diff']:.1e}", "")
    Console().print(table)
    return med


if __name__ == "__main__":
    main()
