"""Splits: the hold-out test split and stratified group k-fold on the rest, repeated with new seeds.

Groups (patients, volumes, identical files) never straddle two parts, and near-identical images (by
:func:`perceptual_hashes` of the preprocessed images) join one group, so duplicates stay on one side of every split;
a given test split (``Testing/``) is checked against the training images instead (:func:`holdout_duplicates`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from PIL import Image
from scipy.fft import dctn
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold

from pipelines.config import DEDUPE_MODES, PipelineError
from pipelines.data.files import shown
from pipelines.data.sources import Dataset

# Near-duplicates (see perceptual_hashes): hash of the 12x12 lowest DCT frequencies of the preprocessed image at
# 32x32, and the largest Hamming distance (of its 143 bits) that still counts as the same scan. On the real yes/no
# set at 64 px, re-saved copies of one scan are at most 8 apart and two different scans at least 22, and JPEG
# re-encodes and 0.9x-1.1x rescaled copies fall within 16 (tests/test_splits.py measures all three, at 32 px).
HASH_SIDE, HASH_FREQUENCIES, NEAR_DUPLICATE_BITS = 32, 12, 16


@dataclass(frozen=True)
class Splits:
    """Row indices into the manifest: a hold-out test set and (train, validation) folds of the rest.

    ``folds`` holds ``repeats`` k-fold partitions one after the other: entry k = r * (folds per repeat) + f is
    fold f of repeat r, so code that iterates over the entries sees every (repeat, fold) once.
    """

    test: np.ndarray
    folds: list[tuple[np.ndarray, np.ndarray]]
    repeats: int = 1
    # Rows of a given hold-out split that duplicate training rows and were left out of every part (dedupe=drop).
    dropped: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    # Those duplicates (test_path, train_path, kind, distance), indexed by hold-out row; None: no given split to check.
    duplicates: pd.DataFrame | None = None
    # The group each row was split by (near-duplicates joined, see duplicate_groups); None: the manifest's groups.
    groups: np.ndarray | None = None
    # The all-data models' training rows when they are not every non-test row (subsample_minority); None: every one.
    all_train: np.ndarray | None = None

    @property
    def train(self) -> np.ndarray:
        """The rows the all-data models train on: every non-test row, or the subsampled ones (:func:`subsample_minority`)."""
        if self.all_train is not None:
            return self.all_train
        return np.sort(np.concatenate([self.folds[0][0], self.folds[0][1]]))

    def table(self, dataset: Dataset) -> pd.DataFrame:
        """One row per image with the group it was split by and its assignment (``test``, ``fold_<k>`` or ``dropped``), for logging.

        Column ``split`` is the first repeat's assignment; with more repeats, ``split_repeat_<r>`` is repeat r's (its
        folds numbered k = r * folds + f, as their metrics ``f1_fold_<k>``)."""
        frame = dataset.manifest[["path", "label", "group", "sha256"]].copy()
        if self.groups is not None:
            frame["group"] = self.groups
        per_repeat = len(self.folds) // self.repeats
        for r in range(self.repeats):
            assignment = np.empty(len(dataset.manifest), dtype=object)
            assignment[self.test] = "test"
            assignment[self.dropped] = "dropped"
            for k in range(r * per_repeat, (r + 1) * per_repeat):
                assignment[self.folds[k][1]] = f"fold_{k}"
            frame["split" if r == 0 else f"split_repeat_{r}"] = assignment
        return frame


def perceptual_hashes(images: np.ndarray) -> np.ndarray:
    """A perceptual hash per preprocessed image ``(N, S, S, 1)``: ``(N, 143)`` bits (pHash).

    Each image (already cropped to the head, squared and normalised) is resized to 32x32; of its 2-D DCT the
    12x12 lowest frequencies but the constant one are kept, and each bit says whether that coefficient is
    above their median. Low frequencies survive JPEG re-encoding and small rescaling, while different scans
    differ in them (the thresholds are in ``NEAR_DUPLICATE_BITS``). A plain 8x8 difference hash was measured
    too and rejected: the flat background of MRIs makes its bits noise, so different scans were 1 bit apart.
    """
    hashes = []
    for image in images:
        small = np.asarray(
            Image.fromarray(image[..., 0], mode="F").resize((HASH_SIDE, HASH_SIDE), Image.Resampling.BILINEAR), dtype=np.float64
        )
        low = dctn(small, norm="ortho")[:HASH_FREQUENCIES, :HASH_FREQUENCIES].reshape(-1)[1:]
        hashes.append(low > np.median(low))
    return np.asarray(hashes, dtype=bool).reshape(len(images), HASH_FREQUENCIES**2 - 1)


def _close_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(i, j, distance)`` for every hash ``a[i]`` within ``NEAR_DUPLICATE_BITS`` of ``b[j]``, computed in row
    blocks so memory stays bounded for tens of thousands of images."""
    from pipelines.batches import in_batches

    ones_b, zeros_b = b.astype(np.float32).T, (~b).astype(np.float32).T

    def block(rows: np.ndarray) -> np.ndarray:
        block_a = a[rows].astype(np.float32)
        distance = np.rint(block_a @ zeros_b + (1 - block_a) @ ones_b).astype(np.int64)  # Hamming: bits that differ
        i, j = np.nonzero(distance <= NEAR_DUPLICATE_BITS)
        return np.stack([rows[i], j, distance[i, j]], axis=1)

    return in_batches(block, np.arange(len(a)), 1024) if len(a) else np.empty((0, 3), dtype=np.int64)


