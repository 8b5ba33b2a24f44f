"""Tests for the benchmark objectives, optimizers, runner and entry points.

The entry points run with tiny settings into a temporary folder; the objectives
are checked against NumPy computations.
"""

import importlib
import json
import math
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import io as scipy_io
from sklearn.datasets import dump_svmlight_file

import simba_optax
from benchmarks import autoencoders
from benchmarks import common
from benchmarks import least_squares
from benchmarks import loaders
from benchmarks import resnet
from benchmarks import saddle


def sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def numeric_gradient(function, x, step=1e-6):
  """Central differences of a float64 NumPy function at every entry of ``x``."""
  gradient = np.zeros_like(x)
  for index in np.ndindex(x.shape):
    shift = np.zeros_like(x)
    shift[index] = step
    gradient[index] = (function(x + shift) - function(x - shift)) / (2 * step)
  return gradient


def read_json(path):
  return json.loads(path.read_text())


# Objectives


def test_least_squares_value_and_gradient():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(9, 4))
  labels = rng.integers(0, 2, size=9).astype(np.float64)
  x = rng.normal(size=4)

  predictions = 1.0 / (1.0 + np.exp(features @ x))
  expected_value = np.mean((labels - predictions) ** 2)
  # d/dz (b - 1/(1+e^z))^2 = 2 (b - g) g (1 - g) with g = 1/(1+e^z).
  expected_gradient = features.T @ (2 * (labels - predictions) * predictions * (1 - predictions)) / 9

  args = (jnp.asarray(features, jnp.float32), jnp.asarray(labels, jnp.float32))
  value, gradient = jax.value_and_grad(least_squares.objective)(jnp.asarray(x, jnp.float32), *args)
  assert float(value) == pytest.approx(expected_value, rel=1e-5)
  np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-4, atol=1e-6)


