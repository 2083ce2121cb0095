"""Grid sweep of PPO's learning rate x clip coefficient x GAE lambda on Optuna, shared by workers.

    python experiments/sweep.py

runs the 27-point grid learning rate {1e-4, 3e-4, 1e-3} x clip {0.1, 0.2, 0.3} x GAE lambda
{0.9, 0.95, 1.0} of `ppo_cartpole.py` on CartPole-v1, 100k steps per point. Each point is scored
by the mean return of the last 20 training episodes (`charts/episodic_return`), averaged over
`--seeds`. Flags give other grids (`--learning-rate 1e-3 3e-3 --clip-coef 0.1 0.2 --gae-lambda
0.95`), another `--script`, `--total-timesteps`, `--seeds 1 2 3`; flags after `--` go unchanged to
every run of the script (`-- --num-envs 4`).

The study lives in a database, not in this process. `--storage` takes an Optuna storage URL; the
default is the SQLite file `<out>/study.db`. Start the same command on any number of machines with
`--storage postgresql://user:password@host/db` and each worker takes the next grid point nobody has
started; a worker with nothing left to start waits for the others' points, so every worker ends
with the complete table. A later start of the same command resumes the study.

Every trial runs the script as a subprocess, as a user would, with its working directory in
`<out>/trials/<study name>-<trial number>/seed-<seed>/`, and reads the TensorBoard scalars it wrote
there. That folder is new for every trial: trial numbers restart in a new study (another
`--study-name` on the same `--out`, or the same one after its `study.db` was deleted), so where an
earlier study left a folder of that name the trial takes the next free `...-2`, `...-3`.

Killed workers lose nothing:
- each running trial records a heartbeat in the database (`--heartbeat` seconds); a trial whose
  worker died (SIGKILL, power loss) stops beating, and the next worker that looks marks it FAIL and
  queues a copy of it with the same grid point (Optuna's `fail_stale_trials` with
  `RetryHeartbeatStaleTrialCallback`; the copy keeps the point's `grid_id`, so `GridSampler` runs
  that point again rather than a random one), at most `--max-retries` times (a point that kills
  its worker every time, e.g. out of memory, stops being retried);
- a worker stopped with Ctrl-C or SIGTERM marks its trial FAIL and queues the retry itself
  (exit 130 / 143); the next worker, or the same command started again, runs it. These retries
  are the user's choice, not the point's fault: they do not count against `--max-retries`;
- the script dies with its worker (parent-death signal on Linux), so no orphan trains on; on
  macOS and Windows a worker killed outright leaves its script to finish alone;
- a failed trial owed a retry counts as waiting until the retry is queued, and any worker queues
  it: a worker that fails a trial and dies before queueing its retry loses nothing either.
A point whose script fails on its own (a crash, NaN loss) is recorded FAIL with the error and not
retried: running it again would fail again.

When every point is finished, the worker writes to `--out`: `results.csv` and `results.md` (the
full table sorted by score, the knob importance), `heatmap.png` (score over learning rate x clip,
averaged over lambda, annotated cells), and prints the top 3 and bottom 3. `--report-only` writes
them from the database without running anything (e.g. on a machine that ran no trial).

Bad input (an unknown script, an empty grid, a grid value the script refuses, an unreachable
storage, a study of the same name with another grid) gets one line on stderr and exit status 2,
before any study row is written: every grid point first goes through the script's own parser and
validation (its `Args` and `validate`; a script without them gets a 1-iteration run per grid
column).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import itertools
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parent.parent

# The grid knobs: sweep flag = script flag, and the names of the Optuna parameters.
KNOBS = ("learning_rate", "clip_coef", "gae_lambda")
DEFAULT_GRID = {
    "learning_rate": [1e-4, 3e-4, 1e-3],
    "clip_coef": [0.1, 0.2, 0.3],
    "gae_lambda": [0.9, 0.95, 1.0],
}
LAST_EPISODES = 20
SCORE_TAG = "charts/episodic_return"
# GridSampler's system attribute naming a trial's grid point, stored within `study.ask()` (before
# any parameter is suggested) and inherited by a retry.
GRID_ID = "grid_id"
# Our system attribute: how many times a point's worker died under it (the retries it has used).
WORKER_DEATHS = "worker_deaths"
# Our system attribute: the trial was failed because its worker was stopped (Ctrl-C, SIGTERM).
INTERRUPTED = "interrupted"
# How long a trial waits for an older one still inside `ask()` to be given its grid point.
GRID_ID_WAIT_S = 5.0


def flag(knob: str) -> str:
    return "--" + knob.replace("_", "-")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), like the scripts' own errors."""

    def error(self, message: str) -> None:
        fail(f"{message} (see --help)")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = OneLineParser(
        description="Grid sweep of a training script on Optuna; "
        "flags after -- go to every run of the script.",
    )
    parser.add_argument(
        "--script",
        default="ppo_cartpole.py",
        help="training script to sweep (default: %(default)s)",
    )
    for knob, values in DEFAULT_GRID.items():
        parser.add_argument(
            flag(knob),
            nargs="+",
            type=float,
            default=values,
            metavar="V",
            help=f"grid values of {flag(knob)} (default: {' '.join(f'{v:g}' for v in values)})",
        )
    parser.add_argument(
        "--total-timesteps",
        type=int,
        default=100_000,
        help="environment steps per run (default: %(default)s)",
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[1],
        help="seeds per point; the score is their mean (default: 1)",
    )
    parser.add_argument("--study-name", help="Optuna study name (default: <script stem>-grid)")
    parser.add_argument("--out", type=Path, help="output folder (default: sweeps/<study name>)")
    parser.add_argument(
        "--storage",
        default=None,
        help="Optuna storage URL (default: sqlite:///<out>/study.db; postgresql://...)",
    )
    parser.add_argument(
        "--heartbeat",
        type=int,
        default=10,
        help="seconds between a running trial's heartbeats; stale after 2x (default: %(default)s)",
    )
    parser.add_argument(
        "--max-retries",
        type=int,
        default=3,
        help="retries of a point whose worker died; Ctrl-C/SIGTERM requeues are not counted "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="write the outputs from the database and exit"
    )
    args = parser.parse_args(argv)
    args.extra = extra

    script = Path(args.script)
    candidates = [script] if script.is_absolute() else [Path.cwd() / script, ROOT / script]
    found = next((path for path in candidates if path.is_file()), None)
    if found is None or found.suffix != ".py":
        folders = " and ".join(str(candidate.parent) for candidate in candidates)
        fail(f"no training script {args.script} (looked in {folders})")
    args.script = found.resolve()
    for knob in KNOBS:
        values = list(dict.fromkeys(getattr(args, knob)))  # drop repeats, keep the order
        if not all(math.isfinite(value) for value in values):
            fail(f"{flag(knob)} values must be finite numbers, got {values}")
        setattr(args, knob, values)
    if args.total_timesteps <= 0:
        fail(f"--total-timesteps must be positive, got {args.total_timesteps}")
    args.seeds = list(dict.fromkeys(args.seeds))
    if args.heartbeat <= 0:
        fail(f"--heartbeat must be positive, got {args.heartbeat}")
    if args.max_retries < 0:
        fail(f"--max-retries must be >= 0, got {args.max_retries}")
    args.study_name = args.study_name or f"{args.script.stem}-grid"
    args.out = (args.out or Path("sweeps") / args.study_name).resolve()
    args.storage = args.storage or f"sqlite:///{args.out / 'study.db'}"
    return args


