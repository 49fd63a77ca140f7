"""Prefix-length draws for the smallest images (method.md §2: P ~ U{1..N-1} for an image of N patches).

Both places the training data draws prefixes: `dataset.prefix_lengths` (square images, one N for the
batch, one call per batch keyed by the batch's first position) and `native.native_prefix_lengths`
(native grids, each sample its own N). At N = 3 and 4 an off-by-one in the range (1..N-2, 0..N-1,
1..N, or 1..N clamped to N-1) either shows a value outside 1..N-1, misses one inside it, or moves a
third or more of the mass onto one value, so 4,000 seeded draws per N tell them apart: the tolerance
0.05 on each frequency is 6.7 standard deviations of a frequency of 1/3 (sqrt(1/3 * 2/3 / 4000) =
0.0075), while the smallest of those bugs moves one frequency by 1/6 or more.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from aimv2.data import DataConfig
from aimv2.data.dataset import prefix_lengths
from aimv2.data.native import native_prefix_lengths

DRAWS, BATCH, TOL = 4000, 50, 0.05


def _assert_uniform_1_to_n_minus_1(p: np.ndarray, N: int):
    vals, counts = np.unique(p, return_counts=True)
    assert vals.tolist() == list(range(1, N)), f"N={N}: values drawn {vals.tolist()}, expected exactly 1..{N - 1}"
    freq = counts / len(p)
    assert np.abs(freq - 1 / (N - 1)).max() < TOL, f"N={N}: frequencies {freq.round(3).tolist()} of 1..{N - 1}"


@pytest.mark.parametrize("N", [3, 4])
def test_square_prefix_draw_is_uniform_on_1_to_n_minus_1(N):
    # N = 4 is the smallest square grid a DataConfig allows (28 px at 14 px patches); N = 3 is no square,
    # so for it the function is handed N directly (it reads only these four fields of the config)
    cfg = (DataConfig(shards="unused.tar", image_size=28, patch_size=14, seed=5) if N == 4
           else SimpleNamespace(num_patches=3, prefix="random", seed=5, rank=0))
    assert cfg.num_patches == N
    # as the loader calls it: one draw of BATCH per batch, keyed by the batch's first position
    p = torch.cat([prefix_lengths(cfg, 2, pos, BATCH) for pos in range(0, DRAWS, BATCH)])
    assert p.dtype == torch.int64 and p.shape == (DRAWS,)
    _assert_uniform_1_to_n_minus_1(p.numpy(), N)


def test_native_prefix_draw_is_uniform_on_1_to_n_minus_1_for_3_and_4_patch_grids():
    # grids of 3 (1x3, 3x1) and 4 (2x2, 1x4) patches interleaved in one epoch order: each sample draws
    # from its own N
    n = np.random.default_rng(0).permutation(np.repeat([3, 4], DRAWS))
    pos = np.arange(1000, 1000 + len(n))
    p = native_prefix_lengths(5, 0, 2, pos, n)
    assert p.dtype == torch.int64 and p.shape == (len(n),)
    p = p.numpy()
    for N in (3, 4):
        _assert_uniform_1_to_n_minus_1(p[n == N], N)
