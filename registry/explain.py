"""Grad-CAM: where the student (or its teacher) looks when it classifies a scan.

The heat map is computed on the model's input (the preprocessed, head-cropped square) and mapped back
through the same crop, padding and resizing onto the scan as it was read, so it has the scan's shape and
can be laid over it. Values are in [0, 1]; pixels outside the head box are 0.

``kd explain --model-name NAME --stage Production scan.jpg`` writes an overlay PNG;
:func:`explanation_grid` draws hold-out examples (true/false positives/negatives) for the report.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from PIL import Image

from pipelines.config import PipelineError
from pipelines.data.images import decode_image, head_box, preprocess
from pipelines.evaluation.metrics import probabilities, pyplot, save_figure
from pipelines.log import logger
from pipelines.names import VersionTag

GLOBAL_POOLING = (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D)
# The map is explained on the deepest feature map at least this many cells wide (the last one when it is): a map point
# can only be as precise as its cell. On 200 Br35H scans with boxes, a 4-class student at 32 px pointed into the box on
# 0.085 of them from its last map (2x2, after its last pooling), 0.46 from the 4x4 before that pooling and 0.71 from
# its 16x16 map; its resnet teacher 0.54 at 4x4 and 0.735 at 16x16 (the brightest pixel: 0.84). Finer still, the
# student's first block (32x32) scored 0.75, but a first block's map shows where its edges are more than what decided the
# class, the reason Grad-CAM reads a deep map at all (Selvaraju et al. 2017): 16 cells is the compromise.
MIN_MAP_CELLS = 16
# How strongly the heat map tints the scan in overlays.
OVERLAY_OPACITY = 0.5


@dataclass(frozen=True)
class Explanation:
    """One scan, the model's class probabilities, and the Grad-CAM heat map for ``class_name`` on the scan."""

    scan: np.ndarray  # (H, W) intensities as decoded
    heatmap: np.ndarray  # (H, W) in [0, 1]
    class_name: str
    probabilities: dict[str, float]

    @property
    def predicted(self) -> str:
        return max(self.probabilities, key=self.probabilities.get)

    @property
    def empty(self) -> bool:
        """No region raises the class score: the map is zero everywhere and explains nothing (never drawn as if it did)."""
        return not self.heatmap.max() > 0


def caption(explanation: Explanation, who: str) -> str:
    """A panel title: the prediction, and which class the map explains or that the map is empty."""
    prediction = f"{who}: {explanation.predicted} (p={explanation.probabilities[explanation.predicted]:.2f})"
    return f"{prediction}\nGrad-CAM for {explanation.class_name}" + (": all zero, not drawn" if explanation.empty else "")


def target_layer(model: keras.Model) -> keras.layers.Layer:
    """The global pooling layer whose input is the map Grad-CAM is computed on: the last convolutional feature map.

    Our student and our ResNet and hybrid teachers end in average and max pooling side by side over that map. A
    ``keras.applications`` teacher nests its convolutions and pooling in one backbone layer and is refused.
    """
    pooling = [layer for layer in model.layers if isinstance(layer, GLOBAL_POOLING) and len(layer.input.shape) == 4]
    if not pooling:
        raise PipelineError(
            f"model {model.name!r} has no global pooling over a convolutional feature map at its top level (a keras.applications backbone "
            "nests it); "
            "Grad-CAM supports the student and our resnet and hybrid teachers"
        )
    return pooling[-1]


def explained_map(model: keras.Model, final: bool = False):
    """The feature map Grad-CAM is computed on: the last one (the global pooling's input) when ``final`` or when it is at
    least ``MIN_MAP_CELLS`` wide, else the deepest map that is (the last one when none is)."""
    last = target_layer(model).input
    if final or last.shape[1] >= MIN_MAP_CELLS:
        return last
    wide = [
        layer.output
        for layer in model.layers[1:]
        if len(getattr(layer.output, "shape", ())) == 4 and (layer.output.shape[1] or 0) >= MIN_MAP_CELLS
    ]
    return wide[-1] if wide else last


