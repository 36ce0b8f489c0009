"""A model card per registered version (after Mitchell et al. 2019, "Model cards for model reporting"), generated
from the registry and the tracking store, never typed: ``model_card.md`` logged to the version's run, its first lines
(the summary, up to the first section) as the version's description.

Promote writes it when it registers a version; ``kd card`` writes it again (after a new ``kd evaluate``, for
instance). Every figure is a logged metric, parameter or tag, printed with :func:`registry.report.document.num`; what is
not recorded says so ("none yet", "not recorded") instead of leaving a gap. Sections: model details, intended and
out-of-scope use, training data, evaluation (hold-out and every external validation listed in the version's
``kd.evaluations`` tag), calibration, localisation (the Grad-CAM pointing game) and limitations derived from the figures.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from pipelines.evaluation.calibration import T_RANGE
from pipelines.evaluation.metrics import class_keys
from pipelines.names import Metric, RunTag, VersionTag
from registry.calibrate import MODELS
from registry.report.document import num

CARD_ARTIFACT = "model_card.md"
FORMATS = ("keras", "tflite-float32", "tflite-int8")
POINTING = {
    "pointing_game_student": "KD student (Grad-CAM)",
    "pointing_game_teacher": "teacher (Grad-CAM)",
    "pointing_game_centre": "baseline: image centre",
    "pointing_game_brightest": "baseline: brightest smoothed pixel",
}


@dataclass
class CardFacts:
    """What a card is written from, read once."""

    version: object  # ModelVersion
    promote: Run
    teachers: list[Run]
    trial: Run | None
    search: Run | None
    evaluations: list[Run]
    missing_evaluations: list[str]  # run ids listed in kd.evaluations that the store no longer has
    splits: pd.DataFrame | None  # the teacher run's data/splits.csv

    @property
    def metrics(self) -> dict[str, float]:
        return self.promote.data.metrics

    @property
    def class_names(self) -> list[str]:
        return self.teachers[0].data.params.get("classes", "").split(",")

    def metric(self, key: str) -> float:
        return self.metrics.get(key, math.nan)


def _run(client: MlflowClient, run_id: str | None) -> Run | None:
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def gather_card(version) -> CardFacts:
    """Read the version's promote run, teacher run(s), trial and search runs, external evaluations and splits."""
    client = MlflowClient()
    promote = client.get_run(version.run_id)
    teachers = [client.get_run(run_id) for run_id in version.tags.get(VersionTag.TEACHER_RUN_ID, "").split(",") if run_id]
    trial = _run(client, promote.data.tags.get(RunTag.TRIAL_RUN_ID))
    search = _run(client, trial.data.tags.get("mlflow.parentRunId")) if trial else None
    listed = [run_id for run_id in version.tags.get(VersionTag.EVALUATIONS, "").split(",") if run_id.strip()]
    found = {run_id: _run(client, run_id.strip()) for run_id in listed}
    splits = None
    if teachers:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = mlflow.artifacts.download_artifacts(run_id=teachers[0].info.run_id, artifact_path="data/splits.csv", dst_path=tmp)
                splits = pd.read_csv(path, dtype=str, keep_default_na=False)
            except Exception:  # MLflow raises several types for a missing artifact
                splits = None
    return CardFacts(
        version,
        promote,
        teachers,
        trial,
        search,
        [run for run in found.values() if run is not None],
        [run_id for run_id, run in found.items() if run is None],
        splits,
    )


def interval(metrics: dict[str, float], key: str) -> str:
    """``value [low, high]`` of a metric with its logged 95 % interval, or the value alone."""
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    text = num(metrics.get(key))
    return text if low is None or high is None else f"{text} [{num(low)}, {num(high)}]"


