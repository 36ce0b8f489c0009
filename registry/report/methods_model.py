"""The report's methods on the models: the architectures read from the trained networks, the distillation loss and the
optimisation."""

from __future__ import annotations

from mlflow import MlflowClient
from mlflow.entities import Run

from pipelines.config import PipelineError
from pipelines.names import Metric
from registry.report.document import Block, Equation, Heading, Math, num, para, table
from registry.report.gather import Sources
from registry.report.methods_data import data_parts


def _int_metric(run: Run, name: str) -> int:
    if name not in run.data.metrics:
        raise PipelineError(f"run {run.info.run_id} has no metric {name!r}; it was logged by an older version, rerun the step")
    return int(run.data.metrics[name])


def teacher_description(s: Sources) -> str:
    """The teacher in words: its architecture, model, parameters and layers, or each member of an ensemble with its
    own cross-validated F1 and what the student distils from (their mean logits)."""
    described = [
        f"{run.data.params.get('teacher_arch')} ({model.name}), {_int_metric(run, 'teacher_params')} parameters; "
        f"layers: {layer_counts(model)}"
        for run, model in zip(s.teacher_members, s.models.teachers.values())
    ]
    if not s.ensemble:
        return f"Teacher: {described[0]}. "
    members = "; ".join(
        f"({i}) {text}; seed offset {run.data.params.get('teacher_seed_offset', '0')}, "
        f"k-fold F1 {num(run.data.metrics.get(Metric.F1_MEAN, float('nan')))} ± {num(run.data.metrics.get(Metric.F1_STD, float('nan')))}"
        for i, (run, text) in enumerate(zip(s.teacher_members, described), start=1)
    )
    return (
        f"Teacher: an ensemble of {len(described)} teachers, each trained on the same folds and training part; the student distils "
        f"from the mean of their logits, and the teacher's k-fold and hold-out numbers below are those of that mean. Members: {members}. "
    )


def architecture_section(s: Sources) -> list[Block]:
    """Heading "Architectures": teacher (or each member of an ensemble) and student, with the student's layers."""
    width, depth = s.trial.data.params["width"], s.trial.data.params["depth"]
    teacher_params = sum(_int_metric(run, "teacher_params") for run in s.teacher_members)
    student_params = _int_metric(s.promote, "student_params")
    return [
        Heading(2, "Architectures"),
        para(
            teacher_description(s) + f"Student: a plain CNN of {depth} blocks ({block_description(s.models.student)}) "
            f"with first-block width {width} doubling per block, "
            f"average and max global pooling side by side, dropout and a dense logit layer; {student_params} parameters "
            f"({teacher_params / max(student_params, 1):.1f} times fewer than the teacher). "
            + (
                "Two classes use a single logit z with the sigmoid."
                if s.binary
                else f"The {len(s.class_names)} classes use one logit each with the softmax."
            )
        ),
        table(
            "student-layers",
            f"Layers of the student ({s.models.student.name}).",
            ["layer", "type", "output shape", "parameters"],
            layer_rows(s.models.student),
        ),
    ]


def distillation_section(s: Sources) -> list[Block]:
    """Heading "Knowledge distillation": the loss, the selected temperature and weight, and the class weights."""
    from pipelines.training.fit import class_weights

    class_names = s.class_names
    _, train, _ = data_parts(s)
    label_index = {name: i for i, name in enumerate(class_names)}
    weights = class_weights(train["label"].map(label_index).to_numpy(), len(class_names))
    return [
        Heading(2, "Knowledge distillation"),
        para(
            "The student is trained on the loss below, with student logits z, cached teacher logits ",
            Math("z^{t}"),
            " (computed once per fold by that fold's teacher), temperature T and hard-loss weight ",
            Math(r"\alpha"),
            "; the sums run over a mini-batch and ",
            Math("w_{y}"),
            " is the class weight of label y."
            + (
                " With one logit, the two-class softmax of [0, z] is the sigmoid, so the KL term is the Bernoulli KL divergence."
                if s.binary
                else ""
            ),
        ),
        Equation(kd_equation(s.binary)),
        para(
            *selected_setting(s),
            " The no-KD baseline is the same student trained with ",
            Math(r"\alpha = 1"),
            " (hard labels only). Class weights are balanced, ",
            Math(r"w_c = n / (k\, n_c)"),
            ", computed on each training set; on the whole training part they are "
            + ", ".join(f"{name} {num(w)}" for name, w in zip(class_names, weights))
            + ".",
        ),
    ]