def class_activation(model: keras.Model, image: np.ndarray, class_index: int, final: bool = False) -> np.ndarray:
    """The class score of ``image`` (S, S, 1) spread over :func:`explained_map` (the last feature map when ``final``):
    an (s, s) map, before any ReLU.

    Each position gets its features times the score's gradient there, summed over channels (element-wise
    weights, as in HiResCAM). Classic Grad-CAM first averages each channel's gradient over the map; with our
    head (average and max pooling side by side) that is wrong: a channel that fires on a lesion is read through
    its max-pool weight, often with a negative average-pool weight (lesion = a peak above a normal mean), so
    its averaged gradient is about zero or negative, and the tumour map came out negative everywhere (all
    zeros after the ReLU). Element-wise, the max-pool gradient stays at the peak, and since both pools are
    positively homogeneous the last map sums exactly to the score minus the logit's bias; on an earlier, finer map the
    same products are the first-order share of each position (LayerCAM's reading, Jiang et al. 2021).
    A single logit z scores class 1 as z and class 0 as -z (the two-class softmax of [0, z]).
    """
    import tensorflow as tf

    features_and_logits = _probe(model, final)
    batch = tf.convert_to_tensor(np.asarray(image, dtype=np.float32)[None])
    with tf.GradientTape() as tape:
        features, logits = features_and_logits(batch, training=False)
        if logits.shape[-1] == 1:
            score = logits[:, 0] if class_index == 1 else -logits[:, 0]
        else:
            score = logits[:, class_index]
    gradients = tape.gradient(score, features)
    return tf.reduce_sum(features * gradients, axis=-1)[0].numpy()


# The feature-map-and-logits models of each explained model, built once: building one per scan cost more than the
# gradient (the pointing game explains hundreds of scans with the same two models).
_PROBES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _probe(model: keras.Model, final: bool) -> keras.Model:
    """``model`` with its :func:`explained_map` as a second output."""
    probes = _PROBES.setdefault(model, {})
    if final not in probes:
        probes[final] = keras.Model(model.inputs, [explained_map(model, final), model.output])
    return probes[final]


def gradcam(model: keras.Model, image: np.ndarray, class_index: int) -> np.ndarray:
    """Grad-CAM of ``image`` (S, S, 1) for ``class_index``: an (S, S) map in [0, 1], all zeros when nothing raises the score.

    The ReLU of :func:`class_activation` (where the class gains), upsampled bilinearly and scaled by its maximum.
    """
    import tensorflow as tf

    cam = np.maximum(class_activation(model, image, class_index), 0.0)
    cam = tf.image.resize(cam[..., None], image.shape[:2], method="bilinear")[..., 0].numpy()
    cam = np.nan_to_num(cam, nan=0.0, posinf=0.0, neginf=0.0)
    peak = cam.max()
    return np.clip(cam / peak, 0.0, 1.0) if peak > 0 else np.zeros_like(cam)


def onto_scan(heatmap: np.ndarray, scan: np.ndarray) -> np.ndarray:
    """A heat map on the model's input mapped back onto the scan: undo the resize, the padding and the head crop."""
    rows, cols = head_box(scan)
    height, width = rows.stop - rows.start, cols.stop - cols.start
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    square = np.asarray(Image.fromarray(heatmap.astype(np.float32), mode="F").resize((side, side), Image.Resampling.BILINEAR))
    full = np.zeros(scan.shape, dtype=np.float32)
    full[rows, cols] = square[top : top + height, left : left + width]
    return np.clip(full, 0.0, 1.0)


def explain_scan(model: keras.Model, scan: np.ndarray, class_names: list[str], class_name: str | None = None) -> Explanation:
    """Grad-CAM of one decoded scan for ``class_name`` (default: the predicted class), on the scan.

    The scan is preprocessed at the model's own input size: a teacher may work at a higher resolution than its student.
    """
    image = preprocess(scan, model.input_shape[1])
    probs = probabilities(np.asarray(model(image[None], training=False)), len(class_names) == 2)[0]
    by_class = {name: float(p) for name, p in zip(class_names, probs)}
    if class_name is None:
        class_name = class_names[int(probs.argmax())]
    elif class_name not in class_names:
        raise PipelineError(f"class {class_name!r} is not one of the model's classes {class_names}")
    heatmap = onto_scan(gradcam(model, image, class_names.index(class_name)), scan)
    return Explanation(scan, heatmap, class_name, by_class)