def duplicate_groups(dataset: Dataset, hashes: np.ndarray) -> np.ndarray:
    """The manifest's groups with near-duplicates joined: rows connected by identical groups or by hashes within
    ``NEAR_DUPLICATE_BITS`` (transitively) share one group, named by its first member's group."""
    groups = dataset.manifest["group"].to_numpy()
    codes = pd.factorize(groups)[0]
    pairs = _close_pairs(hashes, hashes)
    n = len(groups)
    # One node per row and per group: a row is linked to its group and to its near-duplicates.
    edges = np.concatenate([np.stack([np.arange(n), n + codes], axis=1), pairs[:, :2]])
    _, component = connected_components(
        coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n + codes.max() + 1,) * 2), directed=False
    )
    first = pd.Series(np.arange(n)).groupby(component[:n]).transform("min").to_numpy()
    return groups[first]


def closest_matches(query_sha: np.ndarray, query_hashes: np.ndarray, ref_sha: np.ndarray, ref_hashes: np.ndarray) -> pd.DataFrame:
    """Query images that duplicate a reference image: one row per such query row with its closest reference row.

    ``kind`` is ``identical`` (same sha256, distance 0) or ``near`` (perceptual hashes within ``NEAR_DUPLICATE_BITS``;
    ``distance`` in bits). Identical files count whatever their hashes (a reference without hashes: rows of all-False
    bits are never compared, ``hashed`` below). Columns ``query``, ``ref`` (row positions), ``kind``, ``distance``.
    """
    hashed = ref_hashes.any(axis=1)  # a real hash has about half its bits set; all-False marks "no hash known"
    pairs = _close_pairs(query_hashes, ref_hashes[hashed])
    pairs[:, 1] = np.flatnonzero(hashed)[pairs[:, 1]] if len(pairs) else pairs[:, 1]
    same = pd.DataFrame({"sha": query_sha, "query": np.arange(len(query_sha))}).merge(
        pd.DataFrame({"sha": ref_sha, "ref": np.arange(len(ref_sha))}), on="sha"
    )
    pairs = np.concatenate([pairs, np.stack([same["query"], same["ref"], np.zeros(len(same), np.int64)], axis=1)]).astype(np.int64)
    query, ref, distance = pairs[:, 0], pairs[:, 1], pairs[:, 2]
    identical = query_sha[query] == ref_sha[ref]
    # Per query row its closest reference image, an identical file first: the first pair of each row after sorting.
    order = np.lexsort((~identical, distance, query))
    _, first = np.unique(query[order], return_index=True)
    best = order[first]
    return pd.DataFrame(
        {"query": query[best], "ref": ref[best], "kind": np.where(identical[best], "identical", "near"), "distance": distance[best]}
    )


