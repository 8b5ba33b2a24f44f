"""Compiled updates of networks with several groups of equal layers finish on CPU.

The test runs in a fresh process with a time limit, because a deadlock in
XLA's CPU thread pool hangs the process instead of raising an error.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests import oracle

# Two groups of twelve equal layers. With one batched LAPACK call per group,
# the two calls ran at once and waited for each other on 2 cores.
SCRIPT = textwrap.dedent(
    """
    import sys
    import jax
    import jax.numpy as jnp
    import numpy as np
    import simba_optax

    shapes = [(256, 256), (320, 256)]
    params = {
        f"layer_{i}_{j}": jnp.zeros(shape)
        for i, shape in enumerate(shapes) for j in range(12)
    }
    # Oversampling 300 takes the exact path, which the reference matches.
    transformation = simba_optax.simba(seed=3, oversampling=300)
    state = transformation.init(params)
    update = jax.jit(transformation.update)
    rng = np.random.default_rng(0)
    for step in range(3):
      grads = {
          name: rng.standard_normal(leaf.shape).astype(np.float32)
          for name, leaf in params.items()
      }
      updates, state = update(grads, state)
    np.savez(sys.argv[1], update=np.asarray(updates["layer_1_5"]),
             momentum=np.asarray(state.mu["layer_1_5"]))
    """
)

TIME_LIMIT = 240


def test_equal_layer_groups_finish(tmp_path):
  script = tmp_path / "groups.py"
  script.write_text(SCRIPT)
  result = tmp_path / "result.npz"
  environment = dict(
      os.environ,
      OPENBLAS_NUM_THREADS="1",
      JAX_PLATFORMS="cpu",
  )
  try:
    completed = subprocess.run(
        [sys.executable, str(script), str(result)],
        env=environment, capture_output=True, text=True, timeout=TIME_LIMIT,
    )
  except subprocess.TimeoutExpired:
    pytest.fail(
        f"the compiled update did not finish in {TIME_LIMIT} s: a deadlock"
        " between concurrent batched LAPACK calls"
    )
  assert completed.returncode == 0, completed.stderr

  # The decompositions, one block after another, still give the formula:
  # the last step's sampled rows of one layer match the float64 reference.
  saved = np.load(result)
  momentum = oracle.matrix_view(saved["momentum"])
  update = oracle.matrix_view(saved["update"])
  rows = oracle.sampled_rows(update)
  assert rows.size == oracle.coarse_row_count(256)
  expected = oracle.simba_direction(momentum[rows], rank=20, eps=1e-8)
  assert oracle.relative_error(update[rows], expected) <= 1e-4