def grid_of(args: argparse.Namespace) -> dict[str, list[float]]:
    return {knob: getattr(args, knob) for knob in KNOBS}


def settings_of(args: argparse.Namespace) -> dict:
    """What makes two workers' commands the same sweep; stored on the study, checked on joining."""
    return {
        "script": args.script.name,
        "grid": grid_of(args),
        "total_timesteps": args.total_timesteps,
        "seeds": args.seeds,
        "extra_args": args.extra,
    }


# ---------------------------------------------------------------------------------------------
# Storage: reach it, find or create the study, only after the grid passed the script's checks.


def storage_kwargs(url: str) -> dict:
    if url.startswith("sqlite"):
        # Several workers on one SQLite file wait for each other's write locks instead of failing.
        return {"connect_args": {"timeout": 60}}
    if url.startswith("postgresql"):
        return {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    return {"pool_pre_ping": True}


def shown(url: str) -> str:
    """The URL without its password, for messages."""
    import sqlalchemy

    with contextlib.suppress(Exception):
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    return url


def check_reachable(args: argparse.Namespace) -> None:
    """Connect once with plain SQLAlchemy: a wrong host, port, password or driver fails here."""
    import sqlalchemy

    url = args.storage
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except Exception:
        examples = "sqlite:///study.db, postgresql://user:password@host/db"
        fail(f"{url!r} is not a storage URL (e.g. {examples})")
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        folder = Path(parsed.database).resolve().parent
        if not Path(parsed.database).exists():
            if not folder.is_dir() and folder != args.out:
                fail(f"cannot open storage {url}: folder {folder} does not exist")
            return  # a new SQLite file: nothing to reach, and nothing to create before the checks
    try:
        engine = sqlalchemy.create_engine(url, **storage_kwargs(url))
        with engine.connect():
            pass
        engine.dispose()
    except Exception as error:  # any driver's error: name it in one line
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
        fail(f"cannot reach storage {shown(url)}: {detail}")


def open_storage(args: argparse.Namespace) -> RDBStorage:
    """Optuna's RDB storage with heartbeats, so a dead worker's trial is failed and retried."""
    if getattr(args, "opened_storage", None) is not None:
        return args.opened_storage
    last_error: Exception | None = None
    for attempt in range(5):
        try:
            args.opened_storage = RDBStorage(
                args.storage,
                engine_kwargs=storage_kwargs(args.storage),
                heartbeat_interval=args.heartbeat,
                grace_period=2 * args.heartbeat,
                heartbeat_stale_trial_callback=RetryTrialsOfDeadWorkers(args.max_retries),
            )
            return args.opened_storage
        except Exception as error:  # two workers creating the tables at once: one loses, retries
            last_error = error
            time.sleep(0.5 + attempt)
    fail(f"cannot open storage {shown(args.storage)}: {str(last_error).strip().splitlines()[0]}")
    raise AssertionError  # unreachable


def queue_retry(study: optuna.Study, trial: optuna.trial.FrozenTrial, worker_deaths: int) -> None:
    """Queue a WAITING copy of a failed trial: the same grid point (its `grid_id`), Optuna's
    `failed_trial` and `retry_history`, and the count of worker deaths on the point so far."""
    marked = copy.copy(trial)
    marked.system_attrs = {
        **{key: value for key, value in trial.system_attrs.items() if key != INTERRUPTED},
        "retry_history": list(trial.system_attrs.get("retry_history", [])),  # Optuna appends to it
        WORKER_DEATHS: worker_deaths,
    }
    RetryHeartbeatStaleTrialCallback(max_retry=None)(study, marked)


class RetryTrialsOfDeadWorkers:
    """The storage's stale-trial callback: a trial whose worker died (its heartbeats stopped) is
    queued again, at most `max_retries` times per point. Optuna's own limit would count the whole
    inherited `retry_history`, which the Ctrl-C requeues (`Worker.requeue_interrupted`) extend
    too: after a few of those, one real death would not be retried."""

    def __init__(self, max_retries: int):
        self.max_retries = max_retries

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        worker_deaths = trial.system_attrs.get(WORKER_DEATHS, 0) + 1
        if worker_deaths <= self.max_retries:
            queue_retry(study, trial, worker_deaths)


def existing_study(args: argparse.Namespace) -> optuna.Study | None:
    """The study of this name if it exists, after checking it is the same sweep."""
    if args.storage.startswith("sqlite"):
        import sqlalchemy

        database = sqlalchemy.engine.make_url(args.storage).database
        if database and not Path(database).exists():
            return None
    storage = open_storage(args)
    try:
        sampler = sampler_of(args)
        study = optuna.load_study(study_name=args.study_name, storage=storage, sampler=sampler)
    except KeyError:
        return None
    stored = study.user_attrs.get("settings")
    if stored is not None and stored != settings_of(args):
        differences = ", ".join(key for key in stored if stored[key] != settings_of(args).get(key))
        fail(
            f"study {args.study_name!r} in {shown(args.storage)} is another sweep "
            f"(different {differences}); give another --study-name, or the same flags as its "
            "first worker"
        )
    return study


def sampler_of(args: argparse.Namespace) -> optuna.samplers.GridSampler:
    return optuna.samplers.GridSampler(grid_of(args))


def create_study(args: argparse.Namespace) -> optuna.Study:
    args.out.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=args.study_name,
        storage=open_storage(args),
        sampler=sampler_of(args),
        direction="maximize",
        load_if_exists=True,  # two workers started at once: the second one joins
    )
    study.set_user_attr("settings", settings_of(args))
    return study


