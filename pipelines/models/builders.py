"""Teacher and student builders. Both output logits: one for two classes (sigmoid), else one per class.

The logits layers are float32 under any dtype policy: with mixed_bfloat16 training the losses still get float32 logits.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import keras
import numpy as np
from keras import layers

from pipelines.config import STUDENT_PRESETS, PipelineError, parse_student_size, parse_teacher  # noqa: F401 (STUDENT_PRESETS: part of this module's API)

# What a user may give as teacher_weights: weights only (arrays), never a model with code.
WEIGHT_SUFFIXES = (".weights.h5", ".h5", ".keras")
# Teacher sizes (``resnet:S``, ``hybrid:L``; no size = M). ResNet: the four stages' widths.
RESNET_WIDTHS = {"S": (16, 32, 64, 128), "M": (24, 48, 96, 192), "L": (32, 64, 128, 256)}
# Hybrid: token width, Transformer blocks, attention heads.
HYBRID_SIZES = {"S": (64, 2, 2), "M": (96, 4, 4), "L": (128, 6, 4)}
# The hybrid's convolutional stem halves the image until at most this many tokens per side remain: attention costs
# the square of the token count, and a 16x16 grid still resolves a lesion of a few percent of the slice.
HYBRID_MAX_GRID = 16
# The package name under which this project's own layers are registered (keras.saving.register_keras_serializable).
CUSTOM_PACKAGE = "kd_brain"


def normalization(channels: int, name: str | None = None) -> layers.Layer:
    """GroupNorm, not BatchNorm: a few hundred scans give a handful of steps per epoch, too few for
    BatchNorm's moving statistics to settle, and inference with unsettled statistics predicted one class
    on whole folds (measured: 5-fold F1 0.50 ± 0.29 with BatchNorm vs 0.73 ± 0.06 with GroupNorm for the
    small student). GroupNorm behaves the same in training and inference."""
    return GroupNorm(groups=math.gcd(8, channels), name=name)


@keras.saving.register_keras_serializable(package=CUSTOM_PACKAGE)
class GroupNorm(layers.GroupNormalization):
    """Keras' GroupNormalization (same weights, config and function) for channels-last images, computed from each
    channel's moments: TensorFlow reduces the channels-last tensor over height and width in one contiguous pass, and the
    law of total variance combines the channels of a group (group variance = mean of the channel variances + variance of
    the channel means). Keras reshapes the tensor into groups and reduces over non-adjacent axes instead, which on CPU
    made GroupNorm up to half the training time of the resnet teacher (resnet:M at 64 px, batch 64, 2 AVX2 cores:
    29.5 and 35.9 images/s with Keras' layer, 51.6 with this one, measured alternately in one process)."""

    def call(self, inputs):
        if len(inputs.shape) != 4 or self.axis not in (-1, 3):
            return super().call(inputs)
        channels, groups = inputs.shape[-1], self.groups
        grouped = (-1, groups, channels // groups)
        # Statistics and normalisation in float32 under any dtype policy, as Keras' layer computes them.
        values = keras.ops.cast(inputs, "float32")
        channel_mean, channel_variance = keras.ops.moments(values, axes=(1, 2))
        channel_mean, channel_variance = keras.ops.reshape(channel_mean, grouped), keras.ops.reshape(channel_variance, grouped)
        mean = keras.ops.mean(channel_mean, axis=-1, keepdims=True)
        variance = keras.ops.mean(channel_variance + keras.ops.square(channel_mean - mean), axis=-1, keepdims=True)
        # Per image and channel: y = x * scale + shift, one pass over the image.
        scale = keras.ops.broadcast_to(keras.ops.rsqrt(variance + self.epsilon), keras.ops.shape(channel_mean))
        shift = -mean * scale
        scale, shift = keras.ops.reshape(scale, (-1, 1, 1, channels)), keras.ops.reshape(shift, (-1, 1, 1, channels))
        if self.scale:
            scale, shift = scale * self.gamma, shift * self.gamma
        if self.center:
            shift = shift + self.beta
        outputs = values * scale + shift
        return keras.ops.cast(outputs, self.compute_dtype)


def global_pool(x, quantized: bool = False):
    """Average and max pooling side by side: a tumour is a local finding, and averaging alone dilutes a
    small lesion over the whole slice. Every layer is named (here and below): the report's layer tables and
    Grad-CAM read these names, and Keras' own (``conv2d_78``) depend on how many models the process built.

    ``quantized``: fake quantization of the average (max pooling keeps its input's range) and of the concatenation."""
    average = layers.GlobalAveragePooling2D(name="global_avg_pool")(x)
    if quantized:
        average = FakeQuant(name="global_avg_pool_quant")(average)
    pooled = layers.Concatenate(name="pooled")([average, layers.GlobalMaxPooling2D(name="global_max_pool")(x)])
    return FakeQuant(name="pooled_quant")(pooled) if quantized else pooled


def output_units(num_classes: int) -> int:
    """Two classes get the dedicated single-logit head; more get one logit per class."""
    return 1 if num_classes == 2 else num_classes


# BatchNorm's moving averages follow the last ~10 steps, not ~100 (Keras' 0.99): a few hundred scans give a handful of
# steps per epoch, and early stopping reads the validation loss through these statistics from the first epoch on.
BATCH_NORM_MOMENTUM = 0.9


def student_normalization(norm: str, channels: int, name: str) -> layers.Layer | None:
    """The student's normalisation layer (``student_norm``): GroupNorm, BatchNorm or none."""
    if norm == "group":
        return normalization(channels, name=name)
    if norm == "batch":
        return layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM, name=name)
    return None


def build_student(size: str, image_size: int, num_classes: int, seed: int = 0, norm: str = "group", quantized: bool = False) -> keras.Model:
    """A small plain CNN: ``depth`` blocks of conv-norm-ReLU and max-pooling, widths doubling, then average and max pooling.

    ``norm`` (``student_norm``): ``group``, ``batch`` or ``none``; without one, the convolutions have a bias.
    ``quantized``: the quantization-aware form of a ``none`` student (pipelines/training/quantize.py fills it with a trained
    student's folded weights): kernels fake-quantized per output channel, the image and every activation that TFLite
    keeps as its own int8 tensor fake-quantized per tensor with trained ranges; layer names are the float student's.
    """
    if quantized and norm != "none":
        raise PipelineError(f"a quantized student has its normalisation folded into the convolutions: norm='none', not {norm!r}")
    width, depth = parse_student_size(size)
    init = keras.initializers.HeNormal(seed=seed)
    conv = FakeQuantConv2D if quantized else layers.Conv2D
    inputs = keras.Input((image_size, image_size, 1), name="image")
    x = FakeQuant(name="image_quant")(inputs) if quantized else inputs
    for block in range(depth):
        channels = width * 2**block
        x = conv(channels, 3, padding="same", use_bias=norm == "none", kernel_initializer=init, name=f"block{block + 1}_conv")(x)
        norm_layer = student_normalization(norm, channels, name=f"block{block + 1}_norm")
        x = norm_layer(x) if norm_layer is not None else x
        x = layers.ReLU(name=f"block{block + 1}_relu")(x)
        if quantized:
            x = FakeQuant(name=f"block{block + 1}_quant")(x)
        x = layers.MaxPooling2D(name=f"block{block + 1}_pool")(x)
    x = global_pool(x, quantized)
    x = layers.Dropout(0.2, seed=seed, name="head_dropout")(x)
    outputs = (FakeQuantDense if quantized else layers.Dense)(
        output_units(num_classes), name="logits", dtype="float32", kernel_initializer=keras.initializers.GlorotUniform(seed=seed)
    )(x)
    if quantized:
        outputs = FakeQuant(name="logits_quant")(outputs)
    return keras.Model(inputs, outputs, name=f"student_{width}x{depth}" + ("_qat" if quantized else ""))


def layer_inputs(model: keras.Model, layer: layers.Layer, images: np.ndarray, batch_size: int = 64):
    """What ``layer`` receives when ``model`` (in inference mode) sees ``images``, batch by batch (as numpy arrays)."""
    probe = keras.Model(model.input, layer.input)
    for start in range(0, len(images), batch_size):
        yield np.asarray(probe(images[start : start + batch_size], training=False))


def recalibrate_batch_norm(model: keras.Model, images: np.ndarray, batch_size: int = 64) -> None:
    """Precise BatchNorm (Wu and Johnson 2021): every BatchNorm layer's moving mean and variance replaced by the exact
    statistics of its inputs over ``images``, first layer to last, the network in inference mode. What inference then
    normalises with is what the trained weights saw, not a moving average of a few steps of changing weights."""
    for layer in [layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)]:
        count, total, squares = 0, 0.0, 0.0
        for features in layer_inputs(model, layer, images, batch_size):
            features = features.reshape(-1, features.shape[-1]).astype(np.float64)
            count, total, squares = count + len(features), total + features.sum(0), squares + (features**2).sum(0)
        mean = total / count
        layer.moving_mean.assign(mean.astype(np.float32))
        layer.moving_variance.assign(np.maximum(squares / count - mean**2, 0.0).astype(np.float32))