def holdout_duplicates(dataset: Dataset, hashes: np.ndarray, test: np.ndarray) -> pd.DataFrame:
    """Hold-out rows that duplicate a training row: one row each with its closest training image (:func:`closest_matches`).

    ``kind`` is ``identical`` (same sha256, distance 0) or ``near`` (perceptual hashes within
    ``NEAR_DUPLICATE_BITS``; ``distance`` in bits). Indexed by the hold-out row.
    """
    train = np.setdiff1d(np.arange(len(dataset.manifest)), test)
    paths, sha = dataset.manifest["path"].to_numpy(), dataset.manifest["sha256"].to_numpy()
    found = closest_matches(sha[test], hashes[test], sha[train], hashes[train])
    test_rows, train_rows = test[found["query"].to_numpy()], train[found["ref"].to_numpy()]
    frame = pd.DataFrame(
        {
            "row": test_rows,
            "test_path": paths[test_rows],
            "train_path": paths[train_rows],
            "kind": found["kind"].to_numpy(),
            "distance": found["distance"].to_numpy(),
        }
    )
    return frame.set_index("row")


def hash_text(hashes: np.ndarray) -> list[str]:
    """Perceptual hashes ``(N, bits)`` as hex strings (logged with a version's training manifest)."""
    return [np.packbits(row).tobytes().hex() for row in hashes]


def hash_bits(texts, bits: int = HASH_FREQUENCIES**2 - 1) -> np.ndarray:
    """:func:`hash_text` read back: ``(N, bits)`` booleans; an empty text (no hash known) gives all-False."""
    rows = [np.unpackbits(np.frombuffer(bytes.fromhex(text), np.uint8))[:bits] if text else np.zeros(bits, np.uint8) for text in texts]
    return np.asarray(rows, dtype=bool).reshape(len(rows), bits)


def repeat_seed(seed: int, repeat: int) -> int:
    """The k-fold seed of a repeat: ``seed`` itself for the first (so one repeat splits as before repeats existed),
    then one derived from (seed, repeat) by numpy's SeedSequence, unrelated to the seeds of other repeats or seeds."""
    return seed if repeat == 0 else int(np.random.SeedSequence((seed, repeat)).generate_state(1)[0])


def make_splits(
    dataset: Dataset,
    folds: int,
    test_fraction: float,
    seed: int,
    hashes: np.ndarray | None = None,
    dedupe: str = "drop",
    repeats: int = 1,
) -> Splits:
    """Hold-out test split (the data's own, else stratified by group), then stratified group k-fold, ``repeats`` times.

    Groups (patients, volumes, identical files) never straddle the test split or two folds. Given the images'
    :func:`perceptual_hashes`, near-identical images join one group too (:func:`duplicate_groups`), and a
    given test split (``Testing/``) is checked against the training images (:func:`holdout_duplicates`):
    ``dedupe`` = ``drop`` leaves those hold-out rows out of every part, ``keep`` keeps them in the hold-out,
    ``error`` refuses the data. The hold-out split is made once; each repeat r partitions the rest anew with
    :func:`repeat_seed` (seed, r), its folds appended as entries r * folds + f. Deterministic for a seed.
    """
    if dedupe not in DEDUPE_MODES:
        raise PipelineError(f"dedupe={dedupe!r}: use one of {', '.join(DEDUPE_MODES)}")
    labels, groups = dataset.labels, dataset.manifest["group"].to_numpy()
    if hashes is not None:
        groups = duplicate_groups(dataset, hashes)
    given = dataset.manifest["given_split"].to_numpy()
    duplicates, dropped = None, np.empty(0, dtype=np.int64)
    if (given == "test").any():
        test = np.flatnonzero(given == "test")
        if hashes is not None:
            duplicates = holdout_duplicates(dataset, hashes, test)
            if len(duplicates) and dedupe == "error":
                first = duplicates.iloc[0]
                raise PipelineError(
                    f"{len(duplicates)} hold-out image(s) duplicate training images ({describe_duplicates(duplicates)}), "
                    f"e.g. {shown(first['test_path'])} and {shown(first['train_path'])}; "
                    "remove them from the test folder, or pass dedupe=drop (leave them out) or dedupe=keep"
                )
            if dedupe == "drop":
                dropped = duplicates.index.to_numpy(np.int64)
                test = np.setdiff1d(test, dropped)
                if not len(test):
                    raise PipelineError(
                        f"{dataset.root}: every hold-out image duplicates a training image; give the test folder images of its own"
                    )
    else:
        n_test_splits = max(2, round(1 / test_fraction))
        _check_enough(dataset, np.arange(len(labels)), n_test_splits, "the hold-out split", groups)
        splitter = StratifiedGroupKFold(n_splits=n_test_splits, shuffle=True, random_state=seed)
        _, test = next(splitter.split(np.zeros(len(labels)), labels, groups))
    rest = np.setdiff1d(np.arange(len(labels)), np.concatenate([test, dropped]))
    _check_enough(dataset, rest, folds, f"folds={folds}", groups)
    fold_indices = []
    for r in range(repeats):
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=repeat_seed(seed, r))
        fold_indices += [(rest[train], rest[val]) for train, val in splitter.split(np.zeros(len(rest)), labels[rest], groups[rest])]
    return Splits(test=np.sort(test), folds=fold_indices, repeats=repeats, dropped=np.sort(dropped), duplicates=duplicates, groups=groups)


