"""Scoring a whole split in batches: the one helper every model call on many rows goes through."""

from __future__ import annotations

import numpy as np
import pandas as pd

# Rows per forward pass when a whole split is scored: memory stays bounded by one batch, however many images.
EVAL_BATCH = 256


def in_batches(function, inputs, batch_size: int):
    """``function`` applied to consecutive slices of at most ``batch_size`` rows of ``inputs`` (an array or a
    DataFrame), the results (arrays or DataFrames) concatenated in order.

    The one way a whole split is sent to a model: a Keras model's memory stays bounded by one batch, and a
    served model never gets more rows per call than it accepts (``registry.model.MAX_BATCH``).
    """
    rows = inputs.iloc if isinstance(inputs, pd.DataFrame) else inputs
    outputs = [function(rows[start : start + batch_size]) for start in range(0, len(inputs), batch_size)] or [function(inputs)]
    if isinstance(outputs[0], pd.DataFrame):
        return pd.concat(outputs, ignore_index=True)
    return np.concatenate(outputs)
