"""Built-in datasets: every factory takes ``root`` and returns a :class:`~torch_teleport.data.DataSplits`.

* offline: scikit-learn's digits as images (``digits``) and as sequences (``digits_sequence``);
* torchvision: ``mnist``, ``fashion_mnist``, ``smnist`` (MNIST as sequences), ``cifar10``, ``cifar100``;
* folder and text formats: ``tiny_imagenet``, ``electricity``, ``traffic``, ``ptb``.

Files that are not where a factory looks raise
:class:`~torch_teleport.data.MissingDataError`, naming the path and the
expected layout. Nothing is ever downloaded unless the config says
``download = true`` *and* gives the ``root`` to download into.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from torch_teleport import hookimpl
from torch_teleport.data import DataSplits, MissingDataError

DEFAULT_ROOT = "data"
SEQUENCE_LEVELS = ("pixel", "row")


def _data_root(root: str | Path | None, download: bool) -> Path:
    """Where to look; a download needs a root chosen by the user, never a silent default."""
    if download and root is None:
        raise ValueError("download = true needs an explicit root: the folder to download into")
    return Path(root if root is not None else DEFAULT_ROOT)


class ToSequence:
    """Reshape an image tensor ``(1, H, W)`` into a sequence: ``(H*W, 1)`` pixels or ``(H, W)`` rows.

    A class rather than a lambda so that ``DataLoader`` workers can pickle it.
    """

    def __init__(self, level: str) -> None:
        if level not in SEQUENCE_LEVELS:
            raise ValueError(f"sequence level must be one of {SEQUENCE_LEVELS}, got {level!r}")
        self.level = level

    def __call__(self, image: Tensor) -> Tensor:
        rows = image.reshape(image.shape[-2], image.shape[-1])
        return rows.reshape(-1, 1) if self.level == "pixel" else rows

    def shape(self, height: int, width: int) -> tuple[int, int]:
        return (height * width, 1) if self.level == "pixel" else (height, width)


# -- scikit-learn digits (offline) ----------------------------------------------------------
def digits(
    root: str | Path | None = None, *, test_fraction: float = 0.2, split_seed: int = 0
) -> DataSplits:
    """scikit-learn's 1797 real 8x8 digit images (shipped in its wheel): works offline.

    Pixels are scaled to [0, 1]; the split is a fixed permutation drawn from ``split_seed``.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    n_test = int(round(test_fraction * len(labels)))
    test, train = order[:n_test], order[n_test:]
    return DataSplits(
        TensorDataset(images[train], labels[train]),
        TensorDataset(images[test], labels[test]),
        input_shape=(1, 8, 8),
        num_classes=10,
        description=f"scikit-learn digits ({len(train)} train / {n_test} test, 8x8)",
    )


def digits_sequence(
    root: str | Path | None = None,
    *,
    level: str = "row",
    test_fraction: float = 0.2,
    split_seed: int = 0,
) -> DataSplits:
    """The :func:`digits` images as sequences: 8 rows of 8 pixels (``level="row"``) or 64 x 1 pixels."""
    to_sequence = ToSequence(level)
    images = digits(root, test_fraction=test_fraction, split_seed=split_seed)
    splits = []
    for split in (images.train, images.test):
        pixels, labels = split.tensors
        splits.append(TensorDataset(torch.stack([to_sequence(x) for x in pixels]), labels))
    shape = to_sequence.shape(8, 8)
    return DataSplits(
        *splits,
        input_shape=shape,
        num_classes=10,
        description=f"{images.description} as {shape[0]} x {shape[1]} sequences",
    )