def summary(f: CardFacts) -> list[str]:
    """The card's first lines: what the version is, how well it does and how far its probabilities can be trusted."""
    v, m = f.version, f.metrics
    kd = (
        f"T = {_setting(f.trial.data.params, 'temperature')}, alpha = {_setting(f.trial.data.params, 'alpha')}"
        if f.trial
        else "KD settings not recorded"
    )
    # alpha = 1 (the search's no-KD anchor trial can win): hard labels only, whatever the temperature says
    alpha = _float(f.trial.data.params.get("alpha")) if f.trial else None
    kind = "student" if alpha is None else "student trained without KD (alpha = 1)" if alpha == 1.0 else "KD student"
    trained_on, served = v.tags.get(VersionTag.TRAINED_ON, "data not recorded"), v.tags.get(VersionTag.SERVING_FORMAT, "keras")
    others = f"teacher {num(m.get('holdout_teacher_f1'))}, no-KD {num(m.get('holdout_no_kd_f1'))}"
    lines = [
        f"# Model card: {v.name} v{v.version}",
        "",
        f"Brain-MRI slice classifier ({', '.join(f.class_names)}): a {kind} of {int(f.metric(Metric.STUDENT_PARAMS)):,} parameters "
        f"({kd}), trained on {trained_on}, served as {served}.",
        f"k-fold F1 {num(m.get(Metric.KFOLD_F1_MEAN))} ± {num(m.get(Metric.KFOLD_F1_STD))}; hold-out F1 "
        f"{num(_float(v.tags.get(VersionTag.HOLDOUT_F1)))}, macro-F1 {interval(m, 'holdout_student_f1_macro')} ({others}).",
    ]
    if Metric.TEMPERATURE in m:
        lines.append(
            f"Probabilities calibrated by temperature T = {num(m[Metric.TEMPERATURE])}: hold-out ECE {num(m.get('holdout_student_ece'))} "
            f"as trained, {num(m.get(Metric.ECE))} as served."
        )
    lines.append(
        f"External validations: {len(f.evaluations)}"
        + (f" (latest macro-F1 {interval(f.evaluations[-1].data.metrics, 'f1_macro')})." if f.evaluations else " (none yet).")
    )
    lines.append(f"Generated from the tracking store (`kd card`); the full card is the artifact `{CARD_ARTIFACT}` of run {v.run_id}.")
    return lines


def _float(text: str | None) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _setting(params: dict[str, str], name: str) -> str:
    """A searched number as a reader wants it (``1.123``, not the logged ``1.1230074742268845``); ``?`` when not logged."""
    value = _float(params.get(name))
    return "?" if value is None else f"{value:.4g}"


def model_details(f: CardFacts) -> list[str]:
    v, m = f.version, f.metrics
    params = f.trial.data.params if f.trial else {}
    search = f.search.data.params if f.search else {}
    teachers = "; ".join(
        f"{run.data.params.get('teacher_arch', '?')} ({int(run.data.metrics.get(Metric.TEACHER_PARAMS, 0)):,} parameters, "
        f"run {run.info.run_id})"
        for run in f.teachers
    )
    lines = [
        "## Model details",
        "",
        f"- Student: a CNN of width {params.get('width', '?')} x depth {params.get('depth', '?')} "
        f"(normalisation {search.get('student_norm', '?')}), {int(f.metric(Metric.STUDENT_PARAMS)):,} parameters, input "
        f"{v.tags.get(VersionTag.IMAGE_SIZE, '?')} x {v.tags.get(VersionTag.IMAGE_SIZE, '?')} px, one channel.",
        f"- Teacher{'s (ensemble, mean logits)' if len(f.teachers) > 1 else ''}: {teachers or 'not recorded'}.",
        f"- Knowledge distillation: temperature {_setting(params, 'temperature')}, alpha {_setting(params, 'alpha')}, learning rate "
        f"{_setting(params, 'learning_rate')}, kd_mode {search.get('kd_mode', '?')}, teacher_mode {search.get('teacher_mode', '?')}; "
        f"chosen by study {v.tags.get(VersionTag.STUDY, '?')!r}, trial {v.tags.get(VersionTag.TRIAL, '?')}.",
        f"- Code: commit {v.tags.get(VersionTag.CODE_VERSION, 'not recorded')}, fingerprint "
        f"{f.promote.data.tags.get(RunTag.CODE, 'not recorded')[:12]}; INT8 export {v.tags.get(VersionTag.INT8, 'not recorded')}.",
        f"- Registered {pd.Timestamp(v.creation_timestamp, unit='ms'):%Y-%m-%d %H:%M} UTC from promote run {v.run_id}.",
        "",
        "| format | served | hold-out F1 | batch-1 p50 latency (ms) |",
        "| --- | --- | --- | --- |",
    ]
    served = v.tags.get(VersionTag.SERVING_FORMAT, "keras")
    for name in FORMATS:
        if Metric.serving_f1(name) in m:
            f1, p50 = num(m[Metric.serving_f1(name)]), num(m.get(Metric.serving_p50_ms(name)), 3)
            lines.append(f"| {name} | {'yes' if name == served else 'no'} | {f1} | {p50} |")
    return lines


