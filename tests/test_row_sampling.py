"""Row sampling: sizes, distinct rows and uniformity on both sampling paths."""

import fractions
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from simba_optax import SimbaDimensionNumbers
from simba_optax import _matrix_view
from simba_optax import _row_sampling

# Each chi-square test below rejects a truly uniform sampler with this
# probability; the seeds are fixed, so the outcome is deterministic.
FALSE_ALARM_RATE = 1e-3


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.3, 0.5, 0.7, 0.9, 1.0])
@pytest.mark.parametrize("rows", [1, 2, 7, 10, 100, 1000])
def test_coarse_size_is_ceiling(fraction, rows):
  expected = math.ceil(fractions.Fraction(str(fraction)) * rows)
  assert _row_sampling.coarse_size(rows, fraction, None) == max(1, expected)


def test_coarse_rows_capped_and_preferred():
  assert _row_sampling.coarse_size(100, 0.5, 7) == 7
  assert _row_sampling.coarse_size(5, 0.5, 7) == 5
  assert _row_sampling.coarse_size(1, 1e-6, None) == 1


@pytest.mark.parametrize(
    "rows, size", [(10, 1), (10, 9), (64, 3), (1000, 20), (1000, 600), (5, 5)]
)
def test_rows_distinct_and_in_range(rows, size):
  keys = jax.random.split(jax.random.key(0), 50)
  samples = np.asarray(
      jax.jit(jax.vmap(lambda k: _row_sampling.sample_rows(k, rows, size)))(keys)
  )
  assert samples.shape == (50, size)
  assert samples.min() >= 0
  assert samples.max() < rows
  for sample in samples:
    assert len(set(sample.tolist())) == size


def test_first_distinct_counts_repeats():
  candidates = jnp.asarray([4, 4, 1, 4, 1, 7], jnp.int32)
  first_distinct = jax.jit(_row_sampling._first_distinct, static_argnums=1)
  chosen, count = first_distinct(candidates, 3)
  assert int(count) == 3
  assert chosen.tolist() == [4, 1, 7]

  chosen, count = first_distinct(candidates[:5], 3)
  assert int(count) == 2
  assert chosen[:2].tolist() == [4, 1]


def _chi_square_p(samples: np.ndarray, rows: int) -> float:
  counts = np.bincount(samples.ravel(), minlength=rows)
  return stats.chisquare(counts).pvalue


@pytest.mark.parametrize(
    "rows, size",
    [
        (64, 3),  # drawn with replacement, first distinct kept
        (20, 5),  # random permutation
    ],
)
def test_sample_uniform_over_rows(rows, size):
  keys = jax.random.split(jax.random.key(11), 4000)
  samples = np.asarray(
      jax.jit(jax.vmap(lambda k: _row_sampling.sample_rows(k, rows, size)))(keys)
  )
  assert _chi_square_p(samples, rows) > FALSE_ALARM_RATE


def test_candidate_pairs_uniform():
  # Every unordered pair of 8 rows should appear equally often when 2 rows
  # are drawn out of 40 (the with-replacement path): 780 pairs in all.
  rows, size = 40, 2
  keys = jax.random.split(jax.random.key(5), 40000)
  samples = np.sort(
      np.asarray(jax.jit(jax.vmap(
          lambda k: _row_sampling.sample_rows(k, rows, size)))(keys)),
      axis=1,
  )
  pair_index = samples[:, 0] * rows + samples[:, 1]
  counts = np.bincount(pair_index, minlength=rows * rows)
  upper = counts.reshape(rows, rows)[np.triu_indices(rows, k=1)]
  assert upper.sum() == len(samples)
  assert stats.chisquare(upper).pvalue > FALSE_ALARM_RATE


def test_restrict_and_prolong_roundtrip():
  matrix = jnp.arange(30.0).reshape(10, 3)
  sampled, block = _row_sampling.restrict(matrix, jax.random.key(2), 4)
  np.testing.assert_array_equal(block, np.asarray(matrix)[np.asarray(sampled)])

  view = _matrix_view.make_leaf_view((10, 3), SimbaDimensionNumbers(row_axis=0), "matrix")
  full = np.asarray(_matrix_view.prolong_to_leaf(block[None], sampled[None], view))
  expected = np.zeros((10, 3))
  expected[np.asarray(sampled)] = np.asarray(block)
  np.testing.assert_array_equal(full, expected)
