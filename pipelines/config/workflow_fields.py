"""The Config fields of the comparison, the search, the registry, external validation and tracking: what is done
with trained networks."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.config.values import ALL_KEYS, PROJECT_ROOT, SERVING_F1_TOLERANCE


@dataclass
class WorkflowFields:
    """Imbalance and the comparison, search, registry, external validation and tracking."""

    # imbalance (any step) and the comparison (compare)
    imbalance: str = field(
        default="0",
        metadata={
            "reuse": ALL_KEYS,
            "help": (
                "minority:majority ratio r of the training folds: 0 = the data as it is; r >= 1 keeps ceil(majority / r) minority "
                "images in each fold's training rows (validation folds and hold-out untouched); compare takes a comma list (0,4,10)"
            ),
        },
    )
    minority_class: str = field(
        default="",
        metadata={
            "reuse": ALL_KEYS,
            "help": "the class imbalance subsamples and minority metrics are of; empty = the fewest training images",
        },
    )
    teachers: str = field(
        default="resnet:S,hybrid:S",
        metadata={"reuse": ("compare",), "help": "compare: the teachers, a comma list of teacher_arch values (resnet:S,resnet:L,...)"},
    )
    students: str = field(
        default="tiny,small", metadata={"reuse": ("compare",), "help": "compare: the student sizes, a comma list (tiny,small,24x3)"}
    )
    comparison_name: str = field(
        default="kd-comparison", metadata={"reuse": ("compare",), "help": "compare: the comparison's name (its run's kd.comparison tag)"}
    )
    fold: int = field(
        default=-1,
        metadata={"reuse": ("distill",), "help": "train only this fold entry (0-based, up to folds x repeats - 1); -1 = all of them"},
    )
    # search (Optuna)
    n_trials: int = field(
        default=20,
        metadata={
            "reuse": ("search",),
            "help": "finished (complete + pruned) trials the study should end with, over all workers (students over the budget apart)",
        },
    )
    study_name: str = field(default="kd-brain", metadata={"reuse": ("search",), "help": "Optuna study name"})
    storage: str = field(
        default="",
        metadata={"reuse": (), "help": "Optuna RDB storage URL (sqlite:///... or postgresql://...); empty = optuna.db in the project"},
    )
    objectives: str = field(
        default="f1", metadata={"reuse": ("search",), "help": "f1, or f1,params / f1,latency for a multi-objective search"}
    )
    temperature_range: str = field(default="1,20", metadata={"reuse": ("search",), "help": "temperature search range (log scale)"})
    alpha_range: str = field(default="0,1", metadata={"reuse": ("search",), "help": "alpha search range"})
    width_range: str = field(default="8,32", metadata={"reuse": ("search",), "help": "student first-block width range (step 4)"})
    depth_range: str = field(default="2,4", metadata={"reuse": ("search",), "help": "student depth range"})
    learning_rate_range: str = field(default="5e-4,5e-3", metadata={"reuse": ("search",), "help": "learning-rate search range (log scale)"})
    teacher_choices: str = field(
        default="",
        metadata={
            "reuse": ("search",),
            "help": (
                "teachers the search chooses among, separated by '/' (resnet/hybrid:S/resnet,hybrid: a comma list is one "
                "ensemble choice); empty = teacher_arch alone"
            ),
        },
    )
    max_params: int = field(
        default=0,
        metadata={
            "reuse": ("search",),
            "help": (
                "the student's parameter budget: a trial whose student has more is skipped before training and never promoted; 0 = no limit"
            ),
        },
    )
    max_latency_ms: float = field(
        default=0.0,
        metadata={
            "reuse": ("search",),
            "help": (
                "the student's latency budget: median ms of one image through the Keras model on the machine that runs the trial "
                "(machine-dependent: search on the hardware it is for); over it, a trial is skipped before training; 0 = no limit"
            ),
        },
    )
    heartbeat_interval: int = field(default=20, metadata={"reuse": (), "help": "seconds between a running trial's heartbeats"})
    grace_period: int = field(
        default=60, metadata={"reuse": (), "help": "seconds without a heartbeat before a trial counts as dead and is retried"}
    )
    # registry
    model_name: str = field(default="brain-tumor-student", metadata={"reuse": (), "help": "registered model name"})
    margin: float = field(default=0.0, metadata={"reuse": (), "help": "hold-out F1 a new model must beat the champion by to be promoted"})
    force: bool = field(default=False, metadata={"reuse": (), "help": "promote even if the gate refuses"})
    comparison: str = field(
        default="",
        metadata={
            "reuse": (),
            "help": (
                "report: the KD comparison whose tables to include, by run id or name (its newest finished run); empty = the newest "
                "finished comparison on the reported version's data, if any"
            ),
        },
    )
    serving_format: str = field(
        default="auto",
        metadata={
            "reuse": (),
            "help": (
                "how the registered model runs when served: keras, tflite-float32 or tflite-int8; auto = the fastest at batch 1 whose "
                f"hold-out F1 is within {SERVING_F1_TOLERANCE} of the Keras student's"
            ),
        },
    )
    calibration: str = field(
        default="temperature",
        metadata={
            "reuse": (),
            "help": (
                "promote: temperature = divide each model's logits by one temperature fitted (minimum NLL) on its out-of-fold "
                "validation logits, never the hold-out; the served model and every TFLite format then return calibrated "
                "probabilities, labels unchanged; none = the probabilities as trained"
            ),
        },
    )
    # external validation (kd evaluate) and localisation (promote, kd explain)
    class_map: str = field(
        default="",
        metadata={
            "help": (
                "evaluate: rename the data's classes to the model's, data_class:model_class,... (several may map to one, e.g. "
                "glioma:yes,meningioma:yes,notumor:no); the others must match by name"
            ),
            "reuse": (),
        },
    )
    boxes_dir: str = field(
        default="",
        metadata={
            "help": (
                "promote, explain: a folder of tumour scans with YOLO box files (<scan>.txt beside each), for the Grad-CAM pointing "
                "game of student and teacher against the centre and brightest-pixel baselines; empty = none"
            ),
            "reuse": (),
        },
    )
    # tracking
    experiment_name: str = field(default="kd-brain", metadata={"reuse": (), "help": "MLflow experiment"})
    tracking_wait_s: float = field(
        default=300.0,
        metadata={"reuse": (), "help": "after a failure, how long to wait for an absent tracking server to mark the run FAILED"},
    )
    cache_dir: str = field(default=str(PROJECT_ROOT / ".cache"), metadata={"reuse": (), "help": "decoded images and the synthetic set"})
