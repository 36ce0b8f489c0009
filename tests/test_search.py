"""The Optuna search: real workers (processes) sharing one study in SQLite and in PostgreSQL, a worker killed
with SIGKILL, bad input refused before training, and optuna-dashboard serving the study."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import mlflow
import optuna
import pytest
from kdtest import child_env, tracking_at
from optuna.trial import TrialState

from pipelines.config import STORAGE_URL_ENV, Config, PipelineError
from registry.server import free_port
from search.space import SearchSpace, trial_config
from search.study import PARENT_RUN_ATTR, load_or_create_study, open_storage, open_study
from search.summary import write_plots
from search.tune import run_search

TINY = ["--image_size", "32", "--folds", "2", "--epochs", "2", "--patience", "1", "--batch_size", "16"]


def start_worker(data_dir: Path, storage: str, tracking_uri: str, study: str, n_trials: int, *extra: str) -> subprocess.Popen:
    env = child_env(MLFLOW_TRACKING_URI=tracking_uri)
    command = [
        sys.executable,
        "-m",
        "kd",
        "search",
        "--data_dir",
        str(data_dir),
        "--storage",
        storage,
        "--study_name",
        study,
        "--n_trials",
        str(n_trials),
        "--experiment_name",
        "search-test",
        *TINY,
        *extra,
    ]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(worker: subprocess.Popen, timeout: float = 600) -> str:
    output, _ = worker.communicate(timeout=timeout)
    assert worker.returncode == 0, output[-4000:]
    return output


def check_study(storage: str, tracking_uri: str, study_name: str, n_trials: int) -> optuna.Study:
    """Exactly n finished trials, nothing RUNNING, unique numbers, and trial <-> MLflow run linked both ways."""
    study = optuna.load_study(study_name=study_name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == n_trials
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert len({t.number for t in trials}) == len(trials)

    client = mlflow.MlflowClient(tracking_uri)
    parent = study.user_attrs[PARENT_RUN_ATTR]
    trial_runs = client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.`optuna.study` = '{study_name}' and tags.`kd.step` = 'trial'"
    )
    assert len(trial_runs) == len([t for t in trials if "mlflow_run_id" in t.user_attrs])
    by_id = {run.info.run_id: run for run in trial_runs}
    for trial in finished:
        run = by_id[trial.user_attrs["mlflow_run_id"]]
        assert run.data.tags["optuna.trial_number"] == str(trial.number)
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.data.tags["optuna.state"] == trial.state.name
        assert run.info.status != "RUNNING"
        if trial.state == TrialState.COMPLETE:
            assert run.data.metrics["f1_mean"] == pytest.approx(trial.value)
            assert len(trial.user_attrs["fold_f1"]) == 2 and trial.user_attrs["student_params"] > 0 and trial.user_attrs["latency_ms"] > 0
    teachers = client.search_runs(
        [client.get_run(parent).info.experiment_id], "tags.`kd.step` = 'teacher' and tags.`kd.outcome` = 'trained'"
    )
    assert len(teachers) == 1, "the teachers are trained once, before the first trial, and shared"
    artifacts = {a.path for a in client.list_artifacts(parent, "search")}
    assert {"search/trials.csv", "search/optimization_history.png", "search/best_trial.json"} <= artifacts
    return study


def run_workers(count: int, data_dir: Path, storage: str, tracking_uri: str) -> optuna.Study:
    workers = [start_worker(data_dir, storage, tracking_uri, "shared", 4) for _ in range(count)]
    for worker in workers:
        finish(worker)
    return check_study(storage, tracking_uri, "shared", 4)


def runs_left_running(tracking_uri: str) -> int:
    client = mlflow.MlflowClient(tracking_uri)
    return len(client.search_runs([e.experiment_id for e in client.search_experiments()], "attributes.status = 'RUNNING'"))


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(mri_subset, tmp_path):
    run_workers(2, mri_subset, f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.mark.slow
@pytest.mark.postgres
def test_four_workers_share_one_postgresql_study(mri_subset, postgres_databases, reliability):
    # Optuna and MLflow each keep an alembic_version table: one database each.
    storage, tracking_uri = postgres_databases(), postgres_databases()
    study = run_workers(4, mri_subset, storage, tracking_uri)
    assert runs_left_running(tracking_uri) == 0
    reliability.fault(
        "four search workers started together on one PostgreSQL study of 4 trials",
        f"{len(study.trials)} trials made, 4 finished, numbers unique, teachers trained once",
    )
    reliability.lost("trials", 0, "four workers on one study: exactly n_trials finished, none left RUNNING")


def test_sharing_the_mlflow_database_with_optuna_is_refused(tmp_path):
    with tracking_at(f"sqlite:///{tmp_path / 'same.db'}"):
        with pytest.raises(PipelineError, match="separate databases"):
            open_storage(_cfg(tmp_path, storage=f"sqlite:///{tmp_path / 'same.db'}"))


@pytest.mark.slow
@pytest.mark.postgres
def test_a_killed_worker_leaves_the_study_consistent(mri_subset, postgres_databases, reliability):
    storage, tracking_uri = postgres_databases(), postgres_databases()
    beat = ["--heartbeat_interval", "1", "--grace_period", "4"]
    victim = start_worker(mri_subset, storage, tracking_uri, "killed", 2, *beat)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            running = optuna.load_study(study_name="killed", storage=storage).get_trials(states=(TrialState.RUNNING,))
        except KeyError:  # the study does not exist yet
            continue
        if running and "mlflow_run_id" in running[0].user_attrs:
            # Frozen at once: a tiny trial trains in about a second now, and CI saw one finish during a 2 s wait.
            victim.send_signal(signal.SIGSTOP)
            break
    else:
        victim.kill()
        pytest.fail("the worker never started a trial")
    still = optuna.load_study(study_name="killed", storage=storage).get_trials(states=(TrialState.RUNNING,))
    assert [t.number for t in still] == [running[0].number], "the trial finished in the milliseconds between the look and the stop"
    victim.send_signal(signal.SIGKILL)
    victim.communicate()

    finish(start_worker(mri_subset, storage, tracking_uri, "killed", 2, *beat))
    study = check_study(storage, tracking_uri, "killed", 2)
    [dead] = [t for t in study.trials if t.state == TrialState.FAIL]
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retried) == 1 and retried[0].params == dead.params, "the dead trial is retried with its parameters"
    dead_run = mlflow.MlflowClient(tracking_uri).get_run(dead.user_attrs["mlflow_run_id"])
    assert dead_run.info.status == "KILLED", "the dead trial's MLflow run is closed, not left RUNNING"
    assert runs_left_running(tracking_uri) == 0
    reliability.fault(
        "kill -9 of a search worker mid-trial (PostgreSQL study), then a restart",
        f"dead trial {dead.number} retried once with its parameters; its run KILLED",
    )
    reliability.lost("trials", 0, "killed worker: the study holds exactly n_trials finished trials")
    reliability.lost("runs", 0, "killed worker: no run left RUNNING")


def _run_queued_trials(study: optuna.Study) -> None:
    """Finish the trials a new study starts with, so the next trial is the sampler's own proposal."""
    for _ in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        study.tell(study.ask(), 0.5)


