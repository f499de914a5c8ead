"""Greedy k-center coreset: PatchCore's memory-bank subsampling, exact, in seconds on a CPU.

Greedy k-center (Gonzalez, 1985; Sener and Savarese, ICLR 2018; Algorithm 1 of PatchCore, Roth et
al., CVPR 2022) keeps k of the N rows x_i of a matrix, each one the row farthest from those kept
before it::

    s_0 = start,                 d_0(i) = ‖x_i − x_{s_0}‖²
    s_t = argmax_i d_{t−1}(i),   d_t(i) = min(d_{t−1}(i), ‖x_i − x_{s_t}‖²)        t = 1 … k − 1

so the kept rows cover all the others with the smallest radius greedy search finds: a rare normal
patch is far from every kept one until it is kept itself, where a random draw of the same size
loses it with probability 1 − k/N. PatchCore runs the search on a random projection of the patch
features (``random_projection``: x ↦ xG with G_ij ~ N(0, 1/d), d = 128 in the official code), which
keeps distances to within a small factor (Johnson–Lindenstrauss) at d instead of D numbers per row.

How it is fast. The naive loop updates every d(i) at every step: a matrix-vector product over all
of X (N×d floats: 84 MB for bottle's 164,000 patches at d = 128), 16,000 times for a 10 % coreset,
at the speed of memory. But a new centre c can only lower d(i) for rows near it. Each row i
remembers its nearest centre o(i), and each centre s the largest d(i) of its rows, r_s². By the
triangle inequality, if ‖c − s‖ ≥ 2 r_s then for every row i of s,
‖x_i − c‖ ≥ ‖c − s‖ − ‖x_i − s‖ ≥ 2 r_s − r_s ≥ ‖x_i − s‖: c changes none of them. So a step
computes ‖c − s‖ for the centres kept so far (one small product), and ‖x_i − c‖² = ‖x_i‖² + ‖c‖² −
2 x_i·c, in float32, only for the rows of the centres with ‖c − s‖ < 2 r_s + ε (ε covers the
rounding), then updates d, o and those centres' r_s. The first steps touch every row; once the
centres cover the data, a step touches a few thousand. Every step takes the argmax of the same d
as the naive loop, so the selection is the naive one (the tests compare the two), up to the
rounding of the distances. The products are small and run on one core (``threadpool_limits``):
on a shared CPU, threads of a small product mostly wait for each other.

Measured on MVTec AD bottle (163,856 patches of 152 channels, 224², k = 16,386) on two CPU cores
shared with other jobs (load average about 7): 35 s. On the same machine anomalib 2.7's stock
sampler took 0.35 s per step (5,700 s for the whole coreset, extrapolated), and its first 250 picks
were this search's on the same projection (``tests/compare_anomalib.py``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from adnb.runtime.errors import AdnbError
from adnb.runtime.seed import generator as seeded_generator

PROJECTION_DIM = 128  # the official code's dimension of the projection the search runs on
ROUNDING = 1e-2  # ε of the pruning test, as a share of the largest row norm: far above float32's errors


def random_projection(features: torch.Tensor, dim: int, generator: torch.Generator) -> torch.Tensor:
    """``features`` (N×D) times a Gaussian matrix G (D×dim, G_ij ~ N(0, 1/dim)), in float32.

    With D ≤ dim a projection would not save anything; the features are returned as they are (in float32).
    """
    features = features.float()
    if dim <= 0 or features.shape[1] <= dim:
        return features
    g = torch.randn(features.shape[1], dim, generator=generator) / math.sqrt(dim)
    return features @ g.to(features.device)


def greedy_coreset(points: torch.Tensor, k: int, *, start: int = 0) -> torch.Tensor:
    """Indices of the k rows of ``points`` (N×d) that greedy k-center keeps from row ``start``, in the
    order kept (see the module docstring for the recursion and the pruning)."""
    n = len(points)
    if not 0 < k <= n:
        raise AdnbError(f"a coreset of {k} rows out of {n}: it needs 1 ≤ k ≤ the number of rows")
    if not 0 <= start < n:
        raise AdnbError(f"coreset start row {start} is not one of the {n} rows")
    x = np.ascontiguousarray(points.detach().float().cpu().numpy())
    with threadpool_limits(1):
        return torch.from_numpy(_greedy(x, k, start))


def _greedy(x: np.ndarray, k: int, start: int) -> np.ndarray:
    n = len(x)
    squares = np.einsum("ij,ij->i", x, x)
    margin = ROUNDING * math.sqrt(float(squares.max()))
    every_row = np.arange(n)
    d = np.full(n, np.inf, np.float32)  # squared distance of each row to its nearest centre
    owner = np.zeros(n, np.int64)  # the number (0 … t) of that centre
    centres = np.empty((k, x.shape[1]), np.float32)
    centre_squares = np.empty(k, np.float32)
    radius = np.zeros(k, np.float32)  # r_s: the largest distance of a centre's rows to it
    kept = np.empty(k, np.int64)
    i = start
    for t in range(k):
        kept[t], centres[t], centre_squares[t] = i, x[i], squares[i]
        c = x[i]
        rows = every_row
        if t:
            between = np.sqrt(np.maximum(centre_squares[:t] + squares[i] - 2 * (centres[:t] @ c), 0))
            near = between < 2 * radius[:t] + margin  # the centres whose rows c may take
            rows = np.flatnonzero(near[owner])
            radius[:t][near] = 0  # recomputed below from all their rows
        if 4 * len(rows) > n:  # most rows: one product over X is cheaper than gathering them
            rows, dist = every_row, squares + squares[i] - 2 * (x @ c)
            radius[:t] = 0
        else:
            dist = squares[rows] + squares[i] - 2 * (x[rows] @ c)
        closer = dist < d[rows]
        taken = rows[closer]
        d[taken] = np.maximum(dist[closer], 0)
        owner[taken] = t
        d[i], owner[i] = 0, t
        np.maximum.at(radius, owner[rows], np.sqrt(d[rows]))
        if t + 1 < k:
            i = int(np.argmax(d))
    return kept


def coreset_indices(features: torch.Tensor, k: int, *, projection: int = PROJECTION_DIM, seed: int = 0) -> torch.Tensor:
    """PatchCore's coreset: greedy k-center on a random projection of ``features`` (N×D), from a random
    row; the projection and the start are drawn from ``seed``."""
    generator = seeded_generator(seed)
    projected = random_projection(features, projection, generator)
    start = int(torch.randint(len(features), (1,), generator=generator))
    return greedy_coreset(projected, k, start=start)
