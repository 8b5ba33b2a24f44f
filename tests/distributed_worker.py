"""Runs Simba on several host CPU devices and saves what the tests check.

Usage: ``python tests/distributed_worker.py SCENARIO OUTPUT_DIR`` with
SCENARIO ``pmap`` or ``sharded``. The
process needs 8 CPU devices, so start it with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``: JAX reads the flag
once, when its CPU backend starts. ``tests/test_distributed.py`` runs it and
asserts on ``OUTPUT_DIR/result.npz`` and ``OUTPUT_DIR/result.json``.
"""

import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import simba_optax
from simba_optax import SimbaDimensionNumbers

DEVICES_NEEDED = 8
PMAP_REPLICAS = 4
PMAP_STEPS = 3

# Sharded parameters: name -> (shape, partition spec). Every leaf is viewed
# with row_axis=0, so the 4096 sharded rows of "rows" are the rows Simba
# samples, and "columns" is sharded along its matrix columns.
SHARDED_PARAMS = {
    "rows": ((4096, 64), P("model", None)),
    "columns": ((64, 64), P(None, "model")),
    "bias": ((64,), P()),
}
SHARDED_DIMS = SimbaDimensionNumbers(row_axis=0)
SHARDED_STEPS = 2


def all_gather_shapes(hlo_text: str) -> list[list[int]]:
  """Returns the result shape of every all-gather in compiled HLO text."""
  shapes = []
  for match in re.finditer(r"=\s*(.+?)\s+all-gather(?:-start)?\(", hlo_text):
    for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", match.group(1)):
      shapes.append([int(d) for d in dims.split(",") if d])
  return shapes


def tree_to_host(tree, prefix: str, out: dict) -> None:
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    out[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)


def run_pmap(output: Path) -> None:
  """Trains a linear model on 4 replicas with pmap and on one device."""
  devices = jax.devices()[:PMAP_REPLICAS]
  tx = optax.chain(
      simba_optax.simba(coarse_fraction=0.5, rank=4, seed=3),
      optax.scale(-0.05),
  )
  rng = np.random.default_rng(0)
  params = {
      "w": jnp.asarray(rng.standard_normal((16, 64)), jnp.float32),
      "b": jnp.zeros((64,), jnp.float32),
  }
  inputs = rng.standard_normal((PMAP_STEPS, PMAP_REPLICAS, 8, 16))
  targets = rng.standard_normal((PMAP_STEPS, PMAP_REPLICAS, 8, 64))

  def loss(p, x, y):
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

  def step(p, state, x, y):
    grads = lax.pmean(jax.grad(loss)(p, x, y), "data")
    updates, state = tx.update(grads, state, p)
    gathered = lax.all_gather(state[0], "data")
    return optax.apply_updates(p, updates), state, grads, updates, gathered

  parallel_step = jax.pmap(step, axis_name="data", devices=devices)

  def replicate(tree):
    return jax.tree.map(lambda x: jnp.stack([x] * PMAP_REPLICAS), tree)

  result = {}
  replicated_params, replicated_state = replicate(params), replicate(tx.init(params))
  for i in range(PMAP_STEPS):
    replicated_params, replicated_state, grads, updates, gathered = parallel_step(
        replicated_params, replicated_state, inputs[i], targets[i]
    )
    tree_to_host(replicated_params, f"step{i}/params", result)
    tree_to_host(replicated_state[0], f"step{i}/simba", result)
    tree_to_host(grads, f"step{i}/grads", result)
    tree_to_host(updates, f"step{i}/updates", result)
    tree_to_host(gathered, f"step{i}/gathered", result)

  # The same steps on one device, from the averaged gradients of replica 0.
  device = jax.devices()[0]
  single_update = jax.jit(tx.update)
  single_params = jax.device_put(params, device)
  single_state = jax.device_put(tx.init(params), device)
  for i in range(PMAP_STEPS):
    grads = {k: result[f"step{i}/grads['{k}']"][0] for k in params}
    updates, single_state = single_update(grads, single_state, single_params)
    single_params = optax.apply_updates(single_params, updates)
    tree_to_host(single_params, f"single{i}/params", result)
    tree_to_host(single_state[0], f"single{i}/simba", result)
    tree_to_host(updates, f"single{i}/updates", result)

  # One step in which every replica has its own seed, the unsupported setup.
  own_keys = replicate(tx.init(params))
  seeds = jnp.stack(
      [jax.random.key_data(jax.random.key(s)) for s in range(PMAP_REPLICAS)]
  )
  own_keys = (own_keys[0]._replace(key=seeds),) + tuple(own_keys[1:])
  diverged, *_ = parallel_step(replicate(params), own_keys, inputs[0], targets[0])
  tree_to_host(diverged, "own_keys/params", result)

  np.savez(output / "result.npz", **result)
  (output / "result.json").write_text(json.dumps({"replicas": PMAP_REPLICAS}))


def _spec_text(sharding) -> str:
  return str(getattr(sharding, "spec", sharding))


