# Two commands on a fresh machine: `make run` (set up, then the main job on the embedded data) and
# `make test` (set up, then the test suite). Both build .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# mlflow starts helpers (uvicorn, python) from PATH: the project's environment comes first.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export TF_CPP_MIN_LOG_LEVEL ?= 2

# Light enough for 2 cores in a few minutes; the real-data defaults live in pipelines/config/.
# The study and the MLflow experiment share one name per data set: kd-embedded here, kd-brain for the real scans (README).
STUDY ?= kd-embedded
# max_params: a student budget at least 20x below the default teacher (resnet M: 690,505 parameters on 2 classes, from
# pipelines/models/builders.py; / 20 = 34,525): the search skips larger students before training and promotes one that fits.
# student_norm=batch + qat=true: a student whose INT8 export is all-integer, fine-tuned with fake quantization, so the
# registered model can serve TFLite INT8 (serving_format=auto takes it when its hold-out F1 is within 0.005 of Keras).
RUN_PARAMS ?= -P folds=3 -P epochs=20 -P patience=6 -P n_trials=4 -P max_params=34000 -P student_norm=batch -P qat=true -P study_name=$(STUDY)

.PHONY: venv run test test-fast lint server clean bench bench-smoke docs docs-gradcam

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,docs]"
	touch $@

run: venv
	$(BIN)/mlflow run . -e main --env-manager local --experiment-name $(STUDY) $(RUN_PARAMS)

# Style first (seconds): one tool, ruff, formats and lints (settings in pyproject.toml), then the tests.
# Both cores (pytest-xdist, one test file per worker at a time so a module's fixtures are built once; at most 4 workers:
# each trains with TensorFlow's own threads). PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= auto --maxprocesses 4 --dist loadfile
test: venv lint
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS)

# The edit loop: every test not marked slow (no end-to-end training, servers or real-data runs).
test-fast: venv lint
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -m "not slow"

lint: venv
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# The tracking + registry service. BACKEND: SQLAlchemy URL; ARTIFACTS: folder or s3://bucket/prefix
# (set MLFLOW_S3_ENDPOINT_URL and AWS credentials for S3-compatible stores). AUTH=1: basic-auth logins
# (users in AUTH_DB; the first start needs MLFLOW_AUTH_ADMIN_PASSWORD in the environment).
BACKEND ?= sqlite:///$(CURDIR)/mlflow.db
ARTIFACTS ?= $(CURDIR)/mlartifacts
PORT ?= 5000
AUTH ?=
AUTH_DB ?= sqlite:///$(CURDIR)/mlflow-auth.db
server: venv
	$(BIN)/kd server --backend-store-uri "$(BACKEND)" --artifacts-destination "$(ARTIFACTS)" --port $(PORT) $(if $(AUTH),--auth --auth-database-uri "$(AUTH_DB)")

# Benchmarks (issue 5): its own temporary MLflow store and Optuna database on ../shared/data/brain-mri-yes-no;
# writes benchmarks/results/<date>.json and renders BENCHMARKS.md from it. bench-smoke: the same code, tiny data.
bench: venv
	$(BIN)/python -m benchmarks

# The documentation site in site/ (README as front page, parameter reference generated from the Config); --strict: a
# broken link or a missing page fails the build.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The README's Grad-CAM figure (docs/gradcam.png): a teacher and KD student trained on the real scans, a hold-out tumour.
docs-gradcam: venv
	$(BIN)/python docs/gradcam.py

bench-smoke: venv
	$(BIN)/python -m benchmarks --smoke

# Everything the commands above generate: environment, caches, tracking store, study, lock files, reports.
clean:
	rm -rf $(VENV) .cache mlruns mlartifacts mlflow.db optuna.db .mlflow.db.*.lock .optuna.db.*.lock reports site