# -- torchvision image datasets -------------------------------------------------------------
MNIST_FILES = "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"
MNIST_STATS = {"MNIST": ((0.1307,), (0.3081,)), "FashionMNIST": ((0.2860,), (0.3530,))}
CIFAR_STATS = {
    "CIFAR10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "CIFAR100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _torchvision_splits(
    make: Callable[..., Dataset], root: Path, download: bool, where: Path, layout: str
) -> tuple[Dataset, Dataset]:
    """Train and test splits of a torchvision dataset; torchvision's errors become one clear message."""
    try:
        return make(str(root), train=True, download=download), make(
            str(root), train=False, download=download
        )
    except (
        RuntimeError,
        OSError,
    ) as error:  # torchvision's "not found or corrupted", or a failed download
        attempt = f"could not be downloaded ({error}); " if download else ""
        raise MissingDataError(
            f"no usable data under {where}: {attempt}expected {layout}"
            + ("" if download else ", or set download = true with a root of your choice")
        ) from error


def _mnist_like(
    name: str, root: str | Path | None, download: bool, level: str | None
) -> DataSplits:
    from torchvision import datasets, transforms

    root = _data_root(root, download)
    mean, std = MNIST_STATS[name]
    steps = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    to_sequence = ToSequence(level) if level is not None else None
    if to_sequence is not None:
        steps.append(to_sequence)
    transform = transforms.Compose(steps)
    train, test = _torchvision_splits(
        lambda path, **kw: getattr(datasets, name)(path, transform=transform, **kw),
        root,
        download,
        root / name / "raw",
        f"the four uncompressed idx files {MNIST_FILES}",
    )
    shape = to_sequence.shape(28, 28) if to_sequence else (1, 28, 28)
    return DataSplits(train, test, shape, 10, f"torchvision {name} from {root}, inputs {shape}")


def mnist(root: str | Path | None = None, *, download: bool = False) -> DataSplits:
    """MNIST (60k/10k, 28x28) read by torchvision from ``root/MNIST/raw`` (no checksum)."""
    return _mnist_like("MNIST", root, download, None)


def fashion_mnist(root: str | Path | None = None, *, download: bool = False) -> DataSplits:
    """FashionMNIST read by torchvision from ``root/FashionMNIST/raw``, like :func:`mnist`."""
    return _mnist_like("FashionMNIST", root, download, None)


def smnist(
    root: str | Path | None = None, *, download: bool = False, level: str = "pixel"
) -> DataSplits:
    """Sequential MNIST: each image as 784 pixels of dimension 1 (the paper) or, faster, 28 rows of 28."""
    return _mnist_like("MNIST", root, download, level)


def _unverified(cls: type) -> type:
    """A torchvision CIFAR class without md5 sums: its integrity check only asks that files exist."""
    return type(
        f"Unverified{cls.__name__}",
        (cls,),
        {
            "train_list": [[name, None] for name, _ in cls.train_list],
            "test_list": [[name, None] for name, _ in cls.test_list],
            "meta": {**cls.meta, "md5": None},
        },
    )


def _cifar(name: str, root: str | Path | None, download: bool, verify_md5: bool) -> DataSplits:
    from torchvision import datasets, transforms

    root = _data_root(root, download)
    cls = getattr(datasets, name)
    cls = cls if verify_md5 else _unverified(cls)
    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(*CIFAR_STATS[name])]
    )
    files = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    checked = "torchvision checks their md5 sums; set verify_md5 = false to read other copies"
    train, test = _torchvision_splits(
        lambda path, **kw: cls(path, transform=transform, **kw),
        root,
        download,
        root / cls.base_folder,
        f"the python-version batches {', '.join(files)} (from {cls.filename}; "
        + (checked if verify_md5 else "md5 not checked")
        + ")",
    )
    classes = len(train.classes)
    return DataSplits(
        train, test, (3, 32, 32), classes, f"torchvision {name} from {root / cls.base_folder}"
    )


def cifar10(
    root: str | Path | None = None, *, download: bool = False, verify_md5: bool = True
) -> DataSplits:
    """CIFAR-10 (50k/10k, 3x32x32) read by torchvision from ``root/cifar-10-batches-py``.

    torchvision compares every file's md5 with the official release;
    ``verify_md5 = false`` only asks that the files exist (for re-packed copies).
    """
    return _cifar("CIFAR10", root, download, verify_md5)