def run_sharded(axis_type: AxisType, meta: dict, result: dict) -> None:
  """Runs Simba on parameters sharded over 8 devices with ``axis_type`` axes."""
  mesh = jax.make_mesh((DEVICES_NEEDED,), ("model",), axis_types=(axis_type,))
  shardings = {
      name: NamedSharding(mesh, spec)
      for name, (_, spec) in SHARDED_PARAMS.items()
  }
  tx = sharded_transformation()
  host_params, host_grads = sharded_inputs()
  meta.update(params={}, steps=[])

  with jax.set_mesh(mesh):
    params = jax.device_put(host_params, shardings)
    for name, leaf in params.items():
      meta["params"][name] = _spec_text(leaf.sharding)

    def equivalent(tree):
      return {
          name: tree[name].sharding.is_equivalent_to(
              shardings[name], len(SHARDED_PARAMS[name][0])
          )
          for name in SHARDED_PARAMS
      }

    # Init from real arrays, eagerly and under jit.
    state = tx.init(params)
    meta["init"] = {
        "mu": equivalent(state.mu),
        "key_replicated": state.key.sharding.is_fully_replicated,
        "key_spec": _spec_text(state.key.sharding),
    }
    specs = simba_optax.partition_specs(
        {name: spec for name, (_, spec) in SHARDED_PARAMS.items()}
    )
    state_shardings = jax.tree.map(
        lambda spec: NamedSharding(mesh, spec), specs,
        is_leaf=lambda x: isinstance(x, P),
    )
    jit_state = jax.jit(tx.init, out_shardings=state_shardings)(params)
    meta["jit_init"] = {
        "mu": equivalent(jit_state.mu),
        "key_replicated": jit_state.key.sharding.is_fully_replicated,
    }
    if axis_type == AxisType.Explicit:
      # Explicit axes are part of the types, so jit needs no out_shardings.
      meta["jit_init"]["mu_without_out_shardings"] = equivalent(
          jax.jit(tx.init)(params).mu
      )

    # Init from abstract parameters.
    abstract_params = {
        name: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=shardings[name])
        for name, (shape, _) in SHARDED_PARAMS.items()
    }
    abstract_state = jax.eval_shape(tx.init, abstract_params)
    meta["abstract_init"] = {
        "count": [list(abstract_state.count.shape), str(abstract_state.count.dtype)],
        "key": [list(abstract_state.key.shape), str(abstract_state.key.dtype)],
        "mu": {
            name: [list(leaf.shape), str(leaf.dtype), _spec_text(leaf.sharding)]
            for name, leaf in abstract_state.mu.items()
        },
    }

    # One compiled program serves both steps and its HLO text.
    update = None
    for i, grads in enumerate(host_grads):
      grads = jax.device_put(grads, shardings)
      if update is None:
        update = jax.jit(tx.update).lower(grads, state).compile()
        meta["all_gather_shapes"] = all_gather_shapes(update.as_text())
      updates, state = update(grads, state)
      meta["steps"].append({
          "mu": equivalent(state.mu),
          "key_replicated": state.key.sharding.is_fully_replicated,
          "count_replicated": state.count.sharding.is_fully_replicated,
          "update_specs": {k: _spec_text(v.sharding) for k, v in updates.items()},
      })
      tree_to_host(updates, f"step{i}/updates", result)
    tree_to_host(state.mu, "final/mu", result)

    # A program that does gather a whole leaf, to show the detector finds it.
    gather_all = jax.jit(
        lambda x: x + 1.0, out_shardings=NamedSharding(mesh, P())
    )
    meta["detector_shapes"] = all_gather_shapes(
        gather_all.lower(params["rows"]).compile().as_text()
    )


def sharded_transformation() -> optax.GradientTransformation:
  # oversampling=64 makes rank + oversampling >= min(n_l, d) for every leaf,
  # so all leaves take the exact path, which compiles faster.
  return simba_optax.simba(
      coarse_fraction=0.5, rank=4, oversampling=64, seed=1,
      dimension_numbers=SHARDED_DIMS,
  )


def sharded_inputs() -> tuple[dict, list[dict]]:
  """Returns host parameters and the gradients of each step."""
  rng = np.random.default_rng(1)
  params = {
      name: rng.standard_normal(shape).astype(np.float32)
      for name, (shape, _) in SHARDED_PARAMS.items()
  }
  grads = [
      {name: rng.standard_normal(shape).astype(np.float32)
       for name, (shape, _) in SHARDED_PARAMS.items()}
      for _ in range(SHARDED_STEPS)
  ]
  return params, grads


def run_single_device(result: dict) -> None:
  """Runs the sharded scenario's steps on one device, as the reference."""
  tx = sharded_transformation()
  host_params, host_grads = sharded_inputs()
  device = jax.devices()[0]
  state = tx.init(jax.device_put(host_params, device))
  update = jax.jit(tx.update)
  for i, grads in enumerate(host_grads):
    updates, state = update(jax.device_put(grads, device), state)
    tree_to_host(updates, f"single/step{i}/updates", result)
  tree_to_host(state.mu, "single/final/mu", result)


def run_all_sharded(output: Path) -> None:
  meta, result = {}, {}
  for name, axis_type in [("auto", AxisType.Auto), ("explicit", AxisType.Explicit)]:
    meta[name] = {}
    mode_result = {}
    run_sharded(axis_type, meta[name], mode_result)
    result.update({f"{name}/{key}": value for key, value in mode_result.items()})
  run_single_device(result)
  np.savez(output / "result.npz", **result)
  (output / "result.json").write_text(json.dumps(meta))


def main() -> None:
  if len(sys.argv) != 3:
    sys.exit("usage: distributed_worker.py {pmap,sharded} OUTPUT_DIR")
  scenario, output = sys.argv[1], Path(sys.argv[2])
  if jax.device_count() < DEVICES_NEEDED:
    sys.exit(
        f"distributed_worker: found {jax.device_count()} devices, needs"
        f" {DEVICES_NEEDED}. Set XLA_FLAGS="
        f"--xla_force_host_platform_device_count={DEVICES_NEEDED}"
        " before starting Python."
    )
  if scenario == "pmap":
    run_pmap(output)
  elif scenario == "sharded":
    run_all_sharded(output)
  else:
    sys.exit(f"distributed_worker: unknown scenario {scenario!r}.")


if __name__ == "__main__":
  main()