def test_saddle_loss_value_and_gradient():
  rng = np.random.default_rng(1)
  weights = [rng.normal(size=(3, 3)) for _ in range(3)]
  target = rng.normal(size=(3, 3))

  def numpy_loss(w0):
    return 0.5 * np.sum((w0 @ weights[1] @ weights[2] - target) ** 2)

  residual = weights[0] @ weights[1] @ weights[2] - target
  expected_gradients = [
      residual @ (weights[1] @ weights[2]).T,
      weights[0].T @ residual @ weights[2].T,
      (weights[0] @ weights[1]).T @ residual,
  ]
  as_jax = [jnp.asarray(w, jnp.float32) for w in weights]
  value, gradients = jax.value_and_grad(saddle.loss_value)(as_jax, jnp.asarray(target, jnp.float32))
  assert float(value) == pytest.approx(numpy_loss(weights[0]), rel=1e-5)
  for gradient, expected in zip(gradients, expected_gradients):
    np.testing.assert_allclose(gradient, expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(numeric_gradient(numpy_loss, weights[0]), expected_gradients[0], rtol=1e-5)


def test_saddle_start_is_decoupled():
  _, left, _, right = saddle.target_matrix(5, 1.0, 0.1)
  weights = saddle.decoupled_start(left, right, depth=3, scale=0.1, seed=4)
  product = weights[0] @ weights[1] @ weights[2]
  np.testing.assert_allclose(product, 1e-3 * left @ right.T, atol=1e-12)
  other_seed = saddle.decoupled_start(left, right, depth=3, scale=0.1, seed=5)
  assert not np.allclose(weights[0], other_seed[0])


def test_gradient_flow_time_closed_form():
  # Depth 2, one mode: t = ln(u_f (s - u0) / (u0 (s - u_f))) / (2 s).
  s, start, threshold = 2.0, 1e-6, 0.02
  final = s - math.sqrt(2 * threshold)
  expected = math.log(final * (s - start) / (start * (s - final))) / (2 * s)
  assert saddle.gradient_flow_time(np.array([s]), 2, start, threshold) == pytest.approx(expected, rel=1e-5)


def test_gradient_flow_time_unreachable():
  assert saddle.gradient_flow_time(np.array([1.0]), 3, 1e-3, -1.0) == math.inf


def test_autoencoder_value_and_gradient():
  model = autoencoders.Autoencoder(input_size=3, encoder_sizes=(4, 2), activation="sigmoid")
  images = jnp.asarray(np.random.default_rng(2).random((5, 3)), jnp.float32)
  params = model.init(jax.random.key(0), images)["params"]
  numpy_params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  layer_names = ["encoder_0", "code", "decoder_0", "output"]
  data = np.asarray(images, np.float64)

  def numpy_mse(output_kernel):
    hidden = sigmoid(data @ numpy_params["encoder_0"]["kernel"] + numpy_params["encoder_0"]["bias"])
    hidden = hidden @ numpy_params["code"]["kernel"] + numpy_params["code"]["bias"]
    hidden = sigmoid(hidden @ numpy_params["decoder_0"]["kernel"] + numpy_params["decoder_0"]["bias"])
    output = sigmoid(hidden @ output_kernel + numpy_params["output"]["bias"])
    return np.mean((output - data) ** 2)

  assert sorted(params) == sorted(layer_names)
  value, gradients = jax.jit(jax.value_and_grad(
      lambda p: autoencoders.reconstruction_mse(model, p, images)
  ))(params)
  assert float(value) == pytest.approx(numpy_mse(numpy_params["output"]["kernel"]), rel=1e-5)
  np.testing.assert_allclose(
      gradients["output"]["kernel"],
      numeric_gradient(numpy_mse, numpy_params["output"]["kernel"]),
      rtol=1e-3, atol=1e-7,
  )


def test_resnet_loss_value_and_gradient():
  split = loaders.ImageSplit(
      np.random.default_rng(3).random((6, 8, 8, 1)).astype(np.float32),
      np.array([0, 1, 2, 3, 4, 5], np.int32), np.zeros((2, 8, 8, 1), np.float32),
      np.array([0, 1], np.int32),
  )
  problem = resnet.build_problem("r", "r", split, depth=8, width=2, batch_size=3, schedule=None)
  params, batch_stats = problem.init(0)
  model = resnet.ResNet(blocks_per_stage=1, width=2)

  @jax.jit
  def logits_loss_gradients(params, batch_stats):
    logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, problem.data["x"],
                            train=True, mutable=["batch_stats"])
    loss_and_stats, gradients = jax.value_and_grad(problem.loss, has_aux=True)(
        params, batch_stats, problem.data, jnp.arange(6)
    )
    return logits, loss_and_stats, gradients

  logits, (value, new_stats), gradients = logits_loss_gradients(params, batch_stats)
  logits = np.asarray(logits, np.float64)
  log_softmax = logits - np.log(np.sum(np.exp(logits), axis=1, keepdims=True))
  expected = -np.mean(log_softmax[np.arange(6), split.y_train])

  assert float(value) == pytest.approx(expected, rel=1e-5)
  assert jax.tree.structure(new_stats) == jax.tree.structure(batch_stats)

  # The gradient of the loss with respect to the output bias is mean(softmax - one_hot).
  probabilities = np.exp(log_softmax)
  probabilities[np.arange(6), split.y_train] -= 1.0
  np.testing.assert_allclose(gradients["Dense_0"]["bias"], probabilities.mean(axis=0), rtol=1e-4, atol=1e-6)


# Optimizers


def test_simba_vector_step_normalised():
  # The README's claim for least squares: on a vector, Simba's step is the
  # sampled momentum divided by its norm.
  gradient = jnp.asarray(np.random.default_rng(4).normal(size=64), jnp.float32)
  tx = simba_optax.simba(coarse_rows=8, rank=20, eps=1e-12)
  direction, _ = jax.jit(tx.update)(gradient, tx.init(gradient))
  sampled = np.flatnonzero(np.asarray(direction))
  assert len(sampled) == 8
  expected = np.asarray(gradient)[sampled] / np.linalg.norm(np.asarray(gradient)[sampled])
  np.testing.assert_allclose(np.asarray(direction)[sampled], expected, rtol=1e-5)