@keras.saving.register_keras_serializable(package=CUSTOM_PACKAGE)
class FakeQuant(layers.Layer):
    """Per-tensor 8-bit fake quantization of an activation with a trained range (straight-through gradients, the range's
    own gradients from TensorFlow's FakeQuantWithMinMaxVars, which the TFLite converter reads as the tensor's int8 scale).

    The range starts empty and is set from data by :func:`pipelines.training.quantize.qat_model` before training."""

    def build(self, input_shape):
        self.range_min = self.add_weight(name="range_min", shape=(), initializer="zeros")
        self.range_max = self.add_weight(name="range_max", shape=(), initializer="ones")

    def call(self, inputs):
        return keras.quantizers.fake_quant_with_min_max_vars(inputs, self.range_min, self.range_max, num_bits=8)


def _fake_quant_kernel(kernel, axis):
    """Symmetric 8-bit fake quantization of a kernel (TFLite's int8 weights: zero point 0, range [-127, 127]), per output
    channel (``axis``) or per tensor (None), its range the kernel's own largest magnitude at every step."""
    reduce = tuple(range(len(kernel.shape) - 1)) if axis is not None else None
    bound = keras.ops.maximum(keras.ops.max(keras.ops.abs(kernel), axis=reduce), 1e-8)
    return keras.quantizers.fake_quant_with_min_max_vars(kernel, -bound, bound, num_bits=8, narrow_range=True, axis=axis)