def selected_setting(s: Sources) -> list:
    """The search's selected temperature and weight, read from the trial's run: the no-KD run does not log them (a no-KD
    student is trained and reused whatever they are), so its parameters would show the Config's defaults."""
    temperature, alpha = (float(s.trial.data.params[name]) for name in ("temperature", "alpha"))
    setting = [Math(f"T = {num(temperature)}"), " and ", Math(rf"\alpha = {num(alpha)}")]
    if alpha == 1:
        return ["The selected configuration is the student without distillation (", *setting, ": the KD term has no weight)."]
    return ["The selected configuration uses ", *setting, "."]


def optimisation_section(s: Sources) -> list[Block]:
    """Heading "Optimisation": optimiser, batch size, learning-rate schedule, early stopping and the final models' epochs,
    worded by :func:`pipelines.training.fit.describe_optimiser` from the runs' Configs."""
    from pipelines.training.fit import describe_optimiser

    cfg, student = s.data_cfg, s.student_cfg
    client = MlflowClient()
    student_epochs = len(client.get_metric_history(s.promote.info.run_id, "student_all_loss"))
    no_kd_epochs = len(client.get_metric_history(s.promote.info.run_id, "no_kd_all_loss"))
    return [
        Heading(2, "Optimisation"),
        para(
            f"The teacher was trained with {describe_optimiser(cfg)}; the student with {describe_optimiser(student)}; "
            f"at most {cfg.epochs} epochs per fold with early stopping on the validation loss (patience {cfg.patience}, best "
            "weights restored). "
            "The final models were trained on the whole training part for a fixed number of epochs "
            "(the median best epoch of the folds): teacher "
            f"{', '.join(str(_int_metric(run, 'all_data_epochs')) for run in s.teacher_members)}, "
            f"KD student {student_epochs}, no-KD student {no_kd_epochs}."
        ),
    ]


def layer_rows(model) -> list[list[str]]:
    """Name, type, output shape and parameter count of each layer."""
    return [[layer.name, type(layer).__name__, str(tuple(layer.output.shape[1:])), str(layer.count_params())] for layer in model.layers]


def layer_counts(model) -> str:
    """How many layers of each type, the most frequent first (``12 Conv2D, 4 BatchNormalization, ...``)."""
    counts: dict[str, int] = {}
    for layer in model.layers:
        counts[type(layer).__name__] = counts.get(type(layer).__name__, 0) + 1
    return ", ".join(f"{n} {name}" for name, n in sorted(counts.items(), key=lambda item: -item[1]))


def block_description(model) -> str:
    """The student's first block as its layers are, from its first convolution to its first pooling: kernel sizes,
    the normalisation (group, batch, or none where ``student_norm=none`` or quantisation folded it away), the
    activation and the pooling."""
    import keras

    start = next(i for i, layer in enumerate(model.layers) if isinstance(layer, keras.layers.Conv2D))
    end = next(i for i, layer in enumerate(model.layers) if i > start and isinstance(layer, keras.layers.MaxPooling2D))
    words = []
    for layer in model.layers[start : end + 1]:
        if isinstance(layer, keras.layers.Conv2D):
            words.append("{} × {} convolution".format(*layer.kernel_size))
        elif isinstance(layer, keras.layers.GroupNormalization):
            words.append("group normalisation")
        elif isinstance(layer, keras.layers.BatchNormalization):
            words.append("batch normalisation")
        elif isinstance(layer, keras.layers.ReLU):
            words.append("ReLU")
        elif isinstance(layer, keras.layers.MaxPooling2D):
            words.append("{} × {} max-pooling".format(*layer.pool_size))
        else:
            words.append(type(layer).__name__)
    if not any("normalisation" in word for word in words):
        words.insert(1, "no normalisation")
    return ", ".join(words)


def kd_equation(binary: bool) -> str:
    """The distillation loss in LaTeX: sigmoid and Bernoulli KL for one logit, softmax and KL for more."""
    if binary:
        hard = r"\ell_{\mathrm{BCE}}\big(y_i, \sigma(z_i)\big)"
        soft = r"\mathrm{KL}\Big(\mathrm{Bern}\big(\sigma(z^{t}_i/T)\big)\,\Big\|\,\mathrm{Bern}\big(\sigma(z_i/T)\big)\Big)"
    else:
        hard = r"\ell_{\mathrm{CE}}\big(y_i, \mathrm{softmax}(\mathbf{z}_i)\big)"
        soft = r"\mathrm{KL}\Big(\mathrm{softmax}(\mathbf{z}^{t}_i/T)\,\Big\|\,\mathrm{softmax}(\mathbf{z}_i/T)\Big)"
    return r"\mathcal{L} = \frac{\alpha \sum_i w_{y_i}\, " + hard + r" + (1-\alpha)\, T^{2} \sum_i w_{y_i}\, " + soft + r"}{\sum_i w_{y_i}}"