def problem_for_optimizers(vectors_as_columns=False):
  def loss(params, model_state, data, batch):
    del batch
    return jnp.sum(jnp.square(params["w"] @ params["v"] - data["y"])), model_state

  return common.Problem(
      name="p", title="p", data={"y": jnp.ones(4)},
      init=lambda seed: ({"w": jnp.eye(4) * 0.5, "v": jnp.arange(4.0)}, None),
      loss=loss, batch_indices=lambda seed, steps: np.zeros((steps, 1), np.int32),
      evaluate=lambda params, state: {"train_loss": 0.0},
      vectors_as_columns=vectors_as_columns,
  )


@pytest.mark.parametrize("name", common.OPTIMIZER_NAMES + common.OPTIONAL_OPTIMIZER_NAMES)
def test_every_optimizer_takes_steps(name):
  problem = problem_for_optimizers()
  spec = common.OptimizerSpec(name, name, {"coarse_fraction": 1.0} if name == "simba" else {})
  chunk = jax.jit(common.make_train_chunk(problem, spec))
  params, state = problem.init(0)
  opt_state = common.build_optimizer(spec, problem, 0.01, seed=0).init(params)
  new_params, _, _, losses = chunk(params, state, opt_state, jnp.float32(0.01), problem.data,
                                   jnp.zeros((3, 1), jnp.int32))
  assert losses.shape == (3,)
  assert np.all(np.isfinite(losses))
  assert float(losses[-1]) < float(losses[0])
  assert not np.allclose(new_params["v"], params["v"])


def test_sophia_needs_objective():
  problem = problem_for_optimizers()
  tx = common.build_optimizer(common.OptimizerSpec("sophia", "sophia"), problem, 0.01, seed=0)
  params, _ = problem.init(0)
  with pytest.raises(ValueError, match="obj_fn"):
    tx.update(params, tx.init(params), params)


def test_kron_missing_package_message(monkeypatch):
  import_module = importlib.import_module

  def without_psgd(name, *args):
    if name.startswith("psgd_jax"):
      raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    return import_module(name, *args)

  monkeypatch.setattr(importlib, "import_module", without_psgd)
  with pytest.raises(ValueError, match=r"pip install \"\.\[psgd\]\""):
    common.psgd_kron(lambda count: 0.01)


def test_muon_vector_as_column_normalised():
  problem = problem_for_optimizers(vectors_as_columns=True)
  tx = common.build_optimizer(common.OptimizerSpec("muon", "muon"), problem, 1.0, seed=0)
  params = {"v": jnp.zeros(16)}
  gradient = {"v": jnp.asarray(np.random.default_rng(5).normal(size=16), jnp.float32)}
  updates, _ = tx.update(gradient, tx.init(params), params)
  update = -np.asarray(updates["v"])
  cosine = update @ np.asarray(gradient["v"]) / np.linalg.norm(update) / np.linalg.norm(gradient["v"])
  assert cosine == pytest.approx(1.0, abs=1e-4)
  # Newton-Schulz leaves the singular value within about [0.7, 1.2] of 1.
  assert 0.5 < np.linalg.norm(update) < 1.5


def test_coarse_options_parsed():
  assert least_squares.coarse_options("25", 5000) == ("simba n_l=25", {"coarse_rows": 25})
  assert least_squares.coarse_options("0.05", 64) == ("simba n_l=4 (0.05n)", {"coarse_fraction": 0.05})
  assert least_squares.coarse_options("300", 64)[0] == "simba n_l=64"
  for token in ("0", "1.5", "abc", "-3"):
    with pytest.raises(ValueError, match="coarse size"):
      least_squares.coarse_options(token, 64)