def overlay(scan: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """RGB uint8: the scan in grey, tinted by the heat map (jet colour map) where it is high."""
    from matplotlib import colormaps

    low, high = np.percentile(scan, [0.5, 99.5])
    grey = np.clip((scan - low) / max(high - low, 1e-6), 0.0, 1.0)[..., None].repeat(3, axis=-1)
    colour = colormaps["jet"](heatmap)[..., :3]
    weight = OVERLAY_OPACITY * heatmap[..., None]
    return np.rint(255 * ((1 - weight) * grey + weight * colour)).astype(np.uint8)


def describe(explanation: Explanation, who: str) -> str:
    probs = ", ".join(f"{name} {p:.3f}" for name, p in explanation.probabilities.items())
    text = f"{who}: predicts {explanation.predicted} ({probs}); Grad-CAM for {explanation.class_name}"
    return text + (" is zero everywhere (no region raises that class's score); the panel shows the plain scan" if explanation.empty else "")


def draw(ax, explanation: Explanation, who: str, fontsize: int) -> None:
    """One panel: the overlay, or the plain scan when the map is empty (the title says so)."""
    if explanation.empty:
        ax.imshow(explanation.scan, cmap="gray")
    else:
        ax.imshow(overlay(explanation.scan, explanation.heatmap))
    ax.set_title(caption(explanation, who), fontsize=fontsize)


def write_overlay(explanations: dict[str, Explanation], title: str, out_path: Path) -> Path:
    """The scan and one Grad-CAM overlay per model, side by side, as a PNG."""
    plt = pyplot()

    first = next(iter(explanations.values()))
    fig, axes = plt.subplots(1, 1 + len(explanations), figsize=(3.2 * (1 + len(explanations)), 3.6), squeeze=False)
    axes[0, 0].imshow(first.scan, cmap="gray")
    axes[0, 0].set_title(title, fontsize=8)
    for ax, (who, explanation) in zip(axes[0, 1:], explanations.items()):
        draw(ax, explanation, who, fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    return save_figure(fig, out_path, dpi=120)


@dataclass(frozen=True)
class RegisteredModels:
    """A registered version's student (with its classes) and its all-data teacher, or each member of its teacher ensemble."""

    version: str
    student: keras.Model
    teachers: dict[str, keras.Model]  # "teacher", or "teacher member <i>" per member of an ensemble
    class_names: list[str]
    modality: int | None  # the BraTS channel an .h5 or NIfTI scan is read as; None for pictures


def load_models(model_name: str, version) -> RegisteredModels:
    """A registered version's student, and the all-data teacher(s) of the teacher run(s) it was distilled from.

    An ensemble teacher is explained member by member: its mean logits have no single feature map to compute Grad-CAM on.
    """
    import mlflow

    from pipelines.steps.teacher import load_teacher_models
    from registry.export import load_student

    wrapper = mlflow.pyfunc.load_model(f"models:/{model_name}/{version.version}").unwrap_python_model()
    teacher_run_id = version.tags.get(VersionTag.TEACHER_RUN_ID)
    if not teacher_run_id:
        raise PipelineError(f"{model_name} v{version.version} has no teacher_run_id tag; promote it again")
    members = load_teacher_models(teacher_run_id, "all")
    teachers = {"teacher": members[0]} if len(members) == 1 else {f"teacher member {i + 1}": model for i, model in enumerate(members)}
    # The Keras student, whatever format the version serves: Grad-CAM needs its feature maps and gradients.
    student = load_student(model_name, version.version)
    return RegisteredModels(version.version, student, teachers, wrapper.class_names, wrapper.modality)


def explain(
    model_name: str,
    image_path: Path,
    stage: str | None = None,
    alias: str | None = None,
    out_path: Path | None = None,
    class_name: str | None = None,
) -> Path:
    """Grad-CAM of the registered student and its teacher for one scan; writes the overlay PNG and returns its path."""
    image_path = Path(image_path)
    if not image_path.is_file():
        raise PipelineError(f"{image_path}: no such file; give an image file (jpg, png, ...)")
    from registry.fetch import resolve_version

    models = load_models(model_name, resolve_version(model_name, stage, alias))
    scan = decode_image(image_path, models.modality)
    explanations = {
        who: explain_scan(model, scan, models.class_names, class_name)
        for who, model in {"student": models.student, **models.teachers}.items()
    }
    out_path = Path(out_path) if out_path else image_path.with_name(f"{image_path.stem}.gradcam.png")  # next to the scan
    write_overlay(explanations, f"{image_path.name}\n{model_name} v{models.version}", out_path)
    for who, explanation in explanations.items():
        print(describe(explanation, who))
    logger("explain").info(f"overlay written to {out_path}")
    return out_path


def explanation_grid(models: RegisteredModels, examples: list[tuple[str, Path]], out_path: Path) -> Path:
    """One row per (category, scan): the scan, the student's and the teacher's (each ensemble member's) Grad-CAM for the predicted class."""
    plt = pyplot()

    panels = {"student": models.student, **models.teachers}
    fig, axes = plt.subplots(len(examples), 1 + len(panels), figsize=(2.5 * (1 + len(panels)), 2.6 * len(examples)), squeeze=False)
    for row, (category, path) in enumerate(examples):
        scan = decode_image(path, models.modality)
        axes[row, 0].imshow(scan, cmap="gray")
        axes[row, 0].set_title(f"{category}: {path.name[:28]}", fontsize=7)
        for column, (who, model) in enumerate(panels.items(), start=1):
            draw(axes[row, column], explain_scan(model, scan, models.class_names), who, fontsize=7)
    for ax in axes.ravel():
        ax.axis("off")
    return save_figure(fig, out_path, dpi=110)
