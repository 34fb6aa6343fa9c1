"""Dataset plugins on small fixtures in the real file formats, and their errors for missing files."""

from __future__ import annotations

import pickle
import random
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from torch_teleport import default_registry
from torch_teleport.lab import datasets
from torch_teleport.lab.data import DataSplits, MissingDataError


def dataset(name: str):
    return default_registry().get("dataset", name)


# -- fixtures in the real formats -------------------------------------------------------------
def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """MNIST's idx format: big-endian magic (0x0803 images, 0x0801 labels), sizes, then uint8 data."""
    folder.mkdir(parents=True, exist_ok=True)
    n, rows, cols = images.shape
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 2051, n, rows, cols) + images.tobytes()
    )
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(
        struct.pack(">II", 2049, n) + labels.tobytes()
    )


@pytest.fixture
def mnist_root(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(0)
    splits = {
        "train": (
            rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
            np.array([3, 1, 4, 1, 5], dtype=np.uint8),
        ),
        "t10k": (
            rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
            np.array([9, 2, 6], dtype=np.uint8),
        ),
    }
    for prefix, (images, labels) in splits.items():
        write_idx(tmp_path / "MNIST" / "raw", prefix, images, labels)
    return tmp_path, splits


def write_cifar(
    root: Path, hundred: bool, rng: np.random.Generator
) -> dict[str, tuple[np.ndarray, list[int]]]:
    """The python-version pickles: ``data`` (N x 3072 uint8, channel-major), labels, and the meta."""
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    files = (
        ["train", "test"] if hundred else [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    )
    label_key = "fine_labels" if hundred else "labels"
    classes = 100 if hundred else 10
    written = {}
    for i, name in enumerate(files):
        data = rng.integers(0, 256, (2 + i % 2, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, classes, len(data))]
        with open(folder / name, "wb") as file:
            pickle.dump({"data": data, label_key: labels}, file)
        written[name] = (data, labels)
    meta = (
        {"fine_label_names": [f"c{i}" for i in range(100)]}
        if hundred
        else {"label_names": [f"c{i}" for i in range(10)]}
    )
    with open(folder / ("meta" if hundred else "batches.meta"), "wb") as file:
        pickle.dump(meta, file)
    return written


# -- scikit-learn digits ------------------------------------------------------------------------
@pytest.mark.parametrize(("level", "shape"), [("row", (8, 8)), ("pixel", (64, 1))])
def test_digits_sequence_reshapes_the_digit_images(level, shape):
    images, sequences = dataset("digits")(), dataset("digits_sequence")(level=level)
    assert sequences.input_shape == shape and sequences.num_classes == 10
    for image_split, sequence_split in (
        (images.train, sequences.train),
        (images.test, sequences.test),
    ):
        pixels, labels = image_split.tensors
        seqs, seq_labels = sequence_split.tensors
        assert seqs.shape == (len(pixels), *shape)
        assert torch.equal(seqs.reshape(len(seqs), -1), pixels.reshape(len(pixels), -1))
        assert torch.equal(seq_labels, labels)


# -- MNIST-1D ----------------------------------------------------------------------------------------
def test_mnist1d_is_generated_offline_the_same_every_time():
    python_state, numpy_state = random.getstate(), np.random.get_state()[1].copy()
    first, second = dataset("mnist1d")(), dataset("mnist1d")()
    assert random.getstate() == python_state  # the generator's reseeding is undone
    assert np.array_equal(np.random.get_state()[1], numpy_state)
    assert first.input_shape == (40,) and first.num_classes == 10
    assert "4000 train / 1000 test" in first.description
    for split, again, size in ((first.train, second.train, 4000), (first.test, second.test, 1000)):
        inputs, labels = split.tensors
        assert inputs.shape == (size, 40) and inputs.dtype == torch.float32
        assert labels.shape == (size,) and labels.dtype == torch.long
        assert set(labels.tolist()) == set(range(10))
        assert all(torch.equal(a, b) for a, b in zip(split.tensors, again.tensors, strict=True))


def test_mnist1d_sequence_is_mnist1d_as_40_steps_of_one():
    signals, sequences = dataset("mnist1d")(), dataset("mnist1d_sequence")()
    assert sequences.input_shape == (40, 1) and sequences.num_classes == 10
    for signal_split, sequence_split in (
        (signals.train, sequences.train),
        (signals.test, sequences.test),
    ):
        (inputs, labels), (steps, step_labels) = signal_split.tensors, sequence_split.tensors
        assert steps.shape == (len(inputs), 40, 1) and torch.equal(steps[..., 0], inputs)
        assert torch.equal(step_labels, labels)


def test_mnist1d_without_its_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mnist1d", None)  # None in sys.modules: the import fails
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(ImportError, match=r"pip install 'torch-teleport\[lab\]'"):
        dataset("mnist1d")()


# -- MNIST and sequential MNIST -----------------------------------------------------------------
def test_mnist_reads_idx_files(mnist_root):
    root, written = mnist_root
    splits = dataset("mnist")(root)
    assert isinstance(splits, DataSplits) and (len(splits.train), len(splits.test)) == (5, 3)
    image, label = splits.test[2]
    assert image.shape == (1, 28, 28) and label == written["t10k"][1][2]
    expected = (torch.tensor(written["t10k"][0][2], dtype=torch.float32) / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(image[0], expected)


@pytest.mark.parametrize(("level", "shape"), [("pixel", (784, 1)), ("row", (28, 28))])
def test_smnist_is_mnist_as_sequences(mnist_root, level, shape):
    root, _ = mnist_root
    images, sequences = dataset("mnist")(root), dataset("smnist")(root, level=level)
    assert sequences.input_shape == shape
    for i in range(len(images.train)):
        (image, label), (sequence, seq_label) = images.train[i], sequences.train[i]
        assert sequence.shape == shape and seq_label == label
        assert torch.equal(sequence.reshape(-1), image.reshape(-1))


def test_smnist_rejects_an_unknown_level(mnist_root):
    with pytest.raises(ValueError, match="sequence level"):
        dataset("smnist")(mnist_root[0], level="column")


# -- CIFAR ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_reads_python_pickles_without_md5_check(tmp_path, hundred):
    written = write_cifar(tmp_path, hundred, np.random.default_rng(1))
    splits = dataset("cifar100" if hundred else "cifar10")(tmp_path, verify_md5=False)
    train_files = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    train_data = np.concatenate([written[f][0] for f in train_files])
    train_labels = [label for f in train_files for label in written[f][1]]
    assert splits.num_classes == (100 if hundred else 10) and splits.input_shape == (3, 32, 32)
    assert len(splits.train) == len(train_data)
    assert len(splits.test) == len(written["test" if hundred else "test_batch"][0])
    mean, std = datasets.CIFAR_STATS["CIFAR100" if hundred else "CIFAR10"]
    index = len(train_data) - 1
    image, label = splits.train[index]
    raw = torch.tensor(train_data[index].reshape(3, 32, 32), dtype=torch.float32) / 255
    expected = (raw - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(image, expected)
    assert label == train_labels[index]


def test_cifar_md5_check_rejects_files_that_are_not_the_release(tmp_path):
    write_cifar(tmp_path, False, np.random.default_rng(2))
    with pytest.raises(MissingDataError, match="md5") as caught:
        dataset("cifar10")(tmp_path)
    assert str(tmp_path / "cifar-10-batches-py") in str(caught.value)


# -- Tiny-ImageNet -------------------------------------------------------------------------------
def write_jpeg(path: Path, color: tuple[int, int, int], mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (64, 64), color)
    (image.convert("L") if mode == "L" else image).save(path, "JPEG")


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    base = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01"]
    for k, wnid in enumerate(wnids):
        for i in range(2):
            write_jpeg(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", (200 * k, 50, 100))
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
    write_jpeg(base / "val" / "images" / "val_0.JPEG", (10, 20, 30))
    write_jpeg(base / "val" / "images" / "val_1.JPEG", (90, 90, 90), mode="L")
    (base / "val" / "val_annotations.txt").write_text(
        "val_0.JPEG\tn02\t0\t0\t10\t10\nval_1.JPEG\tn01\t1\t2\t3\t4\n"
    )
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    return tmp_path


def test_tiny_imagenet_reads_the_folder_layout(tiny_root):
    splits = dataset("tiny_imagenet")(tiny_root)
    assert splits.num_classes == 2 and splits.input_shape == (3, 64, 64)
    assert len(splits.train) == 4 and len(splits.test) == 2
    assert splits.train.class_to_idx == {"n01": 0, "n02": 1}
    assert [splits.test[i][1] for i in range(2)] == [1, 0]
    grey, _ = splits.test[1]  # a greyscale JPEG comes back with three channels
    assert grey.shape == (3, 64, 64)
    torch.testing.assert_close(grey[0] * 0.229 + 0.485, grey[1] * 0.224 + 0.456, atol=1e-5, rtol=0)


def test_tiny_imagenet_resizes(tiny_root):
    splits = dataset("tiny_imagenet")(tiny_root, image_size=32)
    assert splits.input_shape == (3, 32, 32) and splits.train[0][0].shape == (3, 32, 32)


def test_tiny_imagenet_rejects_annotations_of_unknown_classes(tiny_root):
    annotations = tiny_root / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    annotations.write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match="n99"):
        dataset("tiny_imagenet")(tiny_root)


# -- electricity and traffic ---------------------------------------------------------------------
ROWS, SERIES = 250, 3


@pytest.fixture
def series_root(tmp_path: Path) -> Path:
    """``value[t, j] = 10 t + j``: every value names its row, so windows and targets can be read back."""
    values = 10.0 * np.arange(ROWS)[:, None] + np.arange(SERIES)[None, :]
    for name in ("electricity.txt", "traffic.txt"):
        np.savetxt(tmp_path / name, values, delimiter=",", fmt="%g")
    return tmp_path


@pytest.mark.parametrize("name", ["electricity", "traffic"])
def test_forecast_target_is_24_hours_after_the_last_input_hour(series_root, name):
    splits = dataset(name)(series_root, standardize=False)
    window, horizon, split = 7 * 24, 24, int(0.8 * ROWS)
    assert splits.input_shape == (window, SERIES) and splits.num_classes == 0
    assert len(splits.train) == split - (window + horizon - 1)
    assert len(splits.test) == ROWS - split
    for part, first_target in ((splits.train, window + horizon - 1), (splits.test, split)):
        for index in (0, len(part) - 1):
            inputs, target = part[index]
            rows = (inputs[:, 0] / 10).round().long()
            target_row = first_target + index
            assert inputs.shape == (window, SERIES)
            assert torch.equal(
                rows, torch.arange(target_row - horizon - window + 1, target_row - horizon + 1)
            )
            assert torch.equal(
                target, torch.tensor(10.0 * target_row + np.arange(SERIES), dtype=torch.float32)
            )
    last_train_target = splits.train[len(splits.train) - 1][1]
    assert last_train_target[0] == 10 * (split - 1)
    with pytest.raises(IndexError):
        splits.test[len(splits.test)]


def test_forecast_standardises_with_training_rows_only(series_root):
    raw = dataset("electricity")(series_root, standardize=False)
    scaled = dataset("electricity")(series_root)
    split = int(0.8 * ROWS)
    values = torch.tensor(
        10.0 * np.arange(ROWS)[:, None] + np.arange(SERIES)[None, :], dtype=torch.float32
    )
    mean, std = values[:split].mean(0), values[:split].std(0)
    for raw_part, scaled_part in ((raw.train, scaled.train), (raw.test, scaled.test)):
        raw_inputs, raw_target = raw_part[3]
        inputs, target = scaled_part[3]
        torch.testing.assert_close(inputs, (raw_inputs - mean) / std)
        torch.testing.assert_close(target, (raw_target - mean) / std)


def test_forecast_window_options_and_too_short_files(series_root):
    splits = dataset("traffic")(series_root, window=10, horizon=1, standardize=False)
    inputs, target = splits.train[0]
    assert inputs.shape == (10, SERIES) and target[0] == 10 * 10
    with pytest.raises(ValueError, match="too few"):
        dataset("traffic")(series_root, window=240)


# -- Penn Treebank ----------------------------------------------------------------------------------
PTB_TEXT = {
    "train": " the <unk> company said n't it 's up $ N <unk>\n the company sold shares\n\n mr. <unk> said\n",
    "valid": " the company said\n",
    "test": " the zebra said <unk> things\n",
}


@pytest.fixture
def ptb_root(tmp_path: Path) -> Path:
    for split, text in PTB_TEXT.items():
        (tmp_path / f"ptb.{split}.txt").write_text(text)
    return tmp_path


def test_ptb_keeps_unk_whole_and_builds_the_vocabulary_from_train(ptb_root):
    from nltk.tokenize import TreebankWordTokenizer

    tokenizer = TreebankWordTokenizer()
    assert tokenizer.tokenize("a <unk> b")[1:4] == ["<", "unk", ">"]  # why tokenize_line exists
    assert datasets.tokenize_line(" a <unk> b<unk>", tokenizer) == ["a", "<unk>", "b", "<unk>"]

    splits = dataset("ptb")(ptb_root, seq_len=4)
    vocabulary = splits.train.vocabulary
    assert (
        "<unk>" in vocabulary.index
        and "<" not in vocabulary.index
        and "unk" not in vocabulary.index
    )
    assert "zebra" not in vocabulary.index and "things" not in vocabulary.index
    assert splits.num_classes == len(vocabulary)
    train_tokens = [vocabulary.tokens[i] for i in splits.train.ids]
    assert train_tokens[:12] == [
        "the",
        "<unk>",
        "company",
        "said",
        "n't",
        "it",
        "'s",
        "up",
        "$",
        "N",
        "<unk>",
        "<eos>",
    ]
    assert train_tokens.count("<eos>") == 3  # blank lines are skipped
    test_tokens = [vocabulary.tokens[i] for i in splits.test.ids]
    assert test_tokens == ["the", "<unk>", "said", "<unk>", "<unk>", "<eos>"]


def test_ptb_sequences_are_next_token_targets(ptb_root):
    splits = dataset("ptb")(ptb_root, seq_len=4)
    ids = splits.train.ids
    assert splits.input_shape == (4,)
    assert len(splits.train) == (len(ids) - 1) // 4
    for index in range(len(splits.train)):
        inputs, targets = splits.train[index]
        assert inputs.shape == targets.shape == (4,)
        assert torch.equal(inputs, ids[4 * index : 4 * index + 4])
        assert torch.equal(targets, ids[4 * index + 1 : 4 * index + 5])
    valid = dataset("ptb")(ptb_root, seq_len=2, test_split="valid")
    assert valid.test.vocabulary is valid.train.vocabulary
    assert [valid.train.vocabulary.tokens[i] for i in valid.test.ids] == [
        "the",
        "company",
        "said",
        "<eos>",
    ]


# -- missing data ------------------------------------------------------------------------------------
MISSING = {
    "mnist": ("MNIST/raw", "train-images-idx3-ubyte"),
    "fashion_mnist": ("FashionMNIST/raw", "t10k-labels-idx1-ubyte"),
    "smnist": ("MNIST/raw", "train-labels-idx1-ubyte"),
    "cifar10": ("cifar-10-batches-py", "data_batch_1"),
    "cifar100": ("cifar-100-python", "meta"),
    "tiny_imagenet": ("tiny-imagenet-200", "val_annotations.txt"),
    "electricity": ("electricity.txt", "comma-separated"),
    "traffic": ("traffic.txt", "one row per hour"),
    "ptb": ("ptb.train.txt", "ptb.test.txt"),
}


@pytest.mark.parametrize("name", sorted(MISSING))
def test_missing_files_name_the_expected_path_and_layout(tmp_path, name):
    where, layout = MISSING[name]
    with pytest.raises(MissingDataError) as caught:
        dataset(name)(tmp_path / "empty")
    message = str(caught.value)
    assert str(tmp_path / "empty" / where) in message and layout in message
    assert not (tmp_path / "empty").exists()  # nothing was created, let alone downloaded


@pytest.mark.parametrize("name", ["mnist", "smnist", "cifar10", "cifar100", "tiny_imagenet"])
def test_download_needs_an_explicit_root(name):
    with pytest.raises(ValueError, match="explicit root"):
        dataset(name)(None, download=True)


def test_ptb_vocab_size_keeps_the_most_frequent_tokens_and_fixes_the_classes(ptb_root):
    full = dataset("ptb")(ptb_root, seq_len=4)
    capped = dataset("ptb")(ptb_root, seq_len=4, vocab_size=4)
    assert capped.num_classes == 4
    assert full.train.vocabulary.tokens[:5] == [
        "<eos>",
        "<unk>",
        "company",
        "said",
        "the",
    ]  # 3, 3, 2, 2, 2
    assert capped.train.vocabulary.tokens == ["<eos>", "<unk>", "company", "said"]
    assert dataset("ptb")(ptb_root, seq_len=4, vocab_size=1).train.vocabulary.tokens == ["<unk>"]
    kept = set(capped.train.vocabulary.tokens)
    expected = [
        "<unk>" if full.train.vocabulary.tokens[i] not in kept else full.train.vocabulary.tokens[i]
        for i in full.train.ids
    ]
    assert [capped.train.vocabulary.tokens[i] for i in capped.train.ids] == expected
    roomy = dataset("ptb")(ptb_root, seq_len=4, vocab_size=500)
    assert roomy.num_classes == 500 and len(roomy.train.vocabulary) == len(full.train.vocabulary)


# -- the paper's Fig. 3 and Fig. 4 configs ------------------------------------------------------------
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PAPER_CONFIGS = {
    "cifar10_cnn": "cifar10",
    "cifar100_cnn": "cifar100",
    "tiny_imagenet_resnet": "tiny_imagenet",
    "smnist_transformer": "smnist",
    "electricity_transformer": "electricity",
    "traffic_transformer": "traffic",
    "ptb_transformer": "ptb",
}


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_config_follows_the_paper_and_names_registered_plugins(name):
    from torch_teleport.lab.config import load_config, resolve
    from torch_teleport.lab.experiment import OPTIMIZERS
    from torch_teleport.lab.train import SCHEMA

    config = resolve(load_config(CONFIGS / f"{name}.toml"), SCHEMA)
    registry = default_registry()
    assert config["dataset"]["name"] == PAPER_CONFIGS[name]
    for kind, key in (("model", config["model"]["name"]), ("dataset", config["dataset"]["name"])):
        registry.get(kind, key)
    teleport = config["teleport"]
    for kind in ("method", "objective", "null_space"):
        registry.get(kind, teleport[kind])
    schedule = registry.get("schedule", teleport["schedule"]["name"])(
        steps=teleport["steps"], cap=teleport["cap"], **teleport["schedule"]["options"]
    )
    training = config["training"]
    assert [o["name"] for o in training["optimizers"]] == ["sgd", "momentum", "adagrad", "adam"]
    assert all(o["name"] in OPTIMIZERS for o in training["optimizers"])
    assert training["seeds"] == [0, 1, 2] and training["with_teleport"] == [False, True]
    assert training["batch_size"] == 32 and teleport["batch_size"] == 32
    assert (schedule.template.batches, schedule.template.steps, sorted(schedule.epochs)) == (
        32,
        8,
        [0, 1, 2, 3, 4],
    )
    assert teleport["null_space"] == "exact" and teleport["objective"] == "grad_norm"
    assert schedule.warmup == (40 if name.endswith(("_cnn", "_resnet")) else 0)
    assert config["dataset"]["options"].get("download", False) is False  # never downloads unasked


def test_mnist1d_config_fits_its_data():
    from torch_teleport.lab.config import load_config
    from torch_teleport.lab.train import prepare

    setup = prepare(load_config(CONFIGS / "mnist1d_mlp.toml"))  # checks model, data and teleport
    assert setup.config["dataset"]["name"] == "mnist1d" and setup.splits.input_shape == (40,)


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_config_without_its_data_stops_before_training(tmp_path, capsys, name):
    from torch_teleport.lab.cli import main

    root, out = tmp_path / "no-data", tmp_path / "run"
    status = main(
        [
            "run",
            str(CONFIGS / f"{name}.toml"),
            "--set",
            "device=cpu",
            "--set",
            f"dataset.root={root}",
            "--out",
            str(out),
        ]
    )
    error = capsys.readouterr().err
    assert status == 2 and error.startswith("teleport: error: ") and str(root) in error
    assert not out.exists() and not root.exists()
