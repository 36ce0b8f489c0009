"""The report's sentences say what the code did: the student's normalisation read from the trained network, raw
sizes of NIfTI sets read from their volumes (and a missing file named as missing), the search's sampler and pruner
as the search built them (no private Optuna attributes)."""

from __future__ import annotations

from pathlib import Path

import pytest
from brats_cases import write_nifti_cases

from pipelines.config import Config
from pipelines.data.sources import ingest
from pipelines.models.builders import build_student
from registry.report.methods_data import image_size_range
from registry.report.methods_model import block_description


@pytest.mark.parametrize("norm, words", [("batch", "batch normalisation"), ("group", "group normalisation"), ("none", "no normalisation")])
def test_the_methods_describe_the_student_block_with_the_normalisation_it_was_built_with(norm: str, words: str) -> None:
    text = block_description(build_student("tiny", 32, 2, norm=norm))
    assert text == f"3 × 3 convolution, {words}, ReLU, 2 × 2 max-pooling"


def test_the_raw_sizes_of_a_nifti_set_come_from_its_volumes_and_a_missing_file_is_named(tmp_path: Path) -> None:
    write_nifti_cases(tmp_path / "nifti", cases=2, depth=3, size=40)
    rows = ingest(Config(data_dir=str(tmp_path / "nifti"), cache_dir=str(tmp_path / "cache"))).manifest["path"].tolist()
    assert rows and all("#z=" in row for row in rows), "NIfTI rows are slices of volumes"
    assert image_size_range(rows) == "all 40 × 40 px"

    gone = Path(rows[0].split("#")[0])
    gone.unlink()
    assert image_size_range(rows) == f"not available ({gone.name} and perhaps others are no longer at their recorded paths)"
    gone.write_bytes(b"not a volume")
    assert f"{gone.name} could not be read as an image" in image_size_range(rows)


def test_the_search_settings_in_the_methods_are_those_the_search_built_its_study_with(tmp_path: Path) -> None:
    from registry.report.methods import search_settings
    from search.study import load_or_create_study, open_storage

    cfg = Config(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="prose", n_trials=9, cache_dir=str(tmp_path / "cache"))
    study, _ = load_or_create_study(cfg, open_storage(cfg))
    sampler, pruner = search_settings(study)
    assert sampler == "TPESampler (n_startup_trials = 3, multivariate = False)"
    assert pruner == "MedianPruner (n_startup_trials = 2, n_warmup_steps = 1)"
    assert (study.sampler._n_startup_trials, study.pruner._n_warmup_steps) == (3, 1), "the words match the objects built"