@keras.saving.register_keras_serializable(package=CUSTOM_PACKAGE)
class FakeQuantConv2D(layers.Conv2D):
    """A Conv2D whose kernel is fake-quantized per output channel."""

    def convolution_op(self, inputs, kernel):
        return super().convolution_op(inputs, _fake_quant_kernel(kernel, axis=-1))


@keras.saving.register_keras_serializable(package=CUSTOM_PACKAGE)
class FakeQuantDense(layers.Dense):
    """A Dense layer whose kernel is fake-quantized per tensor (TFLite's int8 fully connected layer takes one weight scale)."""

    def call(self, inputs, training=None):
        outputs = keras.ops.matmul(inputs, _fake_quant_kernel(self.kernel, axis=None))
        return self.activation(outputs + self.bias if self.use_bias else outputs)


# Custom layers that load in safe mode: registered by name in this module, so a saved config can only name them,
# never carry code (:func:`load_keras_model` accepts these names and no other non-Keras object).
SAFE_CUSTOM_OBJECTS = frozenset(f"{CUSTOM_PACKAGE}>{cls.__name__}" for cls in (GroupNorm, FakeQuant, FakeQuantConv2D, FakeQuantDense))


def _residual_block(x, filters: int, stride: int, init, name: str):
    shortcut = x
    y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, kernel_initializer=init, name=f"{name}_conv1")(x)
    y = normalization(filters, name=f"{name}_norm1")(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer=init, name=f"{name}_conv2")(y)
    y = normalization(filters, name=f"{name}_norm2")(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False, kernel_initializer=init, name=f"{name}_shortcut_conv")(
            shortcut
        )
        shortcut = normalization(filters, name=f"{name}_shortcut_norm")(shortcut)
    return layers.ReLU(name=f"{name}_relu")(layers.Add(name=f"{name}_add")([y, shortcut]))


def _resnet(image_size: int, units: int, seed: int, size: str = "M") -> keras.Model:
    widths = RESNET_WIDTHS[size]
    init = keras.initializers.HeNormal(seed=seed)
    inputs = keras.Input((image_size, image_size, 1), name="image")
    x = layers.Conv2D(widths[0], 3, padding="same", use_bias=False, kernel_initializer=init, name="stem_conv")(inputs)
    x = normalization(widths[0], name="stem_norm")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for stage, filters in enumerate(widths):
        x = _residual_block(x, filters, stride=1 if stage == 0 else 2, init=init, name=f"stage{stage + 1}")
    x = global_pool(x)
    x = layers.Dropout(0.3, seed=seed, name="head_dropout")(x)
    outputs = layers.Dense(units, name="logits", dtype="float32", kernel_initializer=keras.initializers.GlorotUniform(seed=seed))(x)
    return keras.Model(inputs, outputs, name="teacher_resnet" if size == "M" else f"teacher_resnet_{size}")


