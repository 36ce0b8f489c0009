"""Any data set, end to end (issue 11): `mlflow run . -e main` with tiny settings on every source the loaders
read, each ending with a Production model that `mlflow models serve` answers over HTTP in the source's own format.

The sets are generated from the embedded synthetic generator (lesion positions known), at sizes the older tests
never reached: a given Training/Testing split whose hold-out is larger than one serving batch (256) and leaks
duplicates across the split, BraTS-style ``.h5`` slices, BraTS NIfTI cases, a 4-class set and a CSV manifest.
"""

from __future__ import annotations

import base64
import csv
import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from brats_cases import write_h5_slices, write_nifti_cases
from kdtest import child_env
from mlflow import MlflowClient
from PIL import Image

from pipelines.config import Config
from pipelines.data.images import request_bytes
from pipelines.data.sources import ingest
from pipelines.data.synthetic import generate_synthetic_mri
from registry.model import MAX_BATCH
from registry.server import serve_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
TINY = {"image_size": "32", "folds": "2", "epochs": "1", "patience": "1", "batch_size": "32", "n_trials": "1"}


def synthetic_pool(root: Path, n_images: int, seed: int = 0, image_size: int = 48) -> list[tuple[Path, str]]:
    """``n_images`` synthetic slices as (file, label), in generation order."""
    generate_synthetic_mri(root, n_images=n_images, image_size=image_size, seed=seed)
    with open(root / "lesions.csv", newline="") as handle:
        return [(root / row["file"], row["label"]) for row in csv.DictReader(handle)]


def split_folder_set(root: Path) -> tuple[Path, int]:
    """Training/ (60 images) and Testing/ (270 unique images plus 12 byte-identical copies of training images and
    6 re-encoded ones), so the hold-out stays above one serving batch after the leaked copies are dropped."""
    pool = synthetic_pool(root / "pool", 330, image_size=128)  # re-encoding a real-sized scan keeps it near-identical
    for split, items in (("Training", pool[:60]), ("Testing", pool[60:])):
        for path, label in items:
            (root / "data" / split / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, root / "data" / split / label / path.name)
    for path, label in pool[:12]:
        shutil.copy(path, root / "data" / "Testing" / label / f"copy_{path.name}")
    for path, label in pool[12:18]:
        Image.open(path).save(root / "data" / "Testing" / label / f"reencoded_{path.stem}.jpg", quality=95)
    return root / "data", 18


def csv_manifest_set(root: Path) -> Path:
    """A manifest with relative paths, labels and patient groups (two slices per patient)."""
    pool = synthetic_pool(root / "images", 80, seed=3)
    manifest = root / "images" / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "group"])
        for index, (path, label) in enumerate(pool):
            writer.writerow([path.relative_to(root / "images").as_posix(), label, f"patient_{index // 2}"])
    return manifest


def mlflow_main(tracking_uri: str, storage: str, experiment: str, **params: str) -> subprocess.CompletedProcess:
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "run",
        str(ROOT),
        "-e",
        "main",
        "--env-manager",
        "local",
        "--experiment-name",
        experiment,
    ]
    for name, value in {**TINY, "storage": storage, "study_name": experiment, "model_name": experiment, **params}.items():
        command += ["-P", f"{name}={value}"]
    return subprocess.run(command, env=child_env(MLFLOW_TRACKING_URI=tracking_uri), capture_output=True, text=True, timeout=900)


def ask_served_model(model_name: str, tracking_uri: str, payload: bytes) -> dict:
    """One real request to `mlflow models serve` of the Production version: the first prediction row."""
    server, port = serve_model(f"models:/{model_name}/Production", tracking_uri)
    try:
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(payload).decode()]]}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200
            [prediction] = json.loads(response.read())["predictions"]
            return prediction
    finally:
        server.terminate()
        server.wait(timeout=30)


def run_case(tmp_path: Path, name: str, request_path: str, **params: str) -> tuple[MlflowClient, object, dict]:
    """`main` on the case's data, then the Production version and the served model's answer for one item."""
    tracking_uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'optuna.db'}"
    result = mlflow_main(tracking_uri, storage, name, **params)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"Production model: models:/{name}/Production" in result.stdout
    client = MlflowClient(tracking_uri)
    production = client.get_model_version_by_alias(name, "champion")
    assert production.current_stage == "Production"
    prediction = ask_served_model(name, tracking_uri, request_bytes(request_path))
    probabilities = {key: value for key, value in prediction.items() if key.startswith("prob_")}
    assert prediction["label"] in {key.removeprefix("prob_") for key in probabilities}
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    return client, production, prediction


def test_a_given_split_with_a_holdout_beyond_one_serving_batch_and_leaked_copies_is_promoted_and_served(tmp_path):
    data_dir, leaked = split_folder_set(tmp_path)
    client, production, _ = run_case(
        tmp_path, "split-set", str(next((data_dir / "Testing" / "tumor").glob("synth_*.png"))), data_dir=str(data_dir)
    )
    promote_run = client.get_run(production.run_id)
    prepare_run = client.search_runs([promote_run.info.experiment_id], "tags.`kd.step` = 'prepare'")[0]
    assert prepare_run.data.metrics["holdout_duplicates"] == leaked
    assert promote_run.data.metrics["holdout_size"] == 270 > MAX_BATCH


def test_brats_h5_slices_are_promoted_and_a_served_model_reads_an_h5_slice(tmp_path):
    files = write_h5_slices(tmp_path / "brats", volumes=16, slices=6)
    _, production, _ = run_case(tmp_path, "h5-set", str(next(iter(files))), data_dir=str(tmp_path / "brats"), modality="t1ce")
    assert "(brats, 96 images)" in production.tags["trained_on"]


def test_brats_nifti_cases_are_promoted_and_a_served_model_reads_a_nifti_slice(tmp_path):
    write_nifti_cases(tmp_path / "nifti", cases=12, depth=8)
    first_slice = ingest(Config(data_dir=str(tmp_path / "nifti"), cache_dir=str(tmp_path / "cache"))).manifest["path"].iloc[0]
    _, production, _ = run_case(tmp_path, "nifti-set", first_slice, data_dir=str(tmp_path / "nifti"))
    assert "(nifti, " in production.tags["trained_on"]


def test_a_4_class_synthetic_set_is_promoted_with_per_class_metrics(tmp_path):
    scan = generate_synthetic_mri(tmp_path / "scans", n_images=20, image_size=48, seed=7, classes=4) / "pituitary"
    client, production, prediction = run_case(
        tmp_path, "four-classes", str(next(scan.glob("*.png"))), synthetic_classes="4", synthetic_images="120"
    )
    assert len([key for key in prediction if key.startswith("prob_")]) == 4
    metrics = client.get_run(production.run_id).data.metrics
    assert sum(key.startswith("holdout_student_f1_") for key in metrics) >= 4


def test_a_csv_manifest_with_patient_groups_is_promoted_and_served(tmp_path):
    manifest = csv_manifest_set(tmp_path)
    first = next(csv.DictReader(open(manifest)))["path"]
    run_case(tmp_path, "csv-set", str(manifest.parent / first), data_dir=str(manifest))