def test_learning_rate_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="--grid"):
    common.read_learning_rates(tmp_path / "none.json", ["adam"], [])
  bad = tmp_path / "bad.json"
  bad.write_text("{\"something\": 1}")
  with pytest.raises(ValueError, match="chosen_learning_rates"):
    common.read_learning_rates(bad, ["adam"], [])
  partial = tmp_path / "partial.json"
  partial.write_text(json.dumps({"chosen_learning_rates": {"adam": 0.1, "sgd": None}}))
  with pytest.raises(ValueError, match="sgd"):
    common.read_learning_rates(partial, ["adam", "sgd"], [])
  with pytest.raises(ValueError, match="not among"):
    common.read_learning_rates(partial, ["adam"], [("simab", 0.1)])
  assert common.read_learning_rates(partial, ["adam", "sgd"], [("sgd", 0.5)]) == {"adam": 0.1, "sgd": 0.5}


# Entry points


def check_outputs(folder, name, labels, seeds, steps):
  payload = read_json(folder / f"{name}.json")
  assert sorted(payload["optimizers"]) == sorted(labels)
  for label in labels:
    runs = payload["optimizers"][label]["runs"]
    assert [run["seed"] for run in runs] == list(seeds)
    for run in runs:
      assert len(run["batch_loss"]) == steps
      assert len(run["train_time_s"]) == len(run["eval_steps"])
  assert payload["machine"]["cpu_count"] >= 1
  assert payload["machine"]["versions"]["simba_optax"] == simba_optax.__version__
  assert (folder / f"{name}.png").stat().st_size > 0
  table = (folder / f"{name}.md").read_text()
  assert "| optimizer |" in table
  assert "±" in table
  return payload


def test_least_squares_grid_then_runs(tmp_path):
  common_args = ["--coarse-sizes", "2", "--steps", "6", "--eval-every", "3", "--out",
                 str(tmp_path), "--no-progress"]
  grid = least_squares.main([*common_args, "--optimizers", "sgd", "--grid", "--grid-values",
                             "0.01", "0.1"])
  assert set(grid["chosen_learning_rates"]) == {"sgd"}
  assert grid["chosen_learning_rates"]["sgd"] in (0.01, 0.1)
  assert (tmp_path / "least_squares_digits_lr.md").is_file()

  # The sgd rate comes from the grid's file, Simba's from --lr.
  least_squares.main([*common_args, "--optimizers", "simba", "sgd", "--seeds", "0", "1",
                      "--lr", "simba n_l=2=0.1"])
  payload = check_outputs(tmp_path, "least_squares_digits", ["simba n_l=2", "sgd"], [0, 1], 6)
  assert payload["optimizers"]["sgd"]["learning_rate"] == grid["chosen_learning_rates"]["sgd"]
  assert payload["optimizers"]["simba n_l=2"]["learning_rate"] == 0.1
  assert payload["optimizers"]["simba n_l=2"]["simba_options"]["coarse_rows"] == 2


def test_least_squares_svmlight_file(tmp_path):
  rng = np.random.default_rng(6)
  path = tmp_path / "tiny.svm"
  dump_svmlight_file(rng.random((20, 6)), np.where(rng.random(20) > 0.5, 1, -1), str(path))
  least_squares.main(["--svmlight", str(path), "--optimizers", "sgd", "--steps", "4",
                      "--eval-every", "2", "--batch-size", "8", "--seeds", "0",
                      "--lr", "sgd=0.1", "--out", str(tmp_path), "--no-progress"])
  payload = check_outputs(tmp_path, "least_squares_tiny", ["sgd"], [0], 4)
  assert payload["settings"]["features"] == 6


