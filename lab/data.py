"""What a dataset plugin returns, and the error for data that is not there."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset


class MissingDataError(FileNotFoundError):
    """The data files are not where the dataset expects them; the message says where and how."""


@dataclass
class DataSplits:
    """A train and a test split, with what a model needs to know about the inputs."""

    train: Dataset
    test: Dataset
    input_shape: tuple[int, ...]
    num_classes: int
    description: str
