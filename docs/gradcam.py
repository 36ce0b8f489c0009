"""Regenerates docs/gradcam.png, the README's Grad-CAM figure: ``make docs-gradcam`` (a few minutes on 2 cores).

Trains a teacher and a KD student (cached teacher logits) on the training part of the real scans in
``../shared/data/brain-mri-yes-no`` (or ``--data_dir``) with the project's own code, picks the hold-out tumour
scan the student is surest of among those both models call a tumour, and draws both Grad-CAM overlays with
:func:`registry.explain.write_overlay`, as ``kd explain`` does for a registered model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import keras
import numpy as np

from pipelines.config import PROJECT_ROOT, Config
from pipelines.data.images import decode_image
from pipelines.evaluation.metrics import model_logits, probabilities
from pipelines.models.builders import build_student, build_teacher
from pipelines.models.distiller import Distiller
from pipelines.steps.prepare import prepare_data
from pipelines.training.fit import class_weights, make_dataset, set_seed
from registry.explain import describe, explain_scan, write_overlay


def train(network: keras.Model, prepared, cfg: Config, teacher_logits: np.ndarray | None) -> keras.Model:
    labels, rows = prepared.dataset.labels, prepared.splits.train
    weights = class_weights(labels[rows], prepared.dataset.num_classes)[labels[rows]]
    set_seed(cfg.seed)
    trainer = Distiller(network, None, cfg.temperature, 1.0 if teacher_logits is None else cfg.alpha, prepared.dataset.binary)
    trainer.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate))
    data = make_dataset(
        prepared.images[rows],
        labels[rows],
        weights,
        None if teacher_logits is None else teacher_logits[rows],
        cfg.batch_size,
        shuffle=True,
        seed=cfg.seed,
    )
    trainer.fit(data, epochs=cfg.epochs, shuffle=False, verbose=0)  # make_dataset shuffles
    return network


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(PROJECT_ROOT.parent / "shared" / "data" / "brain-mri-yes-no"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", default=str(PROJECT_ROOT / "docs" / "gradcam.png"))
    args = parser.parse_args()
    cfg = Config(data_dir=args.data_dir, epochs=args.epochs)
    prepared = prepare_data(cfg)
    dataset, test = prepared.dataset, prepared.splits.test
    teacher = train(build_teacher(cfg.teacher_arch, cfg.image_size, dataset.num_classes, seed=cfg.seed), prepared, cfg, None)
    student = train(
        build_student(cfg.student_size, cfg.image_size, dataset.num_classes, seed=cfg.seed),
        prepared,
        cfg,
        model_logits(teacher, prepared.images),
    )

    positive = dataset.class_names.index(dataset.positive_class)
    student_p, teacher_p = (
        probabilities(model_logits(model, prepared.images[test]), dataset.binary)[:, positive] for model in (student, teacher)
    )
    tumours = [i for i in range(len(test)) if dataset.labels[test[i]] == positive and student_p[i] > 0.5 and teacher_p[i] > 0.5]
    chosen = test[max(tumours, key=lambda i: student_p[i])]
    path = Path(dataset.manifest["path"].iloc[chosen])
    scan = decode_image(path)
    explanations = {who: explain_scan(model, scan, dataset.class_names) for who, model in (("student", student), ("teacher", teacher))}
    label = dataset.class_names[dataset.labels[chosen]]
    title = f"{path.name} (hold-out, label {label})\ntrained on {Path(args.data_dir).name}, data {dataset.digest[:12]}"
    write_overlay(explanations, title, Path(args.out))
    for who, explanation in explanations.items():
        print(describe(explanation, who))
    print(f"docs: {args.out} from {path}")


if __name__ == "__main__":
    main()