def test_least_squares_missing_inputs(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    least_squares.main(["--svmlight", str(tmp_path / "gisette_scale"), "--out", str(tmp_path)])
  with pytest.raises(FileNotFoundError, match="--grid"):
    least_squares.main(["--optimizers", "adam", "--out", str(tmp_path), "--no-progress"])
  with pytest.raises(SystemExit):
    least_squares.main(["--steps", "0"])


def test_saddle_all_optimizers(tmp_path):
  labels = list(common.OPTIMIZER_NAMES)
  payload = saddle.main(
      ["--depth", "2", "--width", "3", "--steps", "4", "--eval-every", "2", "--seeds", "0", "1",
       "--out", str(tmp_path), "--no-progress", "--threshold", "0.9",
       "--lr", *[f"{label}=0.05" for label in labels]]
  )
  check_outputs(tmp_path, "saddle_deep_linear_L2", labels, [0, 1], 4)
  assert payload["settings"]["gradient_flow_time_to_threshold"] > 0
  assert any("Predicted steps of SGD" in line for line in payload["notes"])
  assert "steps to train_loss" in (tmp_path / "saddle_deep_linear_L2.md").read_text()


def test_saddle_rejects_depth_one():
  with pytest.raises(SystemExit):
    saddle.main(["--depth", "1"])


def test_autoencoder_mnist_npz(tmp_path):
  rng = np.random.default_rng(7)
  path = tmp_path / "mnist.npz"
  np.savez(path, x_train=rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
           x_test=rng.integers(0, 256, (4, 28, 28), dtype=np.uint8))
  payload = autoencoders.main(
      ["--mnist", str(path), "--encoder-sizes", "6", "3", "--optimizers", "simba",
       "--steps", "4", "--eval-every", "2", "--batch-size", "4", "--seeds", "0",
       "--eval-subset", "8", "--lr", "simba=0.05", "--out", str(tmp_path),
       "--no-progress"]
  )
  check_outputs(tmp_path, "autoencoder_mnist_mnist", ["simba"], [0], 4)
  assert payload["settings"]["layer_sizes"] == [784, 6, 3, 6, 784]
  assert payload["settings"]["activation"] == "sigmoid"


def test_autoencoder_curves_mat(tmp_path):
  rng = np.random.default_rng(8)
  path = tmp_path / "digs3pts_1.mat"
  scipy_io.savemat(path, {"bdata": rng.random((10, 16)), "bdatatest": rng.random((3, 16))})
  payload = autoencoders.main(
      ["--curves", str(path), "--encoder-sizes", "4", "2", "--optimizers", "sophia",
       "--steps", "2", "--eval-every", "1", "--batch-size", "5", "--seeds", "0", "1",
       "--lr", "sophia=0.001", "--out", str(tmp_path), "--no-progress"]
  )
  check_outputs(tmp_path, "autoencoder_curves_curves", ["sophia"], [0, 1], 2)
  assert payload["settings"]["activation"] == "relu"


def test_autoencoder_missing_curves_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="bdata"):
    autoencoders.main(["--curves", str(tmp_path / "none.mat"), "--out", str(tmp_path)])


def test_resnet_cifar_folder(tmp_path):
  rng = np.random.default_rng(9)
  folder = tmp_path / "cifar-10-batches-py"
  folder.mkdir()
  for name in (*loaders.CIFAR_TRAIN_BATCHES, loaders.CIFAR_TEST_BATCH):
    with open(folder / name, "wb") as handle:
      pickle.dump({b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                   b"labels": rng.integers(0, 10, 4).tolist()}, handle)
  payload = resnet.main(
      ["--cifar", str(folder), "--width", "2", "--epochs", "2", "--batch-size", "10",
       "--optimizers", "sgd", "--seeds", "0", "--lr", "sgd=0.01", "--out", str(tmp_path),
       "--no-progress"]
  )
  check_outputs(tmp_path, "resnet8_cifar10", ["sgd"], [0], 4)
  run = payload["optimizers"]["sgd"]["runs"][0]
  assert run["eval_steps"] == [0, 2, 4]
  assert 0.0 <= run["metrics"]["test_accuracy"][-1] <= 100.0


def test_resnet_schedules():
  step = resnet.make_schedule("step", epochs=6, steps_per_epoch=10)
  assert [float(step(jnp.asarray(count))) for count in (0, 29, 30, 39, 40)] == pytest.approx(
      [1.0, 1.0, 0.2, 0.2, 0.04])
  cosine = resnet.make_schedule("cosine", epochs=6, steps_per_epoch=10)
  assert float(cosine(0)) == pytest.approx(1.0)
  assert float(cosine(60)) == pytest.approx(resnet.COSINE_FLOOR)
  assert resnet.make_schedule("constant", 6, 10) is None


def test_resnet_rejects_bad_depth():
  with pytest.raises(SystemExit):
    resnet.main(["--depth", "10"])