# ---------------------------------------------------------------------------------------------
# Running the script.


def script_command(
    args: argparse.Namespace,
    point: dict[str, float],
    seed: int,
    exp_name: str,
    steps: int | None = None,
) -> list[str]:
    knobs = [part for knob, value in point.items() for part in (flag(knob), repr(value))]
    # Every point trains its whole budget, so that all are scored at the same step: a script that
    # would stop once its greedy policy is solved (ppo_cartpole.py) is told not to.
    stops_when_solved = "stop_when_solved" in args.script.read_text()
    whole_budget = ["--no-stop-when-solved"] if stops_when_solved else []
    return [
        str(args.script),
        *knobs,
        "--total-timesteps",
        str(steps or args.total_timesteps),
        "--seed",
        str(seed),
        "--exp-name",
        exp_name,
        *whole_budget,
        *args.extra,
    ]


# On Linux the script runs through this stub so that it gets SIGKILL when its worker dies
# (PR_SET_PDEATHSIG survives exec), even when the worker is SIGKILLed and can clean nothing up.
# Elsewhere there is no such signal, and os.execv on Windows starts a new process and ends the
# stub, which would look like the script's own exit: there the script is started directly, and a
# worker killed outright (not stopped with Ctrl-C) leaves it to finish its run on its own.
DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(137)\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n"
)