def cifar100(
    root: str | Path | None = None, *, download: bool = False, verify_md5: bool = True
) -> DataSplits:
    """CIFAR-100 (fine labels) from ``root/cifar-100-python``, like :func:`cifar10`."""
    return _cifar("CIFAR100", root, download, verify_md5)


# -- Tiny-ImageNet (folder layout) -----------------------------------------------------------
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_LAYOUT = (
    "tiny-imagenet-200/train/<wnid>/images/*.JPEG and tiny-imagenet-200/val/images/*.JPEG "
    "with tiny-imagenet-200/val/val_annotations.txt (tab-separated: file, wnid, box)"
)
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class AnnotatedImages(Dataset):
    """Images in one folder whose labels come from an annotation file (Tiny-ImageNet's val split)."""

    def __init__(self, samples: list[tuple[Path, int]], transform: Callable) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from torchvision.datasets.folder import default_loader

        path, label = self.samples[index]
        return self.transform(default_loader(str(path))), label


def _val_samples(val: Path, class_to_idx: dict[str, int]) -> list[tuple[Path, int]]:
    samples = []
    annotations = val / "val_annotations.txt"
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        filename, wnid, *_ = line.split("\t")
        if wnid not in class_to_idx:
            raise ValueError(f"{annotations}:{number}: class {wnid!r} has no folder under train/")
        samples.append((val / "images" / filename, class_to_idx[wnid]))
    return samples


def tiny_imagenet(
    root: str | Path | None = None, *, download: bool = False, image_size: int = 64
) -> DataSplits:
    """Tiny-ImageNet (200 classes, 100k train / 10k val, 64x64) from the standard folder layout.

    The labelled val split serves as the test split. ``image_size`` resizes
    (the paper reports 224, the native size is 64).
    """
    from torchvision import datasets, transforms
    from torchvision.datasets.utils import download_and_extract_archive

    root = _data_root(root, download)
    base = root / "tiny-imagenet-200"
    if download and not base.is_dir():
        download_and_extract_archive(TINY_IMAGENET_URL, str(root))
    needed = [base / "train", base / "val" / "images", base / "val" / "val_annotations.txt"]
    missing = [str(path) for path in needed if not path.exists()]
    if missing:
        raise MissingDataError(
            f"Tiny-ImageNet is not under {base} (missing {', '.join(missing)}): expected "
            f"{TINY_IMAGENET_LAYOUT}, as in {TINY_IMAGENET_URL}"
        )
    steps = [transforms.ToTensor(), transforms.Normalize(*IMAGENET_STATS)]
    if image_size != 64:
        steps.insert(0, transforms.Resize((image_size, image_size)))
    transform = transforms.Compose(steps)
    train = datasets.ImageFolder(str(base / "train"), transform=transform)
    test = AnnotatedImages(_val_samples(base / "val", train.class_to_idx), transform)
    shape = (3, image_size, image_size)
    return DataSplits(
        train, test, shape, len(train.classes), f"Tiny-ImageNet from {base}, inputs {shape}"
    )


# -- multivariate time series (plain-text matrices) -------------------------------------------
class ForecastWindows(Dataset):
    """Windows of a ``(time, series)`` matrix: ``window`` rows in, the row ``horizon`` steps later out.

    Item ``i`` has target row ``t = first_target + i`` and input rows
    ``t - horizon - window + 1 .. t - horizon`` (inclusive).
    """

    def __init__(
        self, series: Tensor, first_target: int, stop_target: int, window: int, horizon: int
    ) -> None:
        if first_target < window + horizon - 1:
            raise ValueError(
                f"target row {first_target} has fewer than {window} rows {horizon} steps before it"
            )
        self.series = series
        self.first_target = first_target
        self.length = max(stop_target - first_target, 0)
        self.window = window
        self.horizon = horizon

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"window {index} out of range for {self.length} windows")
        target = self.first_target + index
        last_input = target - self.horizon
        return self.series[last_input - self.window + 1 : last_input + 1], self.series[target]


