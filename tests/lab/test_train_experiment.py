"""The ``train`` experiment: checks before training, paired runs, summaries, and the MNIST configs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from torch_teleport.lab.cli import main
from torch_teleport.lab.config import ConfigError, apply_overrides, load_config, resolve
from torch_teleport.lab.datasets import mnist
from torch_teleport.lab.train import SCHEMA, prepare, summarize, table, train_all

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

TINY = [
    "model.options.hidden=[16]",
    "training.epochs=2",
    "training.batch_size=64",
    "training.seeds=[3, 4]",
    "training.optimizers=[{name='momentum', lr=0.05}]",
    "teleport.steps=2",
    "teleport.batch_size=8",
    "teleport.schedule={name='epochs', options={epochs=[0, 1], batches=2}}",
]


def tiny_config(*overrides: str) -> dict:
    return apply_overrides(load_config(), [*TINY, *overrides])



def test_runs_are_paired_and_teleports_keep_the_batch_loss(tmp_path, one_thread):
    # The guard sample's inputs join the core space: 8 teleport + 8 guard samples leave the exact
    # null space of a 16-wide hidden layer no room beyond its dead units; 32 wide leaves room.
    setup = prepare(tiny_config("model.options.hidden=[32]", "teleport.guard_samples=8"))
    seen = []
    results = train_all(
        setup, tmp_path, on_epoch_end=lambda run: seen.append((run.spec.name, run.trainer.epoch))
    )
    assert seen == [(name, epoch) for name in (r["name"] for r in results) for epoch in (1, 2)]
    by_key = {(r["teleport"], r["seed"]): r for r in results}
    for seed in (3, 4):
        plain, teleported = by_key[(False, seed)], by_key[(True, seed)]
        # Same seed: same initialisation, so the same loss before training.
        assert plain["train_loss"][0] == teleported["train_loss"][0]
        assert plain["test_loss"][0] == teleported["test_loss"][0]
        assert teleported["train_loss"][1:] != plain["train_loss"][1:]
        assert [t["epoch"] for t in teleported["teleports"]] == [0, 0, 1, 1]
        for teleport in teleported["teleports"]:
            assert teleport["stopped"] == "steps" and teleport["grad_norm_gain"] > 1
            assert teleport["loss_change"] <= 1e-5  # float32, exact null space
    assert by_key[(False, 3)]["train_loss"][0] != by_key[(False, 4)]["train_loss"][0]


def test_summary_counts_epochs_and_seconds_to_target():
    def run(optimizer, teleport, losses, seconds, gains=()):
        return {
            "optimizer": optimizer,
            "teleport": teleport,
            "train_loss": losses,
            "test_loss": [2 * x for x in losses],
            "seconds": seconds,
            "cpu_seconds": [s / 2 for s in seconds],
            "teleport_seconds": 0.5 * len(gains),
            "teleports": [{"grad_norm_gain": g} for g in gains],
        }

    results = [
        run("sgd", False, [2.0, 1.0, 0.4], [0, 1, 2]),
        run("sgd", False, [2.0, 0.6, 0.2], [0, 1, 2]),
        run("sgd", True, [2.0, 0.5, 0.1], [0, 3, 4], gains=(2.0, 4.0)),
        run("sgd", True, [2.0, 0.4, 0.3], [0, 3, 5], gains=(3.0,)),
    ]
    plain, teleported = summarize(results, target_loss=0.5)
    assert plain["final_train_loss_mean"] == pytest.approx(0.3)
    assert plain["final_train_loss_std"] == pytest.approx(math.sqrt(0.02))
    assert plain["final_test_loss_mean"] == pytest.approx(0.6)
    assert plain["epochs_to_target"] == [2, 2] and plain["seconds_to_target"] == [2, 2]
    assert teleported["epochs_to_target"] == [1, 1] and teleported["seconds_to_target"] == [3, 3]
    assert teleported["cpu_seconds_to_target"] == [1.5, 1.5]
    assert teleported["grad_norm_gain_mean"] == pytest.approx(3.0)
    assert teleported["teleport_seconds_mean"] == pytest.approx(0.75)
    assert plain["grad_norm_gain_mean"] is None

    (strict, _) = summarize(results, target_loss=0.3)
    assert strict["epochs_to_target"] == [2] and strict["target_reached"] == 1
    lines = table(summarize(results, target_loss=0.3), 0.3).splitlines()
    assert lines[2].split(" | ")[4] == "2 (1/2 seeds)"
    assert lines[3].split(" | ")[4] == "2 ± 0"

    untargeted = summarize(results, target_loss=None)
    assert [row["target_reached"] for row in untargeted] == [0, 0]
    assert untargeted[0]["final_train_loss_mean"] == pytest.approx(0.3)
    assert "no target" in table(untargeted, None)


@pytest.mark.parametrize(
    ("overrides", "key", "message"),
    [
        (
            ["model.options.input_dim=10"],
            "model.options",
            "running model 'mlp' on dataset 'digits' failed",
        ),
        (
            ["model.options.output_dim=5"],
            "model.options",
            "gives outputs of shape (5,) per sample, dataset 'digits' has 10 classes",
        ),
        (
            ["training.optimizers=[{name='sgd', lr=0.1}, {name='sgd', lr=0.2}]"],
            "training.optimizers",
            "'sgd' appears twice",
        ),
        (
            ["training.optimizers=[{name='adam', lr=0.1, options={betas=[2.0, 0.9]}}]"],
            "training.optimizers[0]",
            "building optimizer 'adam' failed: Invalid beta",
        ),
        (
            ["teleport.schedule.options.every=3"],
            "teleport.schedule",
            "building schedule 'epochs' failed",
        ),
        (
            ["teleport.schedule={name='auto', options={every=3}}"],
            "teleport.schedule.options",
            "the 'auto' schedule takes none",
        ),
        (["device=quantum"], "device", "using device 'quantum' failed"),
        (
            ["teleport.schedule.options.steps=3"],
            "teleport.schedule.options.steps",
            "set teleport.steps instead",
        ),
        (["training.with_teleport=[]"], "training.with_teleport", "must not be empty"),
    ],
)
def test_bad_settings_fail_before_training(overrides, key, message):
    with pytest.raises(ConfigError) as caught:
        prepare(tiny_config(*overrides))
    assert caught.value.key == key and message in str(caught.value)


def test_mnist_configs_are_the_papers_setup():
    for name, dataset in (("mnist_mlp.toml", "mnist"), ("fashion_mnist_mlp.toml", "fashion_mnist")):
        config = resolve(load_config(CONFIGS / name), SCHEMA)
        assert config["dataset"]["name"] == dataset
        assert config["model"] == {
            "name": "mlp",
            "options": {"input_dim": 784, "hidden": [1024, 1024], "output_dim": 10},
        }
        assert config["training"]["batch_size"] == 32 and config["training"]["seeds"] == [0, 1, 2]
        assert [o["name"] for o in config["training"]["optimizers"]] == [
            "sgd",
            "momentum",
            "adagrad",
            "adam",
        ]
        assert config["teleport"]["steps"] == 8 and config["teleport"]["null_space"] == "exact"
        assert config["teleport"]["schedule"] == {
            "name": "epochs",
            "options": {"epochs": [0, 1, 2, 3, 4], "batches": 32},
        }


@pytest.mark.parametrize(
    ("config", "folder"), [("mnist_mlp.toml", "MNIST"), ("fashion_mnist_mlp.toml", "FashionMNIST")]
)
def test_missing_data_names_the_expected_folder(capsys, tmp_path, config, folder):
    argv = [
        "run",
        str(CONFIGS / config),
        "--set",
        f"dataset.root={tmp_path}",
        "--set",
        "dataset.options.download=false",
    ]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("teleport: error: ")
    assert str(tmp_path / folder / "raw") in error and "train-images-idx3-ubyte" in error
    assert not (tmp_path / "out").exists()


def write_idx(path: Path, array: np.ndarray) -> None:
    """The idx format of MNIST: magic (0, 0, 0x08 = unsigned byte, ndim), big-endian int32 sizes, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist_fixture(root: Path, train: int = 96, test: int = 32) -> dict[str, np.ndarray]:
    """A small learnable MNIST in the real raw format: class k lights up row block k of the image."""
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = {}
    for prefix, count in (("train", train), ("t10k", test)):
        labels = rng.integers(0, 10, size=count)
        images = rng.integers(0, 40, size=(count, 28, 28))
        for image, label in zip(images, labels, strict=True):
            image[2 * label + 4 : 2 * label + 6, 4:24] = 255
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[prefix] = (images, labels)
    return arrays


