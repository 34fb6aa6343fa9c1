"""Built-in datasets: scikit-learn's digits (offline) and MNIST/FashionMNIST through torchvision."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from torch_teleport import hookimpl
from torch_teleport.data import DataSplits, MissingDataError


def digits(root: str | Path | None = None, *, test_fraction: float = 0.2, split_seed: int = 0) -> DataSplits:
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


def _torchvision_images(name: str, root: str | Path | None, download: bool) -> DataSplits:
    from torchvision import datasets, transforms

    cls = getattr(datasets, name)
    root = Path(root or "data")
    stats = {"MNIST": (0.1307, 0.3081), "FashionMNIST": (0.2860, 0.3530)}[name]
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((stats[0],), (stats[1],))])
    raw = root / name / "raw"

    def load(train: bool):
        try:
            return cls(str(root), train=train, transform=transform, download=False)
        except RuntimeError:
            if not download:
                raise
        try:
            return cls(str(root), train=train, transform=transform, download=True)
        except Exception as error:  # no network, mirror down, disk full...
            raise MissingDataError(
                f"{name} is not under {raw} and could not be downloaded ({error}). Put the four "
                f"uncompressed idx files there: train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                f"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"
            ) from error

    try:
        train, test = load(True), load(False)
    except RuntimeError as error:
        raise MissingDataError(
            f"{name} is not under {raw}: put the four uncompressed idx files there "
            f"(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
            f"t10k-labels-idx1-ubyte), or allow download"
        ) from error
    return DataSplits(train, test, (1, 28, 28), 10, f"torchvision {name} from {root}")


def mnist(root: str | Path | None = None, *, download: bool = True) -> DataSplits:
    """MNIST (60k/10k, 28x28) through torchvision: downloaded if possible, else read from ``root``."""
    return _torchvision_images("MNIST", root, download)


def fashion_mnist(root: str | Path | None = None, *, download: bool = True) -> DataSplits:
    """FashionMNIST through torchvision, like :func:`mnist`."""
    return _torchvision_images("FashionMNIST", root, download)


@hookimpl
def teleport_register_datasets(registry) -> None:
    registry.add_dataset("digits", digits)
    registry.add_dataset("mnist", mnist)
    registry.add_dataset("fashion_mnist", fashion_mnist)