def _forecast(
    name: str,
    root: str | Path | None,
    file: str,
    window: int,
    horizon: int,
    train_fraction: float,
    standardize: bool,
) -> DataSplits:
    """Chronological split: windows whose target row is in the first ``train_fraction`` train."""
    path = Path(root if root is not None else DEFAULT_ROOT) / file
    if not path.is_file():
        raise MissingDataError(
            f"{name} data not found at {path}: expected a plain-text matrix, one row per hour and one "
            f"comma-separated column per series (e.g. {file} from the multivariate-time-series-data "
            "collection; a .gz file is read too if named so)"
        )
    series = torch.from_numpy(np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2))
    rows, n_series = series.shape
    split = int(rows * train_fraction)
    if split < window + horizon or split >= rows:
        raise ValueError(
            f"{path} has {rows} rows: too few for a {window}-row window, a {horizon}-row horizon "
            f"and a train fraction of {train_fraction}"
        )
    if standardize:  # statistics of the training rows only, so the test split leaks nothing
        mean, std = series[:split].mean(0), series[:split].std(0)
        series = (series - mean) / torch.where(std > 0, std, torch.ones_like(std))
    train = ForecastWindows(series, window + horizon - 1, split, window, horizon)
    test = ForecastWindows(series, split, rows, window, horizon)
    return DataSplits(
        train,
        test,
        input_shape=(window, n_series),
        num_classes=0,
        description=(
            f"{name}: {n_series} series x {rows} hours from {path}; window {window}, target {horizon} "
            f"after its last row; {len(train)} train / {len(test)} test windows"
        ),
    )


def electricity(
    root: str | Path | None = None,
    *,
    file: str = "electricity.txt",
    window: int = 7 * 24,
    horizon: int = 24,
    train_fraction: float = 0.8,
    standardize: bool = True,
) -> DataSplits:
    """Hourly consumption of 321 clients (26,304 rows): a week in, each series 24 h later out.

    Each series is standardised with the mean and standard deviation of the
    training rows. A regression task: ``num_classes`` is 0.
    """
    return _forecast("electricity", root, file, window, horizon, train_fraction, standardize)


def traffic(
    root: str | Path | None = None,
    *,
    file: str = "traffic.txt",
    window: int = 7 * 24,
    horizon: int = 24,
    train_fraction: float = 0.8,
    standardize: bool = True,
) -> DataSplits:
    """Hourly occupancy of 862 road sensors (17,544 rows), windowed like :func:`electricity`."""
    return _forecast("traffic", root, file, window, horizon, train_fraction, standardize)


# -- Penn Treebank (text) ---------------------------------------------------------------------
UNK = "<unk>"
EOS = "<eos>"
PTB_FILES = ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt")


def tokenize_line(line: str, tokenizer) -> list[str]:
    """The tokens of ``line``, keeping PTB's ``<unk>`` whole (the Treebank tokenizer splits it)."""
    tokens: list[str] = []
    for i, piece in enumerate(line.split(UNK)):
        if i:
            tokens.append(UNK)
        tokens += tokenizer.tokenize(piece)
    return tokens


class Vocabulary:
    """Tokens by decreasing frequency (ties alphabetical); unknown tokens map to ``<unk>``.

    With ``max_size``, only the most frequent tokens are kept (``<unk>`` always is).
    """

    def __init__(self, tokens: Iterable[str], max_size: int | None = None) -> None:
        counts = Counter(tokens)
        counts.setdefault(UNK, 0)
        ranked = sorted(counts, key=lambda token: (-counts[token], token))
        if max_size is not None:
            ranked = (
                ranked[:max_size] if UNK in ranked[:max_size] else [*ranked[: max_size - 1], UNK]
            )
        self.tokens = ranked
        self.index = {token: i for i, token in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: Iterable[str]) -> Tensor:
        unk = self.index[UNK]
        return torch.tensor([self.index.get(token, unk) for token in tokens], dtype=torch.long)