def _cfg(tmp_path: Path, **changes) -> Config:
    defaults = {
        "data_dir": "/nonexistent-never-read",
        "storage": f"sqlite:///{tmp_path / 'optuna.db'}",
        "cache_dir": str(tmp_path / "cache"),
    }
    return Config(**{**defaults, **changes})


def _tiny_search(tmp_path: Path, data_dir: Path, **changes) -> Config:
    """A search on real scans that trains in seconds: 32 px, 2 folds, 2 epochs."""
    tiny = {"data_dir": str(data_dir), "image_size": 32, "folds": 2, "epochs": 2, "patience": 1, "batch_size": 16}
    return _cfg(tmp_path, **{**tiny, **changes})


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"storage": "redis://localhost/0"}, "unknown URL scheme 'redis'"),
        ({"storage": "postgresql://nobody@127.0.0.1:1/none"}, "cannot connect"),
        ({"temperature_range": "20,1"}, "temperature_range='20,1': empty range"),
        ({"alpha_range": "0,1.5"}, "alpha_range"),
        ({"learning_rate_range": "0,1e-3"}, "log-scale range must be positive"),
        ({"width_range": "8"}, "width_range='8': give two numbers"),
    ],
)
def test_bad_search_input_fails_before_any_training(tmp_path, changes, match):
    with pytest.raises(PipelineError, match=match) as error:
        run_search(_cfg(tmp_path, **changes))
    assert "secret" not in str(error.value), "passwords never reach messages"