def start_script(command: list[str], cwd: Path, stdout, stderr) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("TQDM_MININTERVAL", "10")  # the script's progress bar goes to a log file
    stub = ["-c", DIE_WITH_PARENT, str(os.getpid())] if sys.platform.startswith("linux") else []
    return subprocess.Popen(
        [sys.executable, *stub, *command],
        cwd=cwd,
        env=env,
        stdout=stdout,
        stderr=stderr,
        stdin=subprocess.DEVNULL,
    )


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# Imports the script once (importing it has no side effects) and runs its own parser and
# `validate` on every grid point: exit 0 all accepted, 2 one refused (JSON on stdout), 3 the script
# has no `Args`/`validate` to call.
VALIDATE_POINTS = """
import contextlib, importlib.util, io, json, os, sys
path, points = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, os.path.dirname(path))
spec = importlib.util.spec_from_file_location("swept_script", path)
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
if not hasattr(module, "Args") or not callable(getattr(module, "validate", None)):
    sys.exit(3)
import tyro
for argv in points:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            module.validate(tyro.cli(module.Args, args=argv))
    except SystemExit as error:
        if error.code:
            print(json.dumps({"argv": argv, "message": err.getvalue()}))
            sys.exit(2)
"""


def grid_points(args: argparse.Namespace) -> list[dict[str, float]]:
    """Every point of the grid, as {knob: value}, in the order of the grid's flags."""
    grid = grid_of(args)
    return [dict(zip(KNOBS, values, strict=True)) for values in itertools.product(*grid.values())]


def check_grid(args: argparse.Namespace) -> None:
    """Run the script's own validation on every grid point before any study row exists.

    The script's parser and `validate` run in one subprocess over all points (a second, not a run
    per point). A script without them is checked by running it: one 1-iteration run per column
    of the grid (the i-th value of each knob), in parallel. A refusal is passed on in one line.
    """
    grid = grid_of(args)
    every_run = itertools.product(grid_points(args), args.seeds)
    argvs = [script_command(args, point, seed, "sweep")[1:] for point, seed in every_run]
    with tempfile.TemporaryDirectory(prefix="sweep-check-") as tmp:
        result = subprocess.run(
            [sys.executable, "-c", VALIDATE_POINTS, str(args.script), json.dumps(argvs)],
            cwd=tmp,
            capture_output=True,
            text=True,
        )
        if result.returncode == 0:
            return
        if result.returncode == 2 and result.stdout.strip():
            refused = json.loads(last_line(result.stdout))
            message = last_line(refused["message"]).removeprefix("error: ")
            values = " ".join(refused["argv"][: 2 * len(KNOBS)])
            fail(f"{args.script.name} refuses {values}: {message}")
        if result.returncode != 3:
            reason = last_line(result.stderr)
            fail(f"{args.script.name} cannot be imported to check the grid: {reason}")

        width = max(len(values) for values in grid.values())
        runs = []
        for column in range(width):
            point = {knob: values[min(column, len(values) - 1)] for knob, values in grid.items()}
            cwd = Path(tmp) / str(column)
            cwd.mkdir()
            # One step (one iteration), one evaluation episode, no checkpoint: the checks, briefly.
            command = script_command(args, point, args.seeds[0], "sweep-check", steps=1)
            command += ["--eval-episodes", "1", "--no-save-model"]
            stderr = open(cwd / "stderr.log", "w+")  # noqa: SIM115 (closed below)
            runs.append((point, start_script(command, cwd, subprocess.DEVNULL, stderr), stderr))
        problems = []
        for point, process, stderr in runs:
            code = process.wait()
            stderr.seek(0)
            message = last_line(stderr.read())
            stderr.close()
            if code != 0:
                values = " ".join(f"{flag(knob)} {value:g}" for knob, value in point.items())
                verb = "refuses" if code == 2 else f"fails (exit {code}) with"
                refusal = message.removeprefix("error: ")
                problems.append(f"{args.script.name} {verb} {values}: {refusal}")
        if problems:
            fail(problems[0])


def read_returns(runs_dir: Path) -> list[float]:
    """The training episodes' returns the script logged under runs/, in step order."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    found = []
    for event_file in sorted(runs_dir.rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(event_file)).Load():
            for value in event.summary.value:
                if value.tag != SCORE_TAG:
                    continue
                number = (
                    value.simple_value
                    if value.HasField("simple_value")
                    else float(tensor_util.make_ndarray(value.tensor))
                )
                found.append((event.step, event.wall_time, number))
    return [number for _, _, number in sorted(found)]


def new_trial_folder(args: argparse.Namespace, trial_number: int) -> Path:
    """`<out>/trials/<study name>-<trial number>`, created here, or `...-2`, `...-3` where an
    earlier study of the same name left that folder: the runs read back are this trial's alone."""
    name = f"{re.sub(r'[^A-Za-z0-9._-]', '_', args.study_name)}-{trial_number:04d}"
    (args.out / "trials").mkdir(parents=True, exist_ok=True)
    for attempt in itertools.count(1):
        folder = args.out / "trials" / (name if attempt == 1 else f"{name}-{attempt}")
        with contextlib.suppress(FileExistsError):
            folder.mkdir()  # atomic: of two workers sharing --out, one gets each name
            return folder
    raise AssertionError  # unreachable