class TokenSequences(Dataset):
    """Consecutive, non-overlapping chunks of a token stream; the target is the chunk shifted by one."""

    def __init__(self, ids: Tensor, seq_len: int, vocabulary: Vocabulary) -> None:
        self.ids = ids
        self.seq_len = seq_len
        self.vocabulary = vocabulary

    def __len__(self) -> int:
        return max(len(self.ids) - 1, 0) // self.seq_len

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"sequence {index} out of range for {len(self)} sequences")
        start = index * self.seq_len
        return self.ids[start : start + self.seq_len], self.ids[
            start + 1 : start + self.seq_len + 1
        ]


def ptb(
    root: str | Path | None = None,
    *,
    seq_len: int = 256,
    test_split: str = "test",
    vocab_size: int | None = None,
) -> DataSplits:
    """Penn Treebank language modelling: ``root/ptb.{train,valid,test}.txt``, one sentence per line.

    Lines are tokenised with nltk's ``TreebankWordTokenizer`` (``<unk>``
    kept as one token) and end with ``<eos>``; the vocabulary is the
    training tokens. ``test_split`` is ``"test"`` (the paper) or ``"valid"``.
    ``vocab_size`` fixes the number of classes, so a config can size the
    model without knowing the corpus: the most frequent tokens are kept
    (the rest become ``<unk>``), and ids past a smaller vocabulary go unused.
    """
    from nltk.tokenize import TreebankWordTokenizer

    if test_split not in ("test", "valid"):
        raise ValueError(f"test_split must be 'test' or 'valid', got {test_split!r}")
    if vocab_size is not None and vocab_size < 1:
        raise ValueError(f"vocab_size must be at least 1, got {vocab_size}")
    folder = Path(root if root is not None else DEFAULT_ROOT)
    missing = [str(folder / name) for name in PTB_FILES if not (folder / name).is_file()]
    if missing:
        raise MissingDataError(
            f"Penn Treebank not found: missing {', '.join(missing)}; expected {', '.join(PTB_FILES)} "
            f"in {folder} (plain text, one sentence per line, rare words written <unk>)"
        )
    tokenizer = TreebankWordTokenizer()

    def tokens(split: str) -> list[str]:
        text = (folder / f"ptb.{split}.txt").read_text(encoding="utf-8")
        return [
            token
            for line in text.splitlines()
            if line.strip()
            for token in (*tokenize_line(line, tokenizer), EOS)
        ]

    train_tokens = tokens("train")
    vocabulary = Vocabulary(train_tokens, vocab_size)
    train = TokenSequences(vocabulary.encode(train_tokens), seq_len, vocabulary)
    test = TokenSequences(vocabulary.encode(tokens(test_split)), seq_len, vocabulary)
    return DataSplits(
        train,
        test,
        input_shape=(seq_len,),
        num_classes=vocab_size or len(vocabulary),
        description=(
            f"Penn Treebank from {folder}: vocabulary {len(vocabulary)}, {len(train)} train / "
            f"{len(test)} {test_split} sequences of {seq_len} tokens"
        ),
    )


@hookimpl
def teleport_register_datasets(registry) -> None:
    registry.add_dataset("digits", digits)
    registry.add_dataset("digits_sequence", digits_sequence)
    registry.add_dataset("mnist", mnist)
    registry.add_dataset("fashion_mnist", fashion_mnist)
    registry.add_dataset("smnist", smnist)
    registry.add_dataset("cifar10", cifar10)
    registry.add_dataset("cifar100", cifar100)
    registry.add_dataset("tiny_imagenet", tiny_imagenet)
    registry.add_dataset("electricity", electricity)
    registry.add_dataset("traffic", traffic)
    registry.add_dataset("ptb", ptb)