def intended_use(f: CardFacts) -> list[str]:
    size = f.version.tags.get(VersionTag.IMAGE_SIZE, "?")
    return [
        "## Intended use",
        "",
        f"- Research and decision support: one 2-D brain-MRI slice in, one of {', '.join(f.class_names)} out, with calibrated class "
        f"probabilities; the slice is resized to {size} x {size} px grey levels.",
        "- A second reader beside a clinician, on scans like those it was trained and validated on (see Evaluation).",
        "",
        "## Out-of-scope use",
        "",
        "- Diagnosis without a clinician; treatment decisions; screening populations it was not evaluated on.",
        f"- Classes other than {', '.join(f.class_names)}; other organs or modalities; 3-D volumes (one slice at a time only).",
        "- Sites, scanners or protocols without an external validation below: measure first (`kd evaluate`).",
    ]


def training_data(f: CardFacts) -> list[str]:
    v = f.version
    teacher = f.teachers[0] if f.teachers else None
    lines = [
        "## Training data",
        "",
        f"- Source: {v.tags.get(VersionTag.TRAINED_ON, 'not recorded')} "
        f"(read from {teacher.data.params.get('data_dir') or 'the embedded set'})."
        if teacher
        else "- Source: not recorded.",
        f"- Data digest: {v.tags.get(VersionTag.DATA_DIGEST, 'not recorded')}.",
    ]
    duplicates = teacher.data.metrics.get(Metric.HOLDOUT_DUPLICATES) if teacher else None
    lines.append(
        f"- Duplicates: {int(duplicates)} hold-out images duplicating training images (identical or perceptually near) were "
        f"{'dropped' if teacher.data.params.get('dedupe', 'drop') == 'drop' else 'handled by dedupe=' + teacher.data.params.get('dedupe')}."
        if duplicates is not None
        else "- Duplicates: the hold-out was split from the same images; near-identical images are grouped so that no group straddles "
        "the training part and the hold-out."
    )
    if f.splits is not None:
        held_out = f.splits["split"] == "test"
        lines += ["", "| class | training images | hold-out images |", "| --- | --- | --- |"]
        for name in f.class_names:
            rows = f.splits["label"] == name
            lines.append(f"| {name} | {int((rows & ~held_out).sum())} | {int((rows & held_out).sum())} |")
        lines.append(f"| total | {int((~held_out).sum())} | {int(held_out.sum())} |")
    return lines


def per_class_rows(metrics: dict[str, float], class_names: list[str], prefix: str = "") -> list[tuple[str, str]]:
    """(label, metric key) of accuracy, macro-F1 and each class's F1 under ``prefix``."""
    rows = [("accuracy", f"{prefix}accuracy"), ("macro-F1", f"{prefix}f1_macro")]
    return rows + [(f"F1 {name}", f"{prefix}f1_{key}") for name, key in zip(class_names, class_keys(class_names))]