def test_a_storage_url_from_the_environment_keeps_its_password_out_of_messages(tmp_path, monkeypatch):
    monkeypatch.setenv(STORAGE_URL_ENV, "postgresql://nobody:secret@127.0.0.1:1/none")
    with pytest.raises(PipelineError, match="cannot connect") as error:
        run_search(_cfg(tmp_path, storage=""))
    assert "secret" not in str(error.value) and "nobody:***@" in str(error.value)


def test_n_trials_below_one_is_refused(tmp_path):
    with pytest.raises(PipelineError, match="n_trials=0"):
        _cfg(tmp_path, n_trials=0)


def test_an_existing_study_with_another_direction_is_refused(tmp_path):
    storage = open_storage(_cfg(tmp_path))
    load_or_create_study(_cfg(tmp_path), storage)
    with pytest.raises(PipelineError, match="exists with directions \\['maximize'\\]"):
        load_or_create_study(_cfg(tmp_path, objectives="f1,params"), open_storage(_cfg(tmp_path, objectives="f1,params")))


def test_a_joining_worker_takes_the_study_settings_and_the_seed_makes_suggestions_repeatable(tmp_path):
    creator = _cfg(tmp_path, image_size=48, folds=3)
    study, _ = load_or_create_study(creator, open_storage(creator))
    _, joined = load_or_create_study(_cfg(tmp_path), open_storage(_cfg(tmp_path)))
    assert (joined.image_size, joined.folds, joined.data_dir) == (48, 3, creator.data_dir)

    def first_suggestions(name: str) -> dict:
        cfg = _cfg(tmp_path, study_name=name)
        fresh, _ = load_or_create_study(cfg, open_storage(cfg))
        _run_queued_trials(fresh)
        return SearchSpace.from_config(cfg).suggest(fresh.ask(), cfg)[0]

    assert first_suggestions("a") == first_suggestions("b")


def test_opening_a_study_reads_its_settings_and_never_creates_one(tmp_path):
    with pytest.raises(PipelineError, match="no study 'report-me' in .*; run the search first"):
        open_study(_cfg(tmp_path, study_name="report-me"))
    assert "report-me" not in optuna.get_all_study_names(_cfg(tmp_path).storage_url)
    creator = _cfg(tmp_path, study_name="report-me", image_size=48)
    load_or_create_study(creator, open_storage(creator))
    study, settings = open_study(_cfg(tmp_path, study_name="report-me"))
    assert study.study_name == "report-me" and settings.image_size == 48


def test_a_trial_read_back_from_the_study_gives_the_config_it_was_suggested_with(tmp_path):
    cfg = _cfg(tmp_path)
    study, _ = load_or_create_study(cfg, open_storage(cfg))
    trial = study.ask()
    _, suggested = SearchSpace.from_config(cfg).suggest(trial, cfg)
    study.tell(trial, 0.5)
    assert trial_config(cfg, study.trials[0].params) == suggested
    assert suggested.student_size == f"{study.trials[0].params['width']}x{study.trials[0].params['depth']}"


