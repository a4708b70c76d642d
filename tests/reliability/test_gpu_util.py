"""CPU: the near-greedy rule the GPU engine tests share (gpu_util.assert_near_greedy)."""
import pytest

from gpu_util import assert_near_greedy


class Scored:
    """A reference engine whose scoring returns fixed per-token gaps."""

    def __init__(self, gaps):
        self.gaps_ = gaps

    def gaps(self, seqs, starts):
        assert [len(s) - k for s, k in zip(seqs, starts)] == [len(g) for g in self.gaps_]
        return self.gaps_


def run(gaps, **kw):
    outs = [[1] * len(g) for g in gaps]
    return assert_near_greedy(Scored(gaps), [[0, 0]] * len(gaps), outs, 0.5, **kw)


def test_within_tol_passes_and_returns_the_largest_gap():
    assert run([[0.0, 0.3], [0.5]]) == 0.5


def test_one_gap_over_tol_fails_without_an_allowance():
    with pytest.raises(AssertionError, match="largest gap 0.600 > 0.5 at 1 of 3"):
        run([[0.0, 0.6], [0.1]])


def test_flips_per_1000_allows_that_many_up_to_twice_tol():
    gaps = [[0.1] * 999 + [0.9], [0.2] * 1000]  # 2000 tokens: 2 may reach 1.0
    assert run(gaps, flips_per_1000=1) == 0.9
    with pytest.raises(AssertionError, match="at 3 of 2000"):
        run([[0.7] * 3 + [0.1] * 997, [0.2] * 1000], flips_per_1000=1)
    with pytest.raises(AssertionError, match="largest gap 1.100"):
        run([[0.1] * 999 + [1.1], [0.2] * 1000], flips_per_1000=1)