def _transformer_block(tokens, dim: int, heads: int, seed: int, name: str):
    """Pre-norm Transformer encoder block: x + MHA(LN(x)), then x + MLP(LN(x))."""
    y = layers.LayerNormalization(epsilon=1e-6, name=f"{name}_attn_norm")(tokens)
    y = layers.MultiHeadAttention(heads, dim // heads, dropout=0.1, seed=seed, name=f"{name}_attn")(y, y)
    tokens = layers.Add(name=f"{name}_attn_add")([tokens, y])
    y = layers.LayerNormalization(epsilon=1e-6, name=f"{name}_mlp_norm")(tokens)
    y = layers.Dense(2 * dim, activation="gelu", name=f"{name}_mlp_expand")(y)
    y = layers.Dropout(0.1, seed=seed, name=f"{name}_mlp_dropout")(y)
    y = layers.Dense(dim, name=f"{name}_mlp_project")(y)
    return layers.Add(name=f"{name}_mlp_add")([tokens, y])


def _hybrid(image_size: int, units: int, seed: int, size: str = "M") -> keras.Model:
    """A compact convolutional transformer (Hassani et al. 2021; Keras example "CCT"), built for small data.

    A convolutional stem turns the slice into a grid of tokens (convolutions give the locality prior a few
    hundred scans cannot teach attention); a depthwise convolution on that grid adds where each token lies
    (a conditional positional encoding, Chu et al. 2021: built-in layers only, so the model loads in safe mode);
    pre-norm Transformer blocks relate distant regions; the tokens are folded back into their grid, so pooling,
    logits and Grad-CAM work as for the CNNs (Grad-CAM reads the grid that enters the global pooling).
    """
    dim, blocks, heads = HYBRID_SIZES[size]
    init = keras.initializers.HeNormal(seed=seed)
    inputs = keras.Input((image_size, image_size, 1), name="image")
    x, side, stage = inputs, image_size, 0
    while side > HYBRID_MAX_GRID or stage < 2:
        stage += 1
        channels = dim if side // 2 <= HYBRID_MAX_GRID and stage >= 2 else dim // 2
        x = layers.Conv2D(channels, 3, padding="same", use_bias=False, kernel_initializer=init, name=f"stem{stage}_conv")(x)
        x = normalization(channels, name=f"stem{stage}_norm")(x)
        x = layers.ReLU(name=f"stem{stage}_relu")(x)
        x = layers.MaxPooling2D(name=f"stem{stage}_pool")(x)
        side = x.shape[1]
    # No bias on the positional convolution: TensorFlow's graph optimiser fails on a biased depthwise convolution
    # feeding an Add ("has an empty op name", printed on every traced step) and falls back; a per-channel constant
    # adds no position anyway.
    x = layers.Add(name="position_add")([x, layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="position_conv")(x)])
    grid = (x.shape[1], x.shape[2])
    tokens = layers.Reshape((grid[0] * grid[1], dim), name="to_tokens")(x)
    for block in range(blocks):
        tokens = _transformer_block(tokens, dim, heads, seed, name=f"encoder{block + 1}")
    tokens = layers.LayerNormalization(epsilon=1e-6, name="encoder_norm")(tokens)
    x = layers.Reshape((*grid, dim), name="to_grid")(tokens)
    x = global_pool(x)
    x = layers.Dropout(0.3, seed=seed, name="head_dropout")(x)
    outputs = layers.Dense(units, name="logits", dtype="float32", kernel_initializer=keras.initializers.GlorotUniform(seed=seed))(x)
    return keras.Model(inputs, outputs, name="teacher_hybrid" if size == "M" else f"teacher_hybrid_{size}")