def test_optuna_dashboard_serves_the_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="dashboard-study", storage=storage, direction="maximize")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
    port = free_port()
    dashboard = subprocess.Popen(
        [str(Path(sys.executable).parent / "optuna-dashboard"), storage, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as response:
                    studies = json.loads(response.read())["study_summaries"]
                break
            except OSError:
                if time.monotonic() > deadline or dashboard.poll() is not None:
                    raise
                time.sleep(0.5)
        [served] = [s for s in studies if s["study_name"] == "dashboard-study"]
        assert served["directions"] == ["maximize"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{served['study_id']}", timeout=5) as response:
            detail = json.loads(response.read())
        assert max(trial["values"][0] for trial in detail["trials"]) == pytest.approx(study.best_value)
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=10)


@pytest.mark.slow
def test_multi_objective_search_reports_the_pareto_front(mri_subset, tmp_path):
    with tracking_at(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        cfg = _tiny_search(tmp_path, mri_subset, n_trials=3, objectives="f1,params", study_name="pareto")
        study = run_search(cfg)
        assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
        complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
        assert len(complete) == 3 and all(t.values[1] == t.user_attrs["student_params"] for t in complete)
        from search.study import best_trial

        best = best_trial(study)
        assert best in study.best_trials and best.values[0] == max(t.values[0] for t in study.best_trials)
        parent = study.user_attrs[PARENT_RUN_ATTR]
        assert "search/pareto_front.png" in {a.path for a in mlflow.MlflowClient().list_artifacts(parent, "search")}


@pytest.mark.slow
def test_a_search_among_two_teachers_distils_each_trial_from_the_teacher_it_chose(mri_subset, tmp_path):
    with tracking_at(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        cfg = _tiny_search(
            tmp_path, mri_subset, n_trials=4, teacher_arch="resnet:S", teacher_choices="resnet:S/hybrid:S", study_name="two-teachers"
        )
        run_search(cfg.replace(n_trials=3))
        # However the sampler chose so far, one more trial takes the other teacher: a worker that joins trains it.
        study = optuna.load_study(study_name="two-teachers", storage=cfg.storage_url)
        study.enqueue_trial({**PUBLISHED, "teacher_arch": "hybrid:S"})
        study = run_search(cfg)
        client = mlflow.MlflowClient()
        trials = sorted(study.trials, key=lambda t: t.number)
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
        assert trials[3].params["teacher_arch"] == "hybrid:S"
        assert [{k: v for k, v in t.params.items() if k != "teacher_arch"} for t in trials[:2]] == [BASELINE, PUBLISHED]
        used = {}
        for trial in trials:
            teacher_run_id = client.get_run(trial.user_attrs["mlflow_run_id"]).data.tags["kd.teacher_run_id"]
            assert client.get_run(teacher_run_id).data.params["teacher_arch"] == trial.params["teacher_arch"]
            used[trial.params["teacher_arch"]] = teacher_run_id
        trained = client.search_runs(
            [e.experiment_id for e in client.search_experiments()], "tags.`kd.step` = 'teacher' and tags.`kd.outcome` = 'trained'"
        )
        assert len(used) == 2 and sorted(run.info.run_id for run in trained) == sorted(used.values()), "each teacher trained once"


def test_joining_workers_do_not_propose_the_same_parameters(tmp_path):
    cfg = _cfg(tmp_path, study_name="joined")
    _run_queued_trials(load_or_create_study(cfg, open_storage(cfg))[0])
    proposals = []
    for _ in range(2):
        joined, joined_cfg = load_or_create_study(cfg, open_storage(cfg))
        proposals.append(SearchSpace.from_config(joined_cfg).suggest(joined.ask(), joined_cfg)[0])
    assert proposals[0] != proposals[1]


def test_the_search_plots_leave_the_process_plotting_style_as_they_found_it(tmp_path):
    import matplotlib

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda trial: trial.suggest_float("alpha", 0, 1) + trial.suggest_float("temperature", 1, 20), n_trials=4)
    before = dict(matplotlib.rcParams)
    write_plots(study, Config(), tmp_path)
    assert {path.name for path in tmp_path.iterdir()} >= {"optimization_history.png", "param_importances.png"}
    # Optuna's plots use the ggplot style; promotion and report figures drawn later in the process must not.
    # (The backend becomes Agg on purpose: the plots are files.)
    changed = {key for key in before if matplotlib.rcParams[key] != before[key]} - {"backend", "backend_fallback"}
    assert changed == set()


BASELINE = {"temperature": 5.0, "alpha": 1.0, "width": 16, "depth": 3, "learning_rate": 3e-3}
PUBLISHED = {**BASELINE, "alpha": 0.5}


def test_a_new_study_starts_with_the_no_kd_baseline_and_the_published_setting_however_many_workers_join(tmp_path):
    """Three workers open the study at once (one creates it, two join): its trials 0 and 1 are queued once."""
    cfg = _cfg(tmp_path, study_name="anchored")
    start = threading.Barrier(3)
    studies: list[optuna.Study] = []

    def worker() -> None:
        storage = open_storage(cfg)
        start.wait()
        studies.append(load_or_create_study(cfg, storage)[0])

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(3)]  # daemon: a hung worker fails the test, not pytest
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    assert len(studies) == 3, "every worker opened the study"
    study = optuna.load_study(study_name="anchored", storage=cfg.storage_url)
    assert [(t.number, t.state) for t in study.trials] == [(0, TrialState.WAITING), (1, TrialState.WAITING)]
    space = SearchSpace.from_config(cfg)
    suggested = [space.suggest(study.ask(), cfg) for _ in range(2)]
    assert [params for params, _ in suggested] == [BASELINE, PUBLISHED]
    assert suggested[0][1].student_size == "16x3" and suggested[0][1].effective_alpha == 1.0


def test_a_study_of_one_trial_queues_only_the_baseline(tmp_path):
    cfg = _cfg(tmp_path, n_trials=1)
    study, _ = load_or_create_study(cfg, open_storage(cfg))
    assert [t.system_attrs["fixed_params"] for t in study.trials] == [BASELINE]


def test_a_starting_value_outside_the_search_ranges_is_moved_into_them_and_said(tmp_path, capsys):
    cfg = _cfg(tmp_path, alpha_range="0,0.8", width_range="10,30", learning_rate_range="1e-4,1e-3")
    assert SearchSpace.from_config(cfg).anchors(cfg) == [
        {**BASELINE, "alpha": 0.8, "width": 18, "learning_rate": 1e-3},
        {**PUBLISHED, "width": 18, "learning_rate": 1e-3},
    ]
    lines = capsys.readouterr().out.splitlines()
    assert "search: the no-KD baseline trial's alpha 1.0 is not in the search's range 0.0..0.8; it starts at 0.8" in lines
    assert "search: the published setting trial's width 16 is not in the search's range 10..30 in steps of 4; it starts at 18" in lines
    assert len(lines) == 5, "one line per moved value: alpha once, width and learning_rate twice"


def test_a_study_among_several_teachers_lets_each_trial_choose_one(tmp_path):
    cfg = _cfg(tmp_path, teacher_choices="resnet/ hybrid:S/resnet:S,hybrid:S")
    space = SearchSpace.from_config(cfg)
    assert space.teachers == ("resnet", "hybrid:S", "resnet:S,hybrid:S")  # the last choice is an ensemble
    study, _ = load_or_create_study(cfg, open_storage(cfg))
    assert [t.system_attrs["fixed_params"]["teacher_arch"] for t in study.trials] == ["resnet", "resnet"]
    _run_queued_trials(study)
    chosen = set()
    for _ in range(20):
        trial = study.ask()
        params, trial_cfg = space.suggest(trial, cfg)
        assert trial_cfg.teacher_arch == params["teacher_arch"] == trial.params["teacher_arch"]
        assert trial_config(cfg, trial.params) == trial_cfg
        chosen.add(trial_cfg.teacher_arch)
        study.tell(trial, 0.5)
    assert chosen == {"resnet", "hybrid:S", "resnet:S,hybrid:S"}


def test_a_study_with_one_teacher_has_no_teacher_parameter(tmp_path):
    cfg = _cfg(tmp_path, teacher_arch="hybrid:L")
    study, _ = load_or_create_study(cfg, open_storage(cfg))
    params, trial_cfg = SearchSpace.from_config(cfg).suggest(study.ask(), cfg)
    assert "teacher_arch" not in params and trial_cfg.teacher_arch == "hybrid:L"


@pytest.mark.parametrize(
    "teacher_choices, match",
    [
        ("resnet//hybrid", "an empty choice"),
        ("resnet/resnet:M", "listed twice"),
        ("resnet/hybrid:X", "sizes are S, M, L"),
        ("resnet/EfficientNetB0:L", "only resnet and hybrid take a size"),
        ("resnet/resnet,,hybrid", "empty ensemble member"),
    ],
)
def test_bad_teacher_choices_are_refused(tmp_path, teacher_choices, match):
    with pytest.raises(PipelineError, match=match):
        _cfg(tmp_path, teacher_choices=teacher_choices)
