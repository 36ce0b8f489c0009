"""The names of tags and metrics that more than one module, or a tool outside the code, reads: written in one place,
so a writer and its readers cannot drift apart. Values are contracts (reports, dashboards and searches filter on
them): add names, never change a value."""

from __future__ import annotations


class RunTag:
    """Tags on MLflow runs."""

    STEP = "kd.step"  # prepare, teacher, distill, search, trial, promote, main, report
    OUTCOME = "kd.outcome"  # trained, or reused (then REUSED_RUN_ID names the run that was)
    REUSED_RUN_ID = "kd.reused_run_id"
    DATA_DIGEST = "kd.data_digest"
    PARAMS = "kd.params"  # the step's reuse key (its parameters)
    CODE = "kd.code_fingerprint"  # pipelines.fingerprint.code_fingerprint(step) of the process that ran it
    HOST = "kd.host"
    PROCESS = "kd.process"  # pid:start time, to tell a live run from one whose process died
    FAILURE = "kd.failure"
    TEACHER_RUN_ID = "kd.teacher_run_id"
    STUDY = "kd.study"
    TRIAL = "kd.trial"
    TRIAL_RUN_ID = "kd.trial_run_id"
    NO_KD_CV_RUN_ID = "kd.no_kd_cv_run_id"
    SEARCH_PARENT_RUN_ID = "kd.search_parent_run_id"
    BEST_TRIAL = "kd.best_trial"
    BEST_TRIAL_RUN_ID = "kd.best_trial_run_id"
    REGISTERED_VERSION = "kd.registered_version"
    PROMOTED = "kd.promoted"
    GATE = "kd.gate"
    SERVING_FORMAT = "kd.serving_format"  # promote: the format the registered model serves with (keras, tflite-float32, ...)
    NO_KD_TWIN = "kd.no_kd_twin"  # promote: did the KD student's no-KD twin beat it on the hold-out (better, not better, none)
    PRODUCTION_VERSION = "kd.production_version"
    REPORT_RUN_ID = "kd.report_run_id"
    REPORT_OF = "kd.report_of"
    # compare: the comparison run and each of its nested cell runs carry the comparison's name; a cell run also
    # says which cell it is (teacher, student, KD or not, imbalance ratio) and which distill run it stands for.
    COMPARISON = "kd.comparison"
    MINORITY_CLASS = "kd.minority_class"
    CELL_TEACHER = "kd.cell_teacher"  # the teacher_arch of a KD cell; empty for a no-KD cell
    CELL_STUDENT = "kd.cell_student"
    CELL_KD = "kd.cell_kd"  # "true" or "false"
    CELL_IMBALANCE = "kd.cell_imbalance"  # the ratio as given: 0 = the data as it is
    CELL_SOURCE_RUN_ID = "kd.cell_source_run_id"  # the distill run (trained or reused) whose results the cell holds
    # evaluate: the registered version a run evaluated (an external validation; its data in DATA_DIGEST)
    MODEL_NAME = "kd.model_name"
    MODEL_VERSION = "kd.model_version"
    # kd evidence: its name (the comparison's) on the evidence run and on the main run it ran, found by it when run again
    EVIDENCE = "kd.evidence"

    @staticmethod
    def step_run_id(step: str) -> str:
        """The ``main`` run's pointer to the run of one of its steps."""
        return f"kd.{step}_run_id"


class VersionTag:
    """Tags on registered model versions (what ``kd fetch`` prints and the report reads)."""

    STUDY = "study"
    TRIAL = "trial"
    KFOLD_F1_MEAN = "kfold_f1_mean"
    KFOLD_F1_STD = "kfold_f1_std"
    HOLDOUT_F1 = "holdout_f1"
    PARAMS_COUNT = "params_count"
    TEACHER_RUN_ID = "teacher_run_id"
    TEMPERATURE = "temperature"  # what the served model divides its logits by (1 = uncalibrated); also in metadata.json
    DATA_DIGEST = "data_digest"
    CODE_VERSION = "code_version"
    IMAGE_SIZE = "image_size"
    TRAINED_ON = "trained_on"
    SERVING_FORMAT = "serving_format"  # keras, tflite-float32 or tflite-int8: how the version's network runs when served
    INT8 = "int8"  # how its student_int8.tflite was made: quantization-aware (qat=true) or post-training
    EVALUATIONS = "kd.evaluations"  # the run ids of its evaluate runs (external validations), comma-separated, oldest first


