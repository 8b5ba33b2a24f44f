"""Tests for the autoencoder example, run with tiny networks and few steps."""

import contextlib
import gzip
import io
import json
import math
import platform
import struct
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from examples import autoencoder

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OPTIMIZERS = ("simba", "adam", "sgd")
STEPS = 20


def run_main(argv):
    """Run the example's main() and return its result and everything it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = autoencoder.main(argv)
    return results, printed.getvalue()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One run of all three optimizers on the digits with a small network."""
    out = tmp_path_factory.mktemp("autoencoder")
    argv = [
        "--optimizers", *OPTIMIZERS,
        "--steps", str(STEPS),
        "--eval-every", "10",
        "--encoder-sizes", "32", "8",
        "--out", str(out),
        "--no-progress",
    ]
    results, printed = run_main(argv)
    return out, results, printed


@pytest.mark.slow
def test_main_writes_output_files(tiny_run):
    out, results, _ = tiny_run

    assert (out / "results.md").is_file()
    assert (out / "loss_curves.png").read_bytes()[:8] == PNG_SIGNATURE
    assert json.loads((out / "results.json").read_text()) == results


@pytest.mark.slow
def test_main_prints_markdown_table(tiny_run):
    out, _, printed = tiny_run
    table = (out / "results.md").read_text().strip()

    assert table in printed
    rows = table.splitlines()
    assert rows[0].startswith("| optimizer | learning rate | final train MSE | final test MSE |")
    assert [row.split("|")[1].strip() for row in rows[2:]] == list(OPTIMIZERS)
    for row in rows[2:]:
        assert row.split("|")[-2].strip() == str(STEPS)


@pytest.mark.slow
def test_main_records_finite_losses(tiny_run):
    _, results, _ = tiny_run

    assert list(results["optimizers"]) == list(OPTIMIZERS)
    for name, record in results["optimizers"].items():
        assert record["eval_steps"] == [0, 10, 20], name
        assert record["steps"] == STEPS, name
        assert all(math.isfinite(value) for value in record["train_mse"]), name
        assert all(math.isfinite(value) for value in record["test_mse"]), name
        assert record["wall_time_s"] > 0.0, name


@pytest.mark.slow
def test_main_reduces_train_loss(tiny_run):
    _, results, _ = tiny_run

    for name, record in results["optimizers"].items():
        assert record["train_mse"][-1] < record["train_mse"][0], name


@pytest.mark.slow
def test_optimizers_start_from_same_parameters(tiny_run):
    _, results, _ = tiny_run
    initial = [record["train_mse"][0] for record in results["optimizers"].values()]

    assert initial == [initial[0]] * len(initial)


@pytest.mark.slow
def test_main_records_settings_and_environment(tiny_run):
    _, results, _ = tiny_run

    assert results["dataset"] == "digits"
    assert results["layer_sizes"] == [64, 32, 8, 32, 64]
    assert results["parameter_count"] == (64 * 32 + 32) + (32 * 8 + 8) + (8 * 32 + 32) + (32 * 64 + 64)
    for name in OPTIMIZERS:
        expected = autoencoder.DIGITS_LEARNING_RATES[name]
        assert results["optimizers"][name]["learning_rate"] == expected
    environment = results["environment"]
    assert environment["jax"] == jax.__version__
    assert environment["optax"] == optax.__version__
    assert environment["machine"] == platform.machine()


def test_main_is_reproducible_per_seed(tmp_path):
    argv = [
        "--optimizers", "adam", "--lr-adam", "0.002", "--steps", "6", "--eval-every", "3",
        "--encoder-sizes", "8", "4", "--no-progress", "--seed", "5",
    ]

    first, _ = run_main([*argv, "--out", str(tmp_path / "first")])
    second, _ = run_main([*argv, "--out", str(tmp_path / "second")])
    other_seed, _ = run_main([*argv, "--out", str(tmp_path / "other"), "--seed", "6"])

    assert first["optimizers"]["adam"]["learning_rate"] == 0.002
    losses = first["optimizers"]["adam"]["train_mse"]
    assert second["optimizers"]["adam"]["train_mse"] == losses
    assert other_seed["optimizers"]["adam"]["train_mse"] != losses


