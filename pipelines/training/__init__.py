"""Training: the batches, optimiser and fit (fit), cross-validation in one process or fold workers (crossval), the
consistent-KD views and augmentation (views) and INT8 export after fake-quantisation fine-tuning (quantize)."""
