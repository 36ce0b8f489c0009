"""What the prepare step hands every later step: the data set, its splits and its decoded images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.data.sources import Dataset
from pipelines.data.splits import Splits


@dataclass(frozen=True)
class Prepared:
    dataset: Dataset
    splits: Splits
    images: np.ndarray  # (N, S, S, 1), rows aligned with dataset.manifest
    inputs: dict[str, str]  # the DATA_INPUTS of the Config it was prepared from
    minority: str  # the minority class: the one imbalance subsamples and the minority metrics are of