def write_idx(path, magic, array):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", size) for size in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_main_trains_on_mnist_files(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "mnist"
    data.mkdir()
    for prefix, count in (("train", 40), ("t10k", 10)):
        images = rng.integers(0, 256, size=(count, 6, 6))
        labels = rng.integers(0, 10, size=count)
        write_idx(data / f"{prefix}-images-idx3-ubyte.gz", 2051, images)
        write_idx(data / f"{prefix}-labels-idx1-ubyte.gz", 2049, labels)

    results, printed = run_main([
        "--mnist", str(data), "--optimizers", "adam", "--steps", "4", "--eval-every", "2",
        "--batch-size", "8", "--encoder-sizes", "8", "4", "--out", str(tmp_path / "out"),
        "--no-progress",
    ])

    assert results["dataset"] == "mnist"
    assert results["layer_sizes"] == [36, 8, 4, 8, 36]
    expected_rate = autoencoder.MNIST_LEARNING_RATES["adam"]
    assert results["optimizers"]["adam"]["learning_rate"] == expected_rate
    assert "40 train and 10 test images" in printed
    assert (tmp_path / "out" / "loss_curves.png").is_file()


def test_main_reports_missing_mnist_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        autoencoder.main(["--mnist", str(tmp_path / "absent"), "--out", str(tmp_path)])

    assert error.value.code == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--steps", "0"],
        ["--batch-size", "-1"],
        ["--lr-adam", "0"],
        ["--optimizers", "rmsprop"],
        ["--encoder-sizes", "16", "0"],
        ["--steps", "abc"],
        ["--lr-simba", "inf"],
        ["--seed", "-1"],
        ["--coarse-fraction", "2"],
        ["--rank", "0"],
        ["--eps", "nan"],
        ["--batch-size", "5000"],
        ["--eps", "1e39"],
    ],
    ids=[
        "steps", "batch-size", "learning-rate", "optimizer", "encoder-size",
        "steps-text", "learning-rate-infinite", "seed", "coarse-fraction", "rank", "eps",
        "batch-above-data", "eps-above-float32",
    ],
)
def test_main_rejects_invalid_arguments(argv, capsys, tmp_path):
    with pytest.raises(SystemExit) as error:
        autoencoder.main([*argv, "--out", str(tmp_path)])

    assert error.value.code == 2
    message = capsys.readouterr().err
    assert "error:" in message
    assert "positive_int" not in message
    assert not (tmp_path / "results.json").exists()


def test_script_runs_from_repo_root(tmp_path):
    command = [
        sys.executable, "examples/autoencoder.py", "--optimizers", "adam", "--steps", "3",
        "--eval-every", "3", "--encoder-sizes", "8", "4", "--out", str(tmp_path),
        "--no-progress",
    ]

    completed = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )

    assert completed.returncode == 0, completed.stderr
    assert f"| adam | {autoencoder.DIGITS_LEARNING_RATES['adam']:g} |" in completed.stdout
    assert (tmp_path / "results.json").is_file()


def test_build_model_default_digits_shapes():
    model = autoencoder.build_model(64, autoencoder.DIGITS_ENCODER_SIZES)
    images = jnp.linspace(0.0, 1.0, 3 * 64).reshape(3, 64)

    params = model.init(jax.random.key(0), images)["params"]
    reconstructions = model.apply({"params": params}, images)

    kernel_shapes = [params[name]["kernel"].shape for name in params]
    assert kernel_shapes == [
        (64, 256), (256, 128), (128, 64), (64, 16),
        (16, 64), (64, 128), (128, 256), (256, 64),
    ]
    assert reconstructions.shape == (3, 64)
    assert bool(jnp.all((reconstructions > 0.0) & (reconstructions < 1.0)))


def test_build_model_rejects_empty_encoder():
    with pytest.raises(ValueError, match="encoder_sizes"):
        autoencoder.build_model(64, [])


def test_make_optimizer_rejects_unknown_name():
    with pytest.raises(ValueError, match="Unknown optimizer 'rmsprop'"):
        autoencoder.make_optimizer("rmsprop", 1e-3)


def test_make_optimizer_descends_and_scales_with_learning_rate():
    gradient = {"w": jnp.array([[2.0, -4.0], [1.0, 3.0]])}

    for name in OPTIMIZERS:
        optimizer = autoencoder.make_optimizer(name, 0.5)
        half, _ = optimizer.update(gradient, optimizer.init(gradient), gradient)
        optimizer = autoencoder.make_optimizer(name, 1.0)
        full, _ = optimizer.update(gradient, optimizer.init(gradient), gradient)

        assert float(jnp.vdot(half["w"], gradient["w"])) < 0.0, name
        np.testing.assert_allclose(full["w"], 2.0 * half["w"], rtol=1e-6, err_msg=name)
