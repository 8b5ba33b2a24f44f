"""Sharding of Simba's state: partition specs and explicit-sharding hints."""

from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec


def partition_specs(param_specs: Any) -> Any:
  """Returns the ``PartitionSpec`` of each leaf of ``simba``'s state.

  The step count and the key are replicated, ``P()``, because every device
  must draw the same rows. The momentum has the parameters' specs.

  Args:
    param_specs: a tree of ``PartitionSpec`` with the structure of the
      parameters (``None`` or ``optax.MaskedNode`` entries allowed).

  Returns:
    A ``SimbaState`` of ``PartitionSpec``, for ``jax.jit(...,
    out_shardings=...)`` or a checkpoint's restore target, after mapping each
    spec to a ``NamedSharding`` on the mesh.

  Raises:
    TypeError: a leaf of ``param_specs`` is not a ``PartitionSpec``.
  """
  leaves = jax.tree_util.tree_leaves_with_path(
      param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
  )
  for path, leaf in leaves:
    if not isinstance(leaf, PartitionSpec):
      raise TypeError(
          "simba: partition_specs requires a tree of PartitionSpec, but leaf"
          f" {jax.tree_util.keystr(path) or '<root>'} is {leaf!r}. Pass"
          " jax.sharding.PartitionSpec leaves, for example P() for a"
          " replicated parameter."
      )
  # Imported here because _simba imports this module.
  from simba_optax._simba import SimbaState  # pylint: disable=import-outside-toplevel

  return SimbaState(
      count=PartitionSpec(), key=PartitionSpec(), mu=param_specs
  )


def explicit_sharding(x: jax.Array) -> NamedSharding | None:
  """Returns ``x``'s sharding if its type names an explicit mesh axis, else ``None``."""
  sharding = jax.typeof(x).sharding
  if not isinstance(sharding, NamedSharding):
    return None
  if all(entry is None for entry in sharding.spec):
    return None
  return sharding


def replicated_sharding(x: jax.Array) -> NamedSharding | None:
  """Returns the replicated sharding on ``x``'s explicit mesh, or ``None``."""
  sharding = explicit_sharding(x)
  if sharding is None:
    return None
  return NamedSharding(sharding.mesh, PartitionSpec())