def evaluation(f: CardFacts) -> list[str]:
    m = f.metrics
    lines = [
        "## Evaluation",
        "",
        f"### Hold-out split ({int(f.metric('holdout_size'))} images, never trained on)",
        "",
        "| figure | KD student [95% bootstrap CI] | teacher | no-KD student |",
        "| --- | --- | --- | --- |",
    ]
    for label, key in per_class_rows(m, f.class_names):
        others = " | ".join(num(m.get(f"holdout_{who}_{key}")) for who in ("teacher", "no_kd"))
        lines.append(f"| {label} | {interval(m, 'holdout_student_' + key)} | {others} |")
    lines += ["", "### External validations", ""]
    if not f.evaluations:
        lines.append("None yet: run `kd evaluate` on data from another site, then `kd card`.")
    for run in f.evaluations:
        em = run.data.metrics
        lines += [
            f"Run {run.info.run_id} ({pd.Timestamp(run.info.start_time, unit='ms'):%Y-%m-%d}), data "
            f"{run.data.params.get('data_dir', 'not recorded')}, digest {run.data.tags.get(RunTag.DATA_DIGEST, 'not recorded')[:12]}; "
            f"{int(em.get('overlap_with_training', 0))} images overlapping the training data; ECE {num(em.get(Metric.ECE))}, "
            f"Brier {num(em.get(Metric.BRIER))}.",
            "",
            "| figure | value [95% bootstrap CI] |",
            "| --- | --- |",
            *[f"| {label} | {interval(em, key)} |" for label, key in per_class_rows(em, f.class_names)],
            "",
        ]
    if f.missing_evaluations:
        lines.append(f"Listed in `{VersionTag.EVALUATIONS}` but no longer in the store: {', '.join(f.missing_evaluations)}.")
    return lines


def calibration(f: CardFacts) -> list[str]:
    m = f.metrics
    if Metric.TEMPERATURE not in m:
        return ["## Calibration", "", "Not measured: promoted before calibration was logged; promote it again."]
    calibrated = "holdout_student_ece_calibrated" in m
    header = ["model", "temperature", *(f"{name.upper() if name != 'brier' else 'Brier'} as trained" for name in Metric.CALIBRATION)]
    if calibrated:
        header += [f"{name.upper() if name != 'brier' else 'Brier'} calibrated" for name in Metric.CALIBRATION]
    lines = [
        "## Calibration",
        "",
        "One temperature per model, fitted by minimum negative log-likelihood on its out-of-fold validation logits (never the "
        "hold-out); ECE and MCE over 15 equal-width bins of top-label confidence, on the hold-out split. The served model returns "
        f"the KD student's calibrated probabilities (T = {num(m[Metric.TEMPERATURE])}) in every format; labels are unchanged. "
        f"Reliability diagrams: artifact `evaluation/reliability.png` of run {f.version.run_id}.",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
    ]
    for who, title in MODELS.items():
        cells = [title, num(m.get(Metric.temperature(who)))] + [num(m.get(Metric.calibration(who, name))) for name in Metric.CALIBRATION]
        if calibrated:
            cells += [num(m.get(Metric.calibration(who, name, calibrated=True))) for name in Metric.CALIBRATION]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def localisation(f: CardFacts) -> list[str]:
    m = f.metrics
    lines = ["## Localisation (Grad-CAM pointing game)", ""]
    if not any(key in m for key in POINTING):
        return lines + ["None yet: promote with `boxes_dir` (annotated tumour boxes) to measure it."]
    lines += [
        "Fraction of scans whose map peaks inside the tumour box grown by 15 px "
        f"(boxes from {f.promote.data.params.get('boxes_dir', 'not recorded')}).",
        "",
        "| method | pointing game |",
        "| --- | --- |",
    ]
    return lines + [f"| {label} | {num(m[key])} |" for key, label in POINTING.items() if key in m]