def test_mnist_reads_raw_idx_files_and_trains_one_epoch(tmp_path, capsys):
    arrays = write_mnist_fixture(tmp_path / "data")
    splits = mnist(tmp_path / "data", download=False)
    assert (len(splits.train), len(splits.test)) == (96, 32)
    images, labels = arrays["t10k"]
    image, label = splits.test[5]
    assert label == labels[5] and image.shape == (1, 28, 28)
    assert float(image.max()) == pytest.approx((1.0 - 0.1307) / 0.3081)  # the 255 block, normalised
    assert image.argmax() // 28 == 2 * labels[5] + 4

    out = tmp_path / "run"
    overrides = [
        f"dataset.root={tmp_path / 'data'}",
        "dataset.options.download=false",
        "model.options.hidden=[32]",
        "training.epochs=1",
        "training.seeds=[0]",
        "training.optimizers=[{name='adam', lr=0.001}]",
        "teleport.steps=2",
        "teleport.schedule.options.batches=1",
    ]
    argv = ["run", str(CONFIGS / "mnist_mlp.toml"), "--out", str(out)]
    assert main([*argv, *(arg for o in overrides for arg in ("--set", o))]) == 0
    assert "torchvision MNIST" in capsys.readouterr().out
    results = (out / "results.json").read_text()
    assert '"teleport": true' in results and '"teleport": false' in results