def minority_count(labels: np.ndarray, minority: int, ratio: float) -> int:
    """How many ``minority`` rows a training part ``labels`` keeps at ratio 1:``ratio``: ceil(majority / ratio), majority
    being the largest class of the part, or all of them when there are fewer (ratio 0: all of them)."""
    present = int(np.sum(labels == minority))
    if ratio == 0:
        return present
    return min(present, math.ceil(np.bincount(labels).max() / ratio))


def subsample_minority(splits: Splits, labels: np.ndarray, minority: int, ratio: float, seed: int) -> Splits:
    """The splits with each fold's training rows (and the all-data training rows) keeping only :func:`minority_count`
    of their ``minority`` rows; validation rows and the hold-out are the same rows as before. Ratio 0: ``splits`` itself.

    Rows, not groups, are dropped: a training row left out cannot leak into validation, and the count is then exactly
    the ratio's. Which rows stay is drawn from (seed, fold entry): the same for every ratio's run, and a higher ratio
    keeps a subset of a lower one's rows (a prefix of one permutation).
    """
    if ratio == 0:
        return splits

    def kept(rows: np.ndarray, entry: int) -> np.ndarray:
        candidates = rows[labels[rows] == minority]
        order = np.random.default_rng((seed, entry)).permutation(len(candidates))
        keep = candidates[order[: minority_count(labels[rows], minority, ratio)]]
        return np.sort(np.concatenate([rows[labels[rows] != minority], keep]))

    folds = [(kept(train, k), val) for k, (train, val) in enumerate(splits.folds)]
    return replace(splits, folds=folds, all_train=kept(splits.train, len(splits.folds)))


def describe_duplicates(duplicates: pd.DataFrame) -> str:
    """``3 identical, 1 near-identical``: the duplicate table's kinds, counted."""
    counts = duplicates["kind"].value_counts()
    return f"{counts.get('identical', 0)} identical, {counts.get('near', 0)} near-identical within {NEAR_DUPLICATE_BITS} hash bits"


def _check_enough(dataset: Dataset, rows: np.ndarray, n_splits: int, what: str, groups: np.ndarray) -> None:
    frame = dataset.manifest.iloc[rows].assign(group=groups[rows])
    for name in dataset.class_names:
        n_groups = frame.loc[frame["label"] == name, "group"].nunique()
        if n_groups < n_splits:
            raise PipelineError(
                f"class {name!r} has {n_groups} image group(s) where {what} needs at least {n_splits}; add images or lower folds"
            )
