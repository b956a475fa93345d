"""Zero-page detection: the first/last-word prefilter must never call a data page zero."""

from __future__ import annotations

import numpy as np
import pytest

from mignet.guest.ram import zero_pages


def _pages(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 2**63, (n, 512), dtype=np.uint64)


@pytest.mark.parametrize("zero_every", [1, 2, 3, 1000])  # all zero .. almost none
def test_zero_pages_matches_a_full_reduction(zero_every: int) -> None:
    words = _pages(600, zero_every)
    words[::zero_every] = 0
    # Data only where the prefilter does not look: middle words, next-to-edge words.
    for row, col in ((1, 256), (4, 1), (7, 510), (10, 300)):
        words[row] = 0
        words[row, col] = 1
    expect = np.asarray(~words.any(axis=1))
    assert (zero_pages(words) == expect).all()
    rows = np.array([0, 1, 3, 4, 7, 9, 10, 599])
    assert (zero_pages(words, rows) == expect[rows]).all()
    shuffled = np.random.default_rng(zero_every).permutation(len(words))  # as many rows as pages
    assert (zero_pages(words, shuffled) == expect[shuffled]).all()


def test_zero_pages_of_no_pages() -> None:
    assert zero_pages(np.zeros((0, 512), np.uint64)).shape == (0,)
    assert zero_pages(_pages(4, 1), np.array([], dtype=np.int64)).shape == (0,)