def test_teleport_scalars_are_logged_at_the_training_step(tmp_path):
    setup = prepare(tiny_config("training.seeds=[3]", "training.with_teleport=[true]"))
    (result,) = train_all(setup, tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard" / result["name"]))
    events.Reload()
    batch_steps = [event.step for event in events.Scalars("train/batch_loss")]
    per_epoch = len(batch_steps) // 2
    assert batch_steps == list(range(1, 2 * per_epoch + 1)) and per_epoch > 2
    # Two teleport batches before epochs 0 and 1: before the first step of each epoch, logged at
    # that step, where train/batch_loss shows the loss of the update that followed.
    expected = [1, 1, per_epoch + 1, per_epoch + 1]
    assert [t["step"] for t in result["teleports"]] == expected
    for tag, key in (
        ("teleport/grad_norm_gain", "grad_norm_gain"),
        ("teleport/grad_norm_after", "grad_norm_after"),
        ("teleport/loss_change", "loss_change"),
        ("teleport/seconds", "seconds"),
    ):
        scalars = events.Scalars(tag)
        assert [event.step for event in scalars] == expected, tag
        assert [event.value for event in scalars] == pytest.approx(
            [t[key] for t in result["teleports"]], rel=1e-6, abs=1e-12
        ), tag


def test_the_auto_schedule_is_the_librarys_default_for_each_optimizer():
    import torch

    from torch_teleport.plugins.schedules import GainingSchedule, OnceSchedule

    setup = prepare(tiny_config("teleport.schedule={name='auto'}", "teleport.steps=3"))
    weights = [torch.nn.Parameter(torch.zeros(2))]
    adam, sgd = setup.build_schedule(torch.optim.Adam(weights)), setup.build_schedule(torch.optim.SGD(weights, lr=0.1))
    assert isinstance(adam, OnceSchedule) and isinstance(sgd, GainingSchedule)
    assert adam.template.steps == sgd.template.steps == 3