class TrialFailed(Exception):
    """The script failed on its own: recorded on the trial, not retried."""


class Worker:
    """Runs grid points until every point of the study is finished."""

    def __init__(self, args: argparse.Namespace, study: optuna.Study):
        self.args, self.study = args, study
        self.points = grid_points(args)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.trial_id: int | None = None
        self.bar = None
        self.last_refresh = 0.0

    # -- progress --------------------------------------------------------------------------
    def status(self) -> dict[tuple, str]:
        """Each point's state across all workers: complete, failed, waiting, running or open."""
        states: dict[tuple, set] = {key_of(point): set() for point in self.points}
        trials = self.study.get_trials(deepcopy=False)
        owed = {trial.number for trial in self.owed_retries(trials)}
        for trial in trials:
            if trial.state == TrialState.PRUNED:  # a duplicate that stepped aside
                continue
            sampled = len(trial.params) == len(KNOBS)  # not yet, or it died before suggesting
            key = key_of(trial.params) if sampled else grid_key(self.points, trial)
            if key in states:
                states[key].add(TrialState.WAITING if trial.number in owed else trial.state)
        out = {}
        for key, seen in states.items():
            if TrialState.COMPLETE in seen:
                out[key] = "complete"
            elif seen & {TrialState.RUNNING, TrialState.WAITING}:
                out[key] = "waiting" if TrialState.WAITING in seen else "running"
            elif TrialState.FAIL in seen:
                out[key] = "failed"
            else:
                out[key] = "open"
        return out

    def refresh(self, running: str = "", force: bool = False) -> dict[tuple, str]:
        if not force and time.monotonic() - self.last_refresh < 10:
            return {}
        self.last_refresh = time.monotonic()
        status = self.status()
        done = sum(state in ("complete", "failed") for state in status.values())
        self.bar.n = done
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        best = [trial.value for trial in complete]
        postfix = {"best": f"{max(best):.1f}" if best else "-"}
        if running:
            postfix["now"] = running
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()
        return status

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=len(self.points),
            desc=self.args.study_name,
            unit="point",
            dynamic_ncols=True,
        )
        try:
            while True:
                # Experimental in Optuna, used as Optuna's optimize does: a dead worker's trial is
                # failed, and its retry queued.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    fail_stale_trials(self.study)
                self.queue_owed_retries()
                status = self.refresh(force=True)
                if all(state in ("complete", "failed") for state in status.values()):
                    break  # final: a failed point owed a retry counts as waiting (owed_retries)
                if not any(state in ("open", "waiting") for state in status.values()):
                    # The rest run elsewhere; wait, in case they die.
                    time.sleep(min(5, self.args.heartbeat))
                    continue
                self.study.optimize(
                    self.objective,
                    n_trials=1,
                    catch=(TrialFailed,),
                    gc_after_trial=False,
                )
                self.trial_id = None
        finally:
            self.bar.close()

    def objective(self, trial: optuna.Trial) -> float:
        self.trial_id = trial._trial_id
        grid = grid_of(self.args)
        point = {knob: trial.suggest_categorical(knob, values) for knob, values in grid.items()}
        trial.set_user_attr("worker", self.name)
        self.skip_if_taken(trial)
        label = ",".join(f"{value:g}" for value in point.values())
        folder = new_trial_folder(self.args, trial.number)
        scores = []
        for seed in self.args.seeds:
            cwd = folder / f"seed-{seed}"
            cwd.mkdir()
            command = script_command(self.args, point, seed, f"sweep-{trial.number}")
            (cwd / "command.txt").write_text(" ".join(["python", *command]) + "\n")
            with open(cwd / "stdout.log", "w") as stdout, open(cwd / "stderr.log", "w+") as stderr:
                process = start_script(command, cwd, stdout, stderr)
                try:
                    while process.poll() is None:
                        time.sleep(0.5)
                        self.refresh(running=f"{label} seed {seed}")
                except BaseException:
                    # Ctrl-C / SIGTERM of the worker: take the script down with it.
                    process.kill()
                    process.wait()
                    raise
                stderr.seek(0)
                message = last_line(stderr.read())
            if process.returncode != 0:
                script_name = self.args.script.name
                error = f"{script_name} exited {process.returncode}: {message} (see {cwd})"
                self.say_failed(trial, error)
            returns = read_returns(cwd / "runs")
            if not returns:
                error = f"no {SCORE_TAG} logged in {cwd}: no episode ended; train longer"
                self.say_failed(trial, error)
            score = sum(returns[-LAST_EPISODES:]) / len(returns[-LAST_EPISODES:])
            trial.set_user_attr(f"score_seed_{seed}", score)
            scores.append(score)
        return sum(scores) / len(scores)

    def skip_if_taken(self, trial: optuna.Trial) -> None:
        """Two workers can ask at the same moment for the last open point (GridSampler then gives
        both the same one), or one can be given a point whose retry is queued: the oldest claim on
        the point runs and every younger trial steps aside (PRUNED, which nothing reports). The
        rule has to be by age alone, or two trials could each defer to the other.

        A claim is known by its grid id, which the sampler stores within `ask()`, not by its
        params, which exist only once the objective has suggested them: an older trial between
        the two would look like no claim at all, and both would run the point."""
        point = self.study._storage.get_trial_system_attrs(trial._trial_id)[GRID_ID]
        for other in self.trials_with_their_points(trial):
            if other.number == trial.number or other.system_attrs.get(GRID_ID) != point:
                continue
            pending = other.state in (TrialState.RUNNING, TrialState.WAITING)
            if other.state == TrialState.COMPLETE or (pending and other.number < trial.number):
                trial.set_user_attr("note", f"duplicate of trial {other.number}")
                raise optuna.TrialPruned(f"point taken by trial {other.number}")

    def trials_with_their_points(self, trial: optuna.Trial) -> list[optuna.trial.FrozenTrial]:
        """The study's trials, once every trial older than `trial` has its grid id: one that
        another worker's `ask()` has just created gets it from the sampler a moment later. A
        trial whose worker died in that moment never will, hence the bound on the wait."""
        deadline = time.monotonic() + GRID_ID_WAIT_S
        while True:
            trials = self.study.get_trials(deepcopy=False)
            waiting_for_a_point = any(
                other.number < trial.number
                and other.state == TrialState.RUNNING
                and GRID_ID not in other.system_attrs
                for other in trials
            )
            if not waiting_for_a_point or time.monotonic() > deadline:
                return trials
            time.sleep(0.05)

    def owed_retries(
        self, trials: list[optuna.trial.FrozenTrial]
    ) -> list[optuna.trial.FrozenTrial]:
        """The failed trials whose retry is due but not queued. A dead worker's trial is failed a
        moment before its retry is queued, by whichever worker noticed it (that moment may last
        as long as SQLite's 60 s wait for a write), and a stopped worker fails its own trial
        before queueing its retry: a worker that dies in between queues nothing. So a failure
        with no error of the script's own is final only once its retry exists or none is due
        (`--max-retries` worker deaths on the point); until then the point counts as waiting,
        and any worker queues the retry (a second copy, queued at the same moment by the worker
        that noticed, steps aside in `skip_if_taken`)."""
        retried = {number for t in trials for number in t.system_attrs.get("retry_history", [])}
        owed = []
        for trial in trials:
            if trial.state != TrialState.FAIL or trial.number in retried:
                continue
            if "error" in trial.user_attrs:  # the script failed on its own: it would again
                continue
            deaths = trial.system_attrs.get(WORKER_DEATHS, 0)
            if trial.system_attrs.get(INTERRUPTED) or deaths + 1 <= self.args.max_retries:
                owed.append(trial)
        return owed

    def queue_owed_retries(self) -> None:
        for trial in self.owed_retries(self.study.get_trials(deepcopy=False)):
            deaths = trial.system_attrs.get(WORKER_DEATHS, 0)
            queue_retry(
                self.study, trial, deaths if trial.system_attrs.get(INTERRUPTED) else deaths + 1
            )

    def say_failed(self, trial: optuna.Trial, error: str) -> None:
        trial.set_user_attr("error", error)
        self.bar.write(f"trial {trial.number} failed: {error}", file=sys.stderr)
        raise TrialFailed(error)

    def requeue_interrupted(self) -> int | None:
        """After Ctrl-C/SIGTERM: the trial this worker was running is FAIL; queue its retry."""
        if self.trial_id is None:
            return None
        trial = self.study._storage.get_trial(self.trial_id)
        if trial.state == TrialState.RUNNING:
            # Marked first: should this worker die before its retry is queued, another queues it.
            self.study._storage.set_trial_system_attr(self.trial_id, INTERRUPTED, True)
            self.study._storage.set_trial_state_values(self.trial_id, state=TrialState.FAIL)
            trial = self.study._storage.get_trial(self.trial_id)
        if trial.state != TrialState.FAIL:
            return None
        # Stopping a worker is the user's choice, not the point's fault: no limit on these retries,
        # and the count of worker deaths that --max-retries limits is passed on unchanged.
        queue_retry(self.study, trial, trial.system_attrs.get(WORKER_DEATHS, 0))
        return trial.number


