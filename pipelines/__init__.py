"""Data, models, the Distiller and the training steps of the KD platform."""

import os

# TensorFlow's C++ start-up chatter (oneDNN, CPU features) buries the pipeline's own messages; errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
