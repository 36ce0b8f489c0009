"""The Config fields of data, optimisation, models and distillation: what trains a network."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.config.values import ALL_KEYS, SOURCE_KEYS, TRAINING_KEYS


@dataclass
class TrainingFields:
    """Data, optimisation, models and distillation."""

    # data
    data_dir: str = field(
        default="",
        metadata={"reuse": SOURCE_KEYS, "help": "image folder, BraTS .h5 folder or CSV manifest; empty = embedded synthetic set"},
    )
    image_size: int = field(default=64, metadata={"reuse": ALL_KEYS, "help": "square input size in pixels"})
    positive_class: str = field(
        default="", metadata={"reuse": ALL_KEYS, "help": "positive class for binary metrics; empty = detect (yes, tumor, ...)"}
    )
    modality: str = field(
        default="flair",
        metadata={
            "reuse": ALL_KEYS,
            "help": "BraTS channel (.h5) or NIfTI file (<case>_<modality>.nii.gz): flair, t1, t1ce, t2 or an index 0-3",
        },
    )
    test_fraction: float = field(
        default=0.2, metadata={"reuse": ALL_KEYS, "help": "stratified hold-out fraction (ignored when the data has its own test split)"}
    )
    folds: int = field(default=5, metadata={"reuse": ALL_KEYS, "help": "stratified group k-fold splits of the training part"})
    repeats: int = field(
        default=1,
        metadata={
            "reuse": ALL_KEYS,
            "help": (
                "repetitions of the k-fold with new seeds (same hold-out): folds x repeats validation folds, numbered "
                "k = repeat x folds + fold, for the corrected resampled t-test of KD vs no-KD"
            ),
        },
    )
    seed: int = field(default=42, metadata={"reuse": ALL_KEYS, "help": "seed for splits, initialisation and augmentation"})
    augment: bool = field(
        default=False,
        metadata={
            "reuse": TRAINING_KEYS,
            "help": (
                "light augmentation (flip, rotation, zoom, shift, contrast); off by default: it lowered the student's F1 on the real set"
            ),
        },
    )
    dedupe: str = field(
        default="drop",
        metadata={
            "reuse": ALL_KEYS,
            "help": (
                "hold-out images that duplicate training images (given Testing/ split), and evaluate's images the version already "
                "saw: drop, keep or error"
            ),
        },
    )
    synthetic_images: int = field(
        default=300, metadata={"reuse": SOURCE_KEYS, "help": "size of the embedded synthetic set when data_dir is empty"}
    )
    synthetic_classes: int = field(
        default=2,
        metadata={
            "reuse": SOURCE_KEYS,
            "help": "classes of the embedded synthetic set: 2 (tumor/normal), 3 (glioma, meningioma, notumor) or 4 (+ pituitary)",
        },
    )
    # optimisation
    epochs: int = field(
        default=60, metadata={"reuse": TRAINING_KEYS, "help": "maximum epochs per fold (early stopping on validation loss)"}
    )
    patience: int = field(default=15, metadata={"reuse": TRAINING_KEYS, "help": "early-stopping patience in epochs"})
    batch_size: int = field(default=16, metadata={"reuse": TRAINING_KEYS, "help": "mini-batch size"})
    lr_scaling: str = field(
        default="sqrt",
        metadata={
            "reuse": TRAINING_KEYS,
            "help": (
                "how learning_rate (given for batches of 16) scales with batch_size: sqrt (the rule for Adam), linear or none "
                "(learning_rate as given)"
            ),
        },
    )
    warmup_epochs: float = field(
        default=0.0, metadata={"reuse": TRAINING_KEYS, "help": "epochs of linear learning-rate warm-up at the start of training"}
    )
    lr_schedule: str = field(
        default="constant",
        metadata={"reuse": TRAINING_KEYS, "help": "after warm-up: constant, or cosine (decay to 0 at the last of epochs)"},
    )
    weight_decay: float = field(default=0.0, metadata={"reuse": TRAINING_KEYS, "help": "decoupled weight decay (AdamW) when > 0; 0 = Adam"})
    parallel_augment: bool = field(
        default=True,
        metadata={"reuse": (), "help": "make the augmented views on every core (the same views as one at a time: stateless)"},
    )
    steps_per_execution: int = field(
        default=1,
        metadata={
            "reuse": (),
            "help": "training steps per call of the compiled step (fewer Python dispatches); per-epoch metrics, early stopping as with 1",
        },
    )
    fold_workers: int = field(
        default=1,
        metadata={
            "reuse": (),
            "help": (
                "folds trained at once, each in its own process with cores / fold_workers threads (same runs and metrics as 1, "
                "within float tolerance)"
            ),
        },
    )
    learning_rate: float = field(default=3e-3, metadata={"reuse": TRAINING_KEYS, "help": "Adam learning rate"})
    precision: str = field(
        default="float32",
        metadata={
            "reuse": TRAINING_KEYS,
            "help": (
                "training arithmetic: float32, or bfloat16 (Keras mixed_bfloat16, float32 weights and logits); saved models are "
                "float32 either way"
            ),
        },
    )
    # models
    teacher_arch: str = field(
        default="resnet",
        metadata={
            "reuse": ("teacher", "distill", "search"),
            "help": (
                "resnet or hybrid (ours; :S, :M or :L: size, default M) or a keras.applications name; a comma list (resnet:L,hybrid:S) "
                "is an ensemble: the student distils from the mean of its members' logits"
            ),
        },
    )
    teacher_seed_offset: int = field(
        default=0,
        metadata={
            "reuse": TRAINING_KEYS,
            "help": (
                "added to seed for the teacher's initialisation, shuffling and augmentation (splits and views keep seed); a repeated "
                "ensemble member (resnet,resnet) adds 1000 per repeat"
            ),
        },
    )
    teacher_weights: str = field(
        default="", metadata={"reuse": TRAINING_KEYS, "help": "local weights file for a keras.applications teacher; empty = random init"}
    )
    teacher_image_size: int = field(
        default=0,
        metadata={
            "reuse": TRAINING_KEYS,
            "help": (
                "the teacher's input size in pixels, 0 = image_size; a larger one lets a high-resolution teacher guide a low-resolution "
                "student through cached logits (keyed by image), at no cost to the student"
            ),
        },
    )
    student_size: str = field(
        default="small", metadata={"reuse": ("distill",), "help": "tiny, small, medium, large or WIDTHxDEPTH, e.g. 24x3"}
    )
    student_norm: str = field(
        default="group",
        metadata={
            "reuse": ("distill", "search"),
            "help": (
                "the student's normalisation: group (GroupNorm, no INT8 kernel: the INT8 export falls back to float around it), batch "
                "(BatchNorm, statistics recomputed on the training images after training, folded into the convolutions for INT8) or "
                "none; batch and none export to an all-integer TFLite graph"
            ),
        },
    )
    qat: bool = field(
        default=False,
        metadata={
            "reuse": ("distill",),
            "help": (
                "quantization-aware training: fine-tune the distilled student with fake-quantized weights (per channel) and activations "
                "under the same KD loss, and keep that model for the INT8 export; needs student_norm=batch or none"
            ),
        },
    )
    # distillation
    temperature: float = field(default=5.0, metadata={"reuse": ("distill", "compare"), "help": "softmax temperature T"})
    alpha: float = field(
        default=0.5, metadata={"reuse": ("distill", "compare"), "help": "weight of the hard-label loss; 1 - alpha weighs the KD term"}
    )
    teacher_mode: str = field(
        default="cached",
        metadata={
            "reuse": ("distill", "search", "compare"),
            "help": "cached (teacher logits computed once) or online (teacher forward pass every step)",
        },
    )
    kd_mode: str = field(
        default="standard",
        metadata={
            "reuse": TRAINING_KEYS,
            "help": (
                "standard: the student's augmented image, the teacher's logits of the plain one (cached); consistent (Beyer et al. 2022): "
                "teacher and student see the same augmented view, always augmented: online, every step's fresh views mixed by mixup; "
                "cached, kd_views fixed views per image without mixup (logits of mixed images cannot be cached)"
            ),
        },
    )
    kd_views: int = field(
        default=8,
        metadata={
            "reuse": TRAINING_KEYS,
            "help": "augmented views per image the teacher's logits are cached for (kd_mode=consistent, cached)",
        },
    )
    no_kd: bool = field(
        default=False, metadata={"reuse": ("distill",), "help": "baseline: train the student on hard labels only (alpha = 1)"}
    )