class Metric:
    """Metric keys that searches, reports and outside tools read."""

    F1_MEAN = "f1_mean"
    F1_STD = "f1_std"
    KFOLD_F1_MEAN = "kfold_f1_mean"  # the promoted trial's, on the promote run (and as a version tag)
    KFOLD_F1_STD = "kfold_f1_std"
    STUDENT_PARAMS = "student_params"
    TEACHER_PARAMS = "teacher_params"
    LATENCY_MS = "latency_ms"
    HOLDOUT_DUPLICATES = "holdout_duplicates"
    F1_MINORITY_MEAN = "f1_minority_mean"  # mean over folds of the minority class's F1
    F1_MINORITY_STD = "f1_minority_std"
    RECALL_MINORITY_MEAN = "recall_minority_mean"
    # a comparison cell: mean validation rows / mean training rows of its folds (the corrected t-test's n_test / n_train;
    # subsampling the minority shrinks the training rows)
    TEST_TRAIN_RATIO = "test_train_ratio"
    WALL_S = "wall_s"  # kd evidence: the evidence command's own wall time, seconds
    CELLS_TOTAL = "cells_total"
    CELLS_FINISHED = "cells_finished"
    # Calibration (pipelines/evaluation/calibration.py): promote logs the promoted student's hold-out figures as served under these
    # bare keys, evaluate runs theirs; TEMPERATURE is what the served model divides its logits by.
    ECE, MCE, BRIER, NLL, TEMPERATURE = "ece", "mce", "brier", "nll", "temperature"
    CALIBRATION = (ECE, MCE, BRIER, NLL)
    # Quantization-aware training (qat=true): the QAT models' metrics carry this prefix (qat_f1_mean, qat_f1_fold_<k>, ...).
    QAT_PREFIX = "qat_"
    QAT_F1_MEAN = "qat_f1_mean"
    HOLDOUT_QAT_F1 = "holdout_qat_f1"  # promote: the QAT model's (fake-quantized Keras) hold-out F1
    # evaluate: images of the evaluated data the version had already seen (identical or near-identical to its data set's)
    OVERLAP_WITH_TRAINING = "overlap_with_training"
    # promote (boxes_dir) and kd explain --boxes_dir: fraction of box-annotated tumour scans whose Grad-CAM peak (or a
    # baseline's point) lies in the box grown by the tolerance (registry.pointing)
    POINTING_GAME_PREFIX = "pointing_game_"

    @staticmethod
    def wall_s(step: str) -> str:
        """``main``: the wall time of one of its steps (``teacher_wall_s``), or of the whole chain (``main_wall_s``), seconds."""
        return f"{step}_wall_s"

    @staticmethod
    def serving_f1(serving_format: str) -> str:
        """Promote: hold-out F1 of the student run in a serving format (``serving_tflite_int8_f1``)."""
        return f"serving_{serving_format.replace('-', '_')}_f1"

    @staticmethod
    def serving_p50_ms(serving_format: str) -> str:
        """Promote: batch-1 p50 latency of the student's network in a serving format, in milliseconds."""
        return f"serving_{serving_format.replace('-', '_')}_p50_ms"

    @staticmethod
    def fold_f1(k: int) -> str:
        """Validation F1 of fold entry ``k``."""
        return f"f1_fold_{k}"

    @staticmethod
    def minority_fold_f1(k: int) -> str:
        """Validation F1 of the minority class in fold entry ``k``."""
        return f"f1_minority_fold_{k}"

    @staticmethod
    def minority_fold_recall(k: int) -> str:
        """Validation recall of the minority class in fold entry ``k``."""
        return f"recall_minority_fold_{k}"

    @staticmethod
    def calibration(who: str, name: str, calibrated: bool = False) -> str:
        """Promote: a model's (teacher, student, no_kd) hold-out ``ece``/``mce``/``brier``/``nll``, as trained or calibrated."""
        return f"holdout_{who}_{name}" + ("_calibrated" if calibrated else "")

    @staticmethod
    def temperature(who: str) -> str:
        """Promote: the temperature fitted for a model (teacher, student, no_kd) on its out-of-fold logits."""
        return f"{who}_temperature"
