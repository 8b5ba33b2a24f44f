"""Simba under pmap, on sharded parameters and across two processes.

JAX fixes the number of host CPU devices when its backend starts, and this
pytest process already runs with one. The pmap and sharding checks therefore
run ``distributed_worker.py`` in a child process with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` and assert on the
arrays it saves. The multi-process test starts ``examples/multi_process.py``
twice on 127.0.0.1.
"""

import fcntl
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import simba_optax

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
MULTI_PROCESS_EXAMPLE = REPO_ROOT / "examples" / "multi_process.py"
WORKER_DEVICES = 8
# Generous, because the host may be shared with other jobs.
CHILD_TIMEOUT_S = 600

PMAP_STEPS = 3
PMAP_REPLICAS = 4
PMAP_SAMPLED_ROWS = 32  # ceil(0.5 * 64) rows of the (16, 64) kernel per step

SHARDED_LEAVES = {"rows": (4096, 64), "columns": (64, 64), "bias": (64,)}
SHARDED_SPECS = {
    "rows": "P('model', None)",
    "columns": "P(None, 'model')",
    "bias": "P()",
}


def child_env(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  flag = f"--xla_force_host_platform_device_count={devices}"
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  return env


def session_directory(tmp_path_factory) -> Path:
  """Returns a folder that all pytest-xdist workers of this session share."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def run_worker_once(scenario: str, tmp_path_factory) -> tuple[dict, dict]:
  """Runs the worker for ``scenario`` once per session and loads its output.

  A file lock makes the other pytest-xdist workers wait for the first run
  and reuse its output, or its error.
  """
  root = session_directory(tmp_path_factory)
  output = root / f"simba-distributed-{scenario}"
  error_file = output / "error.txt"
  with open(root / f"simba-distributed-{scenario}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (output / "result.json").exists() and not error_file.exists():
      output.mkdir(exist_ok=True)
      try:
        process = subprocess.run(
            [sys.executable, str(WORKER), scenario, str(output)],
            env=child_env(WORKER_DEVICES), cwd=REPO_ROOT,
            capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
        )
        if process.returncode != 0:
          error_file.write_text(
              f"exit status {process.returncode}\n{process.stderr[-6000:]}"
          )
      except subprocess.TimeoutExpired:
        error_file.write_text(f"timed out after {CHILD_TIMEOUT_S} s")
  if error_file.exists():
    pytest.fail(f"distributed_worker.py {scenario} failed: {error_file.read_text()}")
  with np.load(output / "result.npz") as arrays:
    result = dict(arrays)
  return result, json.loads((output / "result.json").read_text())


@pytest.fixture(scope="session")
def pmap_run(tmp_path_factory):
  return run_worker_once("pmap", tmp_path_factory)[0]


@pytest.fixture(scope="session")
def sharded_run(tmp_path_factory):
  return run_worker_once("sharded", tmp_path_factory)


def replica_entries(result: dict, prefix: str) -> dict[str, np.ndarray]:
  return {k[len(prefix):]: v for k, v in result.items() if k.startswith(prefix)}


def sampled_columns(update: np.ndarray) -> frozenset[int]:
  """Returns the Simba rows (the last axis, by default) that an update changes."""
  return frozenset(np.flatnonzero(np.any(update != 0, axis=0)).tolist())


# pmap: four replicas, one averaged gradient.


def test_pmap_replicas_stay_identical(pmap_run):
  for step in range(PMAP_STEPS):
    for group in ("params", "simba", "updates"):
      entries = replica_entries(pmap_run, f"step{step}/{group}")
      assert entries, f"no {group} saved for step {step}"
      for name, stacked in entries.items():
        assert stacked.shape[0] == PMAP_REPLICAS
        for replica in range(1, PMAP_REPLICAS):
          assert np.array_equal(stacked[replica], stacked[0]), (
              f"step {step}: {group}{name} of replica {replica} differs"
              " from replica 0"
          )


def test_pmap_state_count_and_key(pmap_run):
  first_key = pmap_run["step0/simba.key"][0]
  for step in range(PMAP_STEPS):
    np.testing.assert_array_equal(
        pmap_run[f"step{step}/simba.count"], np.full(PMAP_REPLICAS, step + 1)
    )
    np.testing.assert_array_equal(pmap_run[f"step{step}/simba.key"][0], first_key)


def test_pmap_sampled_rows_change(pmap_run):
  rows = [
      sampled_columns(pmap_run[f"step{step}/updates['w']"][0])
      for step in range(PMAP_STEPS)
  ]
  for step, sample in enumerate(rows):
    assert len(sample) == PMAP_SAMPLED_ROWS, f"step {step}"
  for step in range(1, PMAP_STEPS):
    assert rows[step] != rows[step - 1], f"steps {step - 1} and {step} sampled the same rows"


def test_pmap_matches_single_device(pmap_run):
  for step in range(PMAP_STEPS):
    for group in ("params", "simba", "updates"):
      single = replica_entries(pmap_run, f"single{step}/{group}")
      assert single
      for name, expected in single.items():
        actual = pmap_run[f"step{step}/{group}{name}"][0]
        if group == "simba" and name in (".count", ".key"):
          np.testing.assert_array_equal(actual, expected)
          continue
        # The pmap and jit programs fuse differently, so results agree to
        # float32 rounding, not bit for bit.
        np.testing.assert_allclose(
            actual, expected, rtol=1e-5, atol=1e-6,
            err_msg=f"step {step}: {group}{name}",
        )
    np.testing.assert_array_equal(
        pmap_run[f"step{step}/updates['w']"][0] != 0,
        pmap_run[f"single{step}/updates['w']"] != 0,
    )


def test_pmap_all_gather_state(pmap_run):
  for step in range(PMAP_STEPS):
    for name, gathered in replica_entries(pmap_run, f"step{step}/gathered").items():
      state = pmap_run[f"step{step}/simba{name}"]
      assert gathered.shape == (PMAP_REPLICAS,) + state.shape
      for replica in range(PMAP_REPLICAS):
        np.testing.assert_array_equal(gathered[replica], state)


def test_pmap_own_keys_diverge(pmap_run):
  # Unsupported setup, kept as a test so that the README's warning stays true.
  kernels = pmap_run["own_keys/params['w']"]
  assert not all(
      np.array_equal(kernels[r], kernels[0]) for r in range(1, PMAP_REPLICAS)
  )


# Sharded parameters on a mesh of 8 devices.

AXIS_MODES = ["auto", "explicit"]


@pytest.mark.parametrize("mode", AXIS_MODES)
def test_sharded_momentum_keeps_sharding(sharded_run, mode):
  meta = sharded_run[1][mode]
  assert meta["params"] == SHARDED_SPECS
  for stage in ("init", "jit_init"):
    assert meta[stage]["mu"] == {name: True for name in SHARDED_LEAVES}, stage
  for step, record in enumerate(meta["steps"]):
    assert record["mu"] == {name: True for name in SHARDED_LEAVES}, f"step {step}"
  if mode == "explicit":
    assert meta["jit_init"]["mu_without_out_shardings"] == {
        name: True for name in SHARDED_LEAVES
    }


@pytest.mark.parametrize("mode", AXIS_MODES)
def test_sharded_count_and_key_replicated(sharded_run, mode):
  meta = sharded_run[1][mode]
  assert meta["init"]["key_replicated"]
  assert meta["init"]["key_spec"] == "P()"
  assert meta["jit_init"]["key_replicated"]
  for record in meta["steps"]:
    assert record["key_replicated"]
    assert record["count_replicated"]


@pytest.mark.parametrize("mode", AXIS_MODES)
def test_sharded_abstract_init(sharded_run, mode):
  abstract = sharded_run[1][mode]["abstract_init"]
  assert abstract["count"] == [[], "int32"]
  assert abstract["key"] == [[2], "uint32"]
  for name, shape in SHARDED_LEAVES.items():
    mu_shape, mu_dtype, mu_spec = abstract["mu"][name]
    assert mu_shape == list(shape)
    assert mu_dtype == "float32"
    if mode == "explicit":
      # Explicit shardings are part of the abstract types. A 1-D spec prints
      # as P(None,) there, the same layout as P().
      expected = "P(None,)" if SHARDED_SPECS[name] == "P()" else SHARDED_SPECS[name]
      assert mu_spec == expected, name


@pytest.mark.parametrize("mode", AXIS_MODES)
def test_sharded_updates_match_single_device(sharded_run, mode):
  arrays = sharded_run[0]
  for step in range(2):
    for name in SHARDED_LEAVES:
      expected = arrays[f"single/step{step}/updates['{name}']"]
      actual = arrays[f"{mode}/step{step}/updates['{name}']"]
      np.testing.assert_allclose(
          actual, expected, rtol=0, atol=1e-5, err_msg=f"step {step}: {name}"
      )
      np.testing.assert_array_equal(actual != 0, expected != 0)
  for name in SHARDED_LEAVES:
    np.testing.assert_allclose(
        arrays[f"{mode}/final/mu['{name}']"],
        arrays[f"single/final/mu['{name}']"], rtol=0, atol=1e-5,
    )


@pytest.mark.parametrize("mode", AXIS_MODES)
def test_sharded_update_gathers_no_leaf(sharded_run, mode):
  meta = sharded_run[1][mode]
  leaf_size = math.prod(SHARDED_LEAVES["rows"])
  # The check finds a whole-leaf all-gather where one is forced.
  assert any(math.prod(s) >= leaf_size for s in meta["detector_shapes"])
  for shape in meta["all_gather_shapes"]:
    assert math.prod(shape) < leaf_size, f"all-gather of shape {shape}"


def test_explicit_updates_keep_sharding(sharded_run):
  for record in sharded_run[1]["explicit"]["steps"]:
    for name, spec in record["update_specs"].items():
      expected = "P(None,)" if SHARDED_SPECS[name] == "P()" else SHARDED_SPECS[name]
      assert spec == expected, name


# partition_specs, in this process.


def test_partition_specs_state_layout():
  param_specs = {"kernel": P("model", None), "bias": P(), "skip": None}
  specs = simba_optax.partition_specs(param_specs)
  assert isinstance(specs, simba_optax.SimbaState)
  assert specs.count == P()
  assert specs.key == P()
  assert specs.mu == param_specs


def test_partition_specs_match_state_tree():
  params = {"kernel": jnp.zeros((8, 4)), "bias": jnp.zeros((4,))}
  tx = simba_optax.simba()
  state = jax.eval_shape(tx.init, params)
  specs = simba_optax.partition_specs({"kernel": P(None, "model"), "bias": P()})
  is_spec = lambda x: isinstance(x, P)
  assert jax.tree.structure(specs, is_leaf=is_spec) == jax.tree.structure(state)


def test_partition_specs_non_spec_leaf():
  with pytest.raises(TypeError, match=r"leaf \['bias'\] is 3"):
    simba_optax.partition_specs({"kernel": P(), "bias": 3})


# Two processes on 127.0.0.1, two CPU devices each.


def free_local_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def test_multi_process_matches_single_process(tmp_path):
  from examples import multi_process  # pylint: disable=import-outside-toplevel

  coordinator = f"127.0.0.1:{free_local_port()}"
  processes = []
  try:
    for process_id in range(2):
      log = open(tmp_path / f"process{process_id}.log", "w")
      processes.append(subprocess.Popen(
          [sys.executable, str(MULTI_PROCESS_EXAMPLE),
           "--process-id", str(process_id), "--num-processes", "2",
           "--coordinator", coordinator, "--output", str(tmp_path)],
          env=child_env(2), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
      ))
      log.close()
    for process in processes:
      process.wait(timeout=CHILD_TIMEOUT_S)
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()

  logs = "\n".join(
      f"--- process {i}:\n{(tmp_path / f'process{i}.log').read_text()[-3000:]}"
      for i in range(2)
  )
  for process_id, process in enumerate(processes):
    assert process.returncode == 0, f"process {process_id} failed:\n{logs}"

  with np.load(tmp_path / "multi_process.npz") as saved:
    distributed = dict(saved)
  reference = multi_process.train(mesh=None)
  assert distributed["losses"][-1] < distributed["losses"][0]
  np.testing.assert_allclose(
      distributed["losses"], reference["losses"], rtol=1e-5
  )
  for name, expected in reference["params"].items():
    np.testing.assert_allclose(
        distributed[f"params/{name}"], expected, rtol=1e-5, atol=1e-6,
        err_msg=name,
    )