def _application(arch: str, image_size: int, units: int, weights: str, seed: int) -> keras.Model:
    constructor = getattr(keras.applications, arch, None)
    if constructor is None or not callable(constructor):
        raise PipelineError(
            f"teacher_arch={arch!r}: use 'resnet', 'hybrid' (optionally :S, :M or :L) or a keras.applications name such as EfficientNetB0, "
            "MobileNetV2, DenseNet121, ResNet50"
        )
    if weights and not Path(weights).is_file():
        raise PipelineError(
            f"teacher_weights={weights!r} is not a file; give a local weights file (nothing is downloaded) or leave it empty"
        )
    if weights and not weights.lower().endswith(WEIGHT_SUFFIXES):
        raise PipelineError(
            f"teacher_weights={weights!r}: use a Keras weights file ({', '.join(WEIGHT_SUFFIXES)}); pickles and other formats are not "
            "loaded"
        )
    inputs = keras.Input((image_size, image_size, 1), name="image")
    # Applications expect three channels; the scans are grayscale, so repeat the channel.
    rgb = layers.Concatenate(name="grey_to_rgb")([inputs, inputs, inputs])
    backbone = constructor(include_top=False, weights=None, input_shape=(image_size, image_size, 3), pooling="avg")
    if weights:
        # What the constructor does with a path, done here so a bad file is a clear error. load_weights reads
        # arrays only: a .keras file's config (where a Lambda layer's code would live) is never deserialised.
        try:
            backbone.load_weights(weights)
        except (ValueError, OSError, KeyError) as error:
            raise PipelineError(
                f"teacher_weights={weights!r}: not {arch} weights without the top layers ({str(error).splitlines()[0]}); give the "
                "include_top=False weights file"
            ) from None
    x = layers.Dropout(0.3, seed=seed, name="head_dropout")(backbone(rgb))
    outputs = layers.Dense(units, name="logits", dtype="float32", kernel_initializer=keras.initializers.GlorotUniform(seed=seed))(x)
    return keras.Model(inputs, outputs, name=f"teacher_{arch}")


def build_teacher(arch: str, image_size: int, num_classes: int, weights: str = "", seed: int = 0) -> keras.Model:
    """Our residual CNN (``resnet[:S|M|L]``), our CNN-Transformer hybrid (``hybrid[:S|M|L]``) or a
    ``keras.applications`` backbone with ``weights=None`` or a local file."""
    units = output_units(num_classes)
    name, size = parse_teacher(arch)
    if name in ("resnet", "hybrid"):
        if weights:
            raise PipelineError(f"teacher_weights only applies to keras.applications teachers; leave it empty for {name!r}")
        return (_resnet if name == "resnet" else _hybrid)(image_size, units, seed, size)
    return _application(name, image_size, units, weights, seed)


def _unsafe_objects(config) -> set[str]:
    """Objects in a saved model's config that could run code: Lambda layers (marshalled Python bytecode) and
    anything that is not a built-in Keras object (custom classes and functions are imported by name)."""
    found: set[str] = set()
    if isinstance(config, dict):
        module, name = config.get("module"), config.get("class_name")
        if name in ("Lambda", "__lambda__"):
            found.add("a Lambda layer")
        elif config.get("registered_name") in SAFE_CUSTOM_OBJECTS and module == __name__:
            pass  # this module's own layers, looked up by their registered name
        elif isinstance(module, str) and module != "keras" and not module.startswith("keras."):
            found.add(f"{module}.{name}")
        for value in config.values():
            found |= _unsafe_objects(value)
    elif isinstance(config, list):
        for value in config:
            found |= _unsafe_objects(value)
    return found


def load_keras_model(path: Path | str) -> keras.Model:
    """A ``.keras`` model saved by this project, loaded in Keras safe mode after its config is checked.

    Refused with a :class:`PipelineError`, before anything is deserialised: files that are not ``.keras``
    archives (pickles, legacy HDF5 models) and configs with Lambda layers or non-Keras objects. Safe mode
    stays on as a second line of defence.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, KeyError, OSError, ValueError) as error:
        raise PipelineError(
            f"{path}: not a Keras .keras archive ({error}); only .keras models are loaded, never pickles or legacy HDF5 models"
        ) from None
    unsafe = _unsafe_objects(config)
    if unsafe:
        raise PipelineError(
            f"{path}: refused: the model contains {', '.join(sorted(unsafe))}, which could run code when loaded; only built-in Keras "
            "layers are loaded"
        )
    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except (ValueError, TypeError, OSError) as error:
        raise PipelineError(f"{path}: Keras could not load the model in safe mode ({str(error).splitlines()[0]})") from None