def key_of(params: dict) -> tuple:
    return tuple(float(params[knob]) for knob in KNOBS)


def grid_key(points: list[dict], trial: optuna.trial.FrozenTrial) -> tuple | None:
    """A trial that died before sampling its parameters still names its point by `grid_id`."""
    grid_id = trial.system_attrs.get(GRID_ID)
    search_space = trial.system_attrs.get("search_space")
    if grid_id is None or search_space is None:
        return None
    sampler_points = [
        dict(zip(sorted(search_space), values, strict=True))
        for values in itertools.product(*(search_space[name] for name in sorted(search_space)))
    ]
    return key_of(sampler_points[grid_id]) if grid_id < len(sampler_points) else None


# ---------------------------------------------------------------------------------------------
# The report: table, top/bottom, heatmap, knob importance.


def collect_rows(args: argparse.Namespace, study: optuna.Study) -> list[dict]:
    """One row per grid point: its first complete trial, else its last failure, else not run."""
    points = grid_points(args)
    by_key: dict[tuple, list] = {key_of(point): [] for point in points}
    for trial in study.get_trials(deepcopy=False):
        if (
            trial.state != TrialState.PRUNED
            and len(trial.params) == len(KNOBS)
            and key_of(trial.params) in by_key
        ):
            by_key[key_of(trial.params)].append(trial)
    rows = []
    for point in points:
        trials = by_key[key_of(point)]
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        chosen = complete[0] if complete else (trials[-1] if trials else None)
        row = {
            **point,
            "score": None,
            "state": "not run",
            "trial": "",
            "seconds": "",
            "worker": "",
            "note": "",
        }
        if chosen is not None:
            row["state"] = chosen.state.name.lower()
            row["trial"] = chosen.number
            if chosen.datetime_start and chosen.datetime_complete:
                duration = chosen.datetime_complete - chosen.datetime_start
                row["seconds"] = round(duration.total_seconds(), 1)
            row["worker"] = chosen.user_attrs.get("worker", "")
            row["note"] = chosen.user_attrs.get("error", "")
            if chosen.state == TrialState.COMPLETE:
                row["score"] = chosen.value
                failed_before = sum(t.state == TrialState.FAIL for t in trials)
                if failed_before:
                    row["note"] = f"retried after {failed_before} failed trial(s)"
            for seed in args.seeds:
                row[f"seed {seed}"] = chosen.user_attrs.get(f"score_seed_{seed}")
        rows.append(row)
    rows.sort(key=lambda row: (row["score"] is None, -(row["score"] or 0.0)))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def knob_importance(args: argparse.Namespace, rows: list[dict]) -> list[dict]:
    """Per knob: the spread (max - min) of its per-value mean scores, and the share of the score
    variance its main effect explains (functional ANOVA main effect, exact on a complete grid)."""
    scored = [row for row in rows if row["score"] is not None]
    if len(scored) < 2:
        return []
    mean = sum(row["score"] for row in scored) / len(scored)
    total = sum((row["score"] - mean) ** 2 for row in scored) / len(scored)
    out = []
    for knob in KNOBS:
        means = {}
        for value in getattr(args, knob):
            scores = [row["score"] for row in scored if row[knob] == value]
            if scores:
                means[value] = sum(scores) / len(scores)
        if len(means) < 2:
            continue
        effect = sum((m - mean) ** 2 for m in means.values()) / len(means)
        out.append(
            {
                "knob": flag(knob),
                "spread": max(means.values()) - min(means.values()),
                "share": effect / total if total > 0 else 0.0,
                "means": means,
            }
        )
    out.sort(key=lambda item: -item["spread"])
    return out


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def fmt(value) -> str:
    if value is None or value == "":
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def write_heatmap(args: argparse.Namespace, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lrs, clips = args.learning_rate, args.clip_coef
    grid = np.full((len(lrs), len(clips)), np.nan)
    for i, lr in enumerate(lrs):
        for j, clip in enumerate(clips):
            cell = [row for row in rows if row["learning_rate"] == lr and row["clip_coef"] == clip]
            scores = [row["score"] for row in cell if row["score"] is not None]
            if scores:
                grid[i, j] = sum(scores) / len(scores)
    fig, ax = plt.subplots(figsize=(1.6 * len(clips) + 2.4, 1.1 * len(lrs) + 1.6))
    image = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
    finite = grid[np.isfinite(grid)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(len(lrs)):
        for j in range(len(clips)):
            text = "n/a" if np.isnan(grid[i, j]) else f"{grid[i, j]:.0f}"
            color = "black" if np.isfinite(grid[i, j]) and grid[i, j] > middle else "white"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=11)
    ax.set_xticks(range(len(clips)), [f"{c:g}" for c in clips])
    ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set_xlabel("--clip-coef")
    ax.set_ylabel("--learning-rate")
    lambdas = ", ".join(f"{lam:g}" for lam in args.gae_lambda)
    ax.set_title(
        f"{args.script.name}: mean return of the last {LAST_EPISODES} episodes\n"
        f"{args.total_timesteps:,} steps, mean over GAE lambda {{{lambdas}}}",
        fontsize=9,
    )
    fig.colorbar(image, ax=ax, label="score")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def report(args: argparse.Namespace, study: optuna.Study) -> list[dict]:
    """Write results.csv, results.md and heatmap.png to --out; print top 3, bottom 3, importance."""
    args.out.mkdir(parents=True, exist_ok=True)
    rows = collect_rows(args, study)
    seed_columns = [f"seed {seed}" for seed in args.seeds] if len(args.seeds) > 1 else []
    columns = ["rank", *KNOBS, "score", *seed_columns]
    columns += ["state", "trial", "seconds", "worker", "note"]

    with open(args.out / f".results.{os.getpid()}.tmp", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if row.get(key) is None else row.get(key) for key in columns})
    os.replace(args.out / f".results.{os.getpid()}.tmp", args.out / "results.csv")

    trials = study.get_trials(deepcopy=False)
    trials = [t for t in trials if t.datetime_start and t.datetime_complete]
    wall = 0.0
    if trials:
        first_start = min(t.datetime_start for t in trials)
        wall = (max(t.datetime_complete for t in trials) - first_start).total_seconds()
    workers = {t.user_attrs.get("worker") for t in trials if t.user_attrs.get("worker")}
    hosts = {worker.rsplit(":", 1)[0] for worker in workers}
    complete = sum(row["score"] is not None for row in rows)
    summary = (
        f"{complete}/{len(rows)} points complete, {args.total_timesteps:,} steps each, seeds "
        f"{' '.join(map(str, args.seeds))}; wall time {wall / 60:.1f} min with "
        f"{len(workers)} worker(s) on {len(hosts)} machine(s); score = mean return of the last "
        f"{LAST_EPISODES} training episodes"
    )
    importance = knob_importance(args, rows)

    header = ["rank", *(flag(k) for k in KNOBS), "score", *seed_columns]
    header += ["state", "trial", "seconds", "note"]
    lines = [
        f"# Sweep `{args.study_name}` of `{args.script.name}`",
        "",
        summary + ".",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        cells = [row["rank"], *(f"{row[k]:g}" for k in KNOBS), fmt(row["score"])]
        cells += [fmt(row.get(column)) for column in seed_columns]
        cells += [row["state"], row["trial"], fmt(row["seconds"]), row["note"] or ""]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    lines += ["", "## Knob importance", ""]
    if importance:
        lines += [
            "Spread of the per-value mean scores (each mean over every other knob), and the",
            "share of the score variance explained by the knob's main effect (functional ANOVA",
            "on the grid).",
            "",
            "| knob | spread | variance share | mean score per value |",
            "|---|---|---|---|",
        ]
        for item in importance:
            means = ", ".join(f"{value:g}: {score:.1f}" for value, score in item["means"].items())
            spread, share = item["spread"], item["share"]
            lines.append(f"| {item['knob']} | {spread:.1f} | {share:.0%} | {means} |")
    else:
        lines.append("Not enough complete points.")
    write_atomic(args.out / "results.md", "\n".join(lines) + "\n")
    if complete:
        write_heatmap(args, rows, args.out / "heatmap.png")

    def show(row: dict) -> str:
        knobs = " ".join(f"{flag(k)} {row[k]:g}" for k in KNOBS)
        return f"  {row['rank']:>3}. {knobs}  score {fmt(row['score'])}"

    scored = [row for row in rows if row["score"] is not None]
    print(summary)
    print("top 3:")
    print("\n".join(show(row) for row in scored[:3]))
    print("bottom 3:")
    print("\n".join(show(row) for row in scored[-3:][::-1]))
    if importance:
        print(
            "knob importance (spread of per-value mean scores; variance share): "
            + ", ".join(f"{i['knob']} {i['spread']:.1f} ({i['share']:.0%})" for i in importance)
        )
    failed = [row for row in rows if row["score"] is None]
    for row in failed:
        knobs = " ".join(f"{flag(k)} {row[k]:g}" for k in KNOBS)
        print(f"not complete: {knobs}: {row['state']} {row['note']}".rstrip())
    print(f"wrote {args.out / 'results.md'}, results.csv" + (", heatmap.png" if complete else ""))
    return rows


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Optuna would log each failed trial with a traceback; the worker says it in one line instead.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    # Heartbeats and their retry callback are marked experimental in Optuna; they are what we want.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    check_reachable(args)
    study = existing_study(args)
    if args.report_only:
        if study is None:
            fail(f"no study {args.study_name!r} in {shown(args.storage)}")
        rows = report(args, study)
        return 0 if all(row["score"] is not None for row in rows) else 1
    if study is None:
        check_grid(args)  # before any row of the study is written
        study = create_study(args)

    worker = Worker(args, study)

    stopped_by = [signal.SIGINT]

    def stop(signum, frame):
        stopped_by[0] = signum
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        worker.run()
    except KeyboardInterrupt:
        number = worker.requeue_interrupted()
        requeued = ""
        if number is not None:
            requeued = f"; trial {number} is failed and queued for the next worker"
        print(f"sweep interrupted{requeued}. Start the same command to go on.", file=sys.stderr)
        return 128 + stopped_by[0]
    rows = report(args, study)
    return 0 if all(row["score"] is not None for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