def limitations(f: CardFacts) -> list[str]:
    """Caveats read off the figures above: the weakest class, the widest interval, overlap found, calibration, KD's gain."""
    m, items = f.metrics, []
    keys = dict(zip(f.class_names, class_keys(f.class_names)))
    per_class = {name: m[f"holdout_student_f1_{key}"] for name, key in keys.items() if f"holdout_student_f1_{key}" in m}
    if per_class:
        weakest = min(per_class, key=per_class.get)
        items.append(f"Weakest class on the hold-out: {weakest} (F1 {num(per_class[weakest])}).")
    widths = {}
    for where, metrics, prefix in [("hold-out", m, "holdout_student_")] + [
        (f"evaluation {r.info.run_id[:8]}", r.data.metrics, "") for r in f.evaluations
    ]:
        for label, key in per_class_rows(metrics, f.class_names, prefix):
            if f"{key}_ci_low" in metrics and f"{key}_ci_high" in metrics:
                widths[(where, label)] = metrics[f"{key}_ci_high"] - metrics[f"{key}_ci_low"]
    if widths:
        (where, label), width = max(widths.items(), key=lambda item: item[1])
        items.append(f"Widest 95 % interval: {label} on the {where}, {num(width)} wide: figures this uncertain need more images.")
    overlap = sum(int(r.data.metrics.get("overlap_with_training", 0)) for r in f.evaluations)
    if f.evaluations:
        items.append(f"Overlap with the training data found in the external validations: {overlap} images (dropped unless said otherwise).")
    else:
        items.append("No external validation yet: every figure above comes from the data it was trained on.")
    if Metric.ECE in m:
        items.append(
            f"Calibration error as served: ECE {num(m[Metric.ECE])}, MCE {num(m.get(Metric.MCE))} (largest gap of one confidence bin)."
        )
    low, high = T_RANGE
    for who, title in MODELS.items():
        fitted = m.get(Metric.temperature(who))
        if fitted is not None and not (low * 1.01 < fitted < high * 0.99):
            items.append(
                f"The {title}'s temperature ({num(fitted)}) sits at the end of its search range ({low:g} to {high:g}): its validation "
                "logits say little (a model near chance is flattened towards uniform probabilities)."
            )
    kd, no_kd = m.get("holdout_student_f1"), m.get("holdout_no_kd_f1")
    if kd is not None and no_kd is not None and no_kd > kd:
        items.append(f"Its no-KD twin did better on the hold-out (F1 {num(no_kd)} vs {num(kd)}): distillation did not help here.")
    if "synthetic" in f.version.tags.get(VersionTag.TRAINED_ON, ""):
        items.append("Trained on the embedded synthetic set, not on real scans: not for any clinical use.")
    student, brightest = m.get("pointing_game_student"), m.get("pointing_game_brightest")
    if student is not None and brightest is not None and student < brightest:
        items.append(f"Grad-CAM points at the tumour less often ({num(student)}) than the brightest pixel does ({num(brightest)}).")
    return ["## Limitations and caveats", ""] + [f"- {item}" for item in items]


def render_card(f: CardFacts) -> str:
    sections = [
        summary(f),
        model_details(f),
        intended_use(f),
        training_data(f),
        evaluation(f),
        calibration(f),
        localisation(f),
        limitations(f),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def description(card: str) -> str:
    """The version description: the card's summary, up to its first section."""
    return card.split("\n## ", 1)[0].strip()


def write_card(model_name: str, version: str, out_dir: Path | None = None) -> tuple[str, Path | None]:
    """Generate the card of ``model_name`` v``version``, log it as ``model_card.md`` to the version's run, set its summary
    as the version's description and, given ``out_dir``, write it there too. Returns the card and the local file."""
    client = MlflowClient()
    model_version = client.get_model_version(model_name, version)
    card = render_card(gather_card(model_version))
    client.log_text(model_version.run_id, card, CARD_ARTIFACT)
    client.update_model_version(model_name, version, description=description(card))
    path = None
    if out_dir is not None:
        path = Path(out_dir) / CARD_ARTIFACT
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(card)
    return card, path


def read_card(model_name: str, version: str) -> str:
    """The card last logged for a version."""
    run_id = MlflowClient().get_model_version(model_name, version).run_id
    return mlflow.artifacts.load_text(f"runs:/{run_id}/{CARD_ARTIFACT}")
