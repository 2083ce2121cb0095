"""Learning curves over several seeds: each script run as a user runs it, plotted and tabled.

    python experiments/curves.py                  # every CPU script, seeds 42 123 456
    python experiments/curves.py --scripts ppo_cartpole actor_critic --seeds 1 2 3 --out cartpole
    python experiments/curves.py --scripts ppo_cartpole --total-timesteps 20000 --peers

Every (script, seed) pair is one subprocess, `python <script>.py --seed S` with the script's default
settings (`--total-timesteps` overrides the budget for a quick look; flags after `--` go to every
run), in its own working directory `<out>/runs/<script>/seed-<S>/`. A rerun into the same `--out`
starts clean: that folder is emptied first, so an earlier run of the same script and seed is
replaced, never mixed in (the tool prints which runs it replaces). As many run at once as `--jobs`
says (default: one per core), under a progress bar. The tool then reads the TensorBoard scalars
each run wrote and writes into `--out`:

- `<script>.png`: the training return against environment steps and against wall-clock seconds
  since the process started. Each seed's episodes are smoothed by the mean of its last 20
  (the same window the progress bars show), then put on a common grid: the line is the mean over
  seeds and the band spans the lowest to the highest seed (min-max), drawn only as far as every
  seed got (a run that stopped once solved ends early; its thin line ends there). Below them,
  against steps and against seconds, the curve the script logs of its own where it has one:
  ppo_drone's tracking error, dqn_flappy's pipes in its periodic greedy evaluations.
- `results.md` and `results.csv`: per script the final evaluation, mean ± std over seeds of each
  seed's mean, with every seed's value; environment steps, wall time of the whole process (as the
  tool measured it from launch to exit) and steps/s; pipes for dqn_flappy, tracking error and RMSE
  for ppo_drone. `results.csv` has one row per run. The steps are the run's final step, as its
  summary line on stdout says (`done: <step> steps in <seconds>s (...`, the last line every script
  prints for a finished run); a run that printed none gets no steps and a warning, not a guess.

Each run also leaves a record in `--out` that is small enough to commit, while `runs/` is not:
its entry in `runs.json` (launch time, wall time, final step, settings, error) and
`<script>_seed-<S>_scalars.csv`, the scalars this tool plots and tables (tag, step, wall time,
value). `--add` reads these records back for the runs already in `--out` (other seeds, other
scripts) and tables them with the new ones, plotted beside those of the same script, so that a long
experiment lands seed by seed, on any machine with a clone of the records: `--seeds 1 --out X`,
then `--seeds 2 --out X --add`, and so on. Without `--add`, the new runs replace the record.

`--peers` adds the Stable-Baselines3 counterparts where they run here: SB3 PPO beside ppo_cartpole
and SB3 A2C beside actor_critic, each with the RL-Zoo settings for CartPole-v1 and the same seeds,
run by this file in a child process that writes the same TensorBoard scalars and summary line.

The runs share the cores when --jobs is above 1: wall times and steps/s are those of runs that ran
side by side, as the table's header says. Bad input (an unknown script, an empty seed list, an
unwritable --out, a script or a seed named twice) gets one line on stderr and exit status 2. A run
that fails is reported with its script, seed and the tail of its stderr; the others are still
plotted and tabled, and the tool exits with status 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = (
    "ppo_cartpole",
    "actor_critic",
    "qlearning_cartpole",
    "dqn_flappy",
    "ppo_drone",
    "ppo_atari",
)
CPU_SCRIPTS = SCRIPTS[:-1]  # the default: those that train on a CPU in minutes
PEERS = {"ppo_cartpole": "sb3_ppo", "actor_critic": "sb3_a2c"}
PEER_BUDGETS = {"sb3_ppo": 100_000, "sb3_a2c": 500_000}  # RL-Zoo's n_timesteps for CartPole-v1
Points = list[tuple[int, float, float]]  # one scalar's (step, wall time, value), in order
WINDOW = 20  # training returns are smoothed by the mean of the last WINDOW episodes
# The summary line every script prints last for a finished run: its final step and its time.
SUMMARY_LINE = re.compile(r"^done: (\d+) steps in [0-9.]+s \(", re.MULTILINE)
GRID_POINTS = 200
# A third panel where a script logs a curve of its own: (scalar, axis label).
EXTRA_CURVES = {
    "ppo_drone": ("charts/tracking_error", "tracking error (m)"),
    "dqn_flappy": ("charts/greedy_score", "pipes, periodic greedy evaluation"),
}
# Extra columns of the table: (scalar logged per evaluation episode, column name).
EXTRA_EVALS = {
    "dqn_flappy": (("eval/episodic_score", "eval pipes"),),
    "ppo_drone": (
        ("eval/tracking_error", "eval tracking error (m)"),
        ("eval/tracking_rmse", "eval RMSE (m)"),
    ),
}


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scripts", nargs="*", default=list(CPU_SCRIPTS), help="scripts, by name")
    parser.add_argument("--seeds", nargs="*", type=int, default=[42, 123, 456])
    parser.add_argument("--out", type=Path, default=Path("curves"), help="folder of the outputs")
    parser.add_argument("--total-timesteps", type=int, default=None, help="override every budget")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs at once")
    parser.add_argument("--peers", action="store_true", help="also run SB3 PPO / A2C on CartPole")
    parser.add_argument("--add", action="store_true", help="table these runs with those in --out")
    args = parser.parse_args(argv)
    args.extra = extra
    args.scripts = [name.removesuffix(".py") for name in args.scripts]
    for name in args.scripts:
        if name not in SCRIPTS:
            fail(f"unknown script {name!r}; choose from {', '.join(SCRIPTS)}")
    if not args.scripts:
        fail("--scripts is empty; name at least one script")
    if not args.seeds:
        fail("--seeds is empty; give at least one seed")
    if len(set(args.seeds)) != len(args.seeds):
        fail(f"--seeds repeats a seed: {args.seeds}")
    if len(set(args.scripts)) != len(args.scripts):  # two runs would share one folder
        fail(f"--scripts repeats a script: {' '.join(args.scripts)}")
    if args.jobs <= 0:
        fail(f"--jobs must be positive, got {args.jobs}")
    if args.total_timesteps is not None and args.total_timesteps <= 0:
        fail(f"--total-timesteps must be positive, got {args.total_timesteps}")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        probe = args.out / ".writable"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        fail(f"cannot write to --out {args.out} ({error.strerror or error})")
    return args


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class RunResult:
    script: str  # the script's name, or its peer's (sb3_ppo, sb3_a2c)
    seed: int
    workdir: Path
    wall: float = 0.0
    launched: float = 0.0
    final_step: int | None = None  # from the run's summary line; None where it printed none
    settings: str = ""  # what the run was given beyond the defaults and its seed
    error: str | None = None
    scalars: dict[str, Points] = field(default_factory=dict)  # by tag


def command_for(args: argparse.Namespace, script: str, seed: int, workdir: Path) -> list[str]:
    if script in PEERS.values():
        budget = args.total_timesteps or PEER_BUDGETS[script]
        return [
            sys.executable,
            str(Path(__file__).resolve()),
            "--peer-child",
            script,
            str(seed),
            str(budget),
        ]
    command = [sys.executable, str(ROOT / f"{script}.py"), "--seed", str(seed)]
    if args.total_timesteps is not None:
        command += ["--total-timesteps", str(args.total_timesteps)]
    return command + args.extra


def settings_of(args: argparse.Namespace) -> str:
    """What this call gives every run beyond the defaults and the seed, as the table says."""
    budget = f"--total-timesteps {args.total_timesteps}" if args.total_timesteps else ""
    return ", ".join(part for part in (budget, " ".join(args.extra)) if part)


def workdir_of(args: argparse.Namespace, script: str, seed: int) -> Path:
    return args.out / "runs" / script / f"seed-{seed}"


def run_one(args: argparse.Namespace, script: str, seed: int) -> RunResult:
    workdir = workdir_of(args, script, seed)
    # Start clean: everything below is read back recursively, so an earlier run's event files left
    # here would be read as this run's (its evaluation episodes twice, curves restarting at 0).
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    result = RunResult(script, seed, workdir, settings=settings_of(args))
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    result.launched = time.time()
    with open(workdir / "stdout.log", "w") as stdout, open(workdir / "stderr.log", "w+") as stderr:
        process = subprocess.run(
            command_for(args, script, seed, workdir),
            cwd=workdir,
            stdout=stdout,
            stderr=stderr,
            env=env,
        )
        result.wall = time.time() - result.launched
        if process.returncode != 0:
            stderr.seek(0)
            tail = "\n".join(stderr.read().strip().splitlines()[-5:])
            result.error = f"exit status {process.returncode}: {tail}"
    if result.error is None:
        result.scalars = read_scalars(workdir)
        result.final_step = reported_final_step((workdir / "stdout.log").read_text())
    return result


def recorded_tags(script: str) -> list[str]:
    """The scalars this tool plots and tables for a script: those its record keeps."""
    tags = ["charts/episodic_return", "eval/episodic_return"]
    if script in EXTRA_CURVES:
        tags.append(EXTRA_CURVES[script][0])
    return tags + [key for key, _ in EXTRA_EVALS.get(script, ())]


def scalars_record(args: argparse.Namespace, script: str, seed: int) -> Path:
    return args.out / f"{script}_seed-{seed}_scalars.csv"


def write_scalars_record(args: argparse.Namespace, run: RunResult) -> None:
    with open(scalars_record(args, run.script, run.seed), "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["tag", "step", "wall_time", "value"])
        for tag in recorded_tags(run.script):
            for step, wall_time, value in run.scalars.get(tag, []):
                # TensorBoard keeps float32: its shortest repr reads back to the same value.
                writer.writerow([tag, step, f"{wall_time:.3f}", str(np.float32(value))])


def earlier_runs(args: argparse.Namespace, jobs: list[tuple[str, int]]) -> list[RunResult]:
    """--add: the runs recorded in --out, other than those run now."""
    record_path = args.out / "runs.json"
    if not record_path.exists():
        return []
    runs = []
    for record in json.loads(record_path.read_text()):
        script, seed = record["script"], record["seed"]
        if (script, seed) in jobs:
            continue
        run = RunResult(script, seed, workdir_of(args, script, seed))
        run.wall, run.launched, run.error = record["wall_s"], record["launched"], record["error"]
        run.final_step, run.settings = record.get("steps"), record.get("settings", "")
        if run.error is None:
            path = scalars_record(args, script, seed)
            if not path.exists():
                print(f"warning: {script} seed {seed} left out: no {path}", file=sys.stderr)
                continue
            with open(path, newline="") as file:
                for row in csv.DictReader(file):
                    value = float(np.float32(row["value"]))
                    point = (int(row["step"]), float(row["wall_time"]), value)
                    run.scalars.setdefault(row["tag"], []).append(point)
        runs.append(run)
    return runs


def reported_final_step(stdout: str) -> int | None:
    """The final step a finished run states on its summary line, or None if it printed none."""
    steps = SUMMARY_LINE.findall(stdout)
    return int(steps[-1]) if steps else None


def read_scalars(workdir: Path) -> dict[str, Points]:
    """Every scalar of the run's TensorBoard files: key -> [(step, wall time, value)] in order."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    scalars: dict[str, Points] = {}
    for event_file in sorted(workdir.rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(event_file)).Load():
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    number = value.simple_value
                elif value.metadata.plugin_data.plugin_name == "scalars":  # (histograms are not)
                    number = float(tensor_util.make_ndarray(value.tensor))
                else:
                    continue
                scalars.setdefault(value.tag, []).append((event.step, event.wall_time, number))
    return scalars


def peer_child(name: str, seed: int, budget: int) -> None:
    """Runs in its own process: SB3 with RL-Zoo's CartPole-v1 settings, logging like our scripts."""
    import torch
    from stable_baselines3 import A2C, PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from torch.utils.tensorboard import SummaryWriter

    started = time.time()
    torch.set_num_threads(1)  # as our CartPole scripts: faster for these small networks
    writer = SummaryWriter(f"runs/CartPole-v1__{name}__{seed}")

    class LogEpisodes(BaseCallback):
        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:  # added by SB3's Monitor wrapper when an episode ends
                    episode_return = info["episode"]["r"]
                    writer.add_scalar("charts/episodic_return", episode_return, self.num_timesteps)
            return True

    envs = make_vec_env("CartPole-v1", n_envs=8, seed=seed)
    if name == "sb3_ppo":
        model = PPO(
            "MlpPolicy", envs, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20,
            ent_coef=0.0, learning_rate=lambda remaining: remaining * 1e-3,
            clip_range=lambda remaining: remaining * 0.2, seed=seed, device="cpu", verbose=0,
        )  # fmt: skip
    else:
        model = A2C("MlpPolicy", envs, ent_coef=0.0, seed=seed, device="cpu", verbose=0)
    model.learn(total_timesteps=budget, callback=LogEpisodes())
    # The final evaluation, as our scripts do it: 10 greedy episodes on seeds seed + 10000 + i.
    env = make_vec_env("CartPole-v1", n_envs=1)
    returns = []
    for episode in range(10):
        env.seed(seed + 10_000 + episode)
        obs, total, done = env.reset(), 0.0, False
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, reward, dones, _ = env.step(action)
            total, done = total + float(reward[0]), bool(dones[0])
        writer.add_scalar("eval/episodic_return", total, episode)
        returns.append(total)
    writer.close()
    # The summary line of our scripts, which the parent reads the run's final step from.
    elapsed = time.time() - started
    print(
        f"done: {model.num_timesteps} steps in {elapsed:.1f}s ({model.num_timesteps / elapsed:.0f} "
        f"steps/s); eval return {np.mean(returns):.2f} ± {np.std(returns):.2f} over 10 episodes"
    )


# ---------------------------------------------------------------------------------------------
# Curves and table


def smoothed(points: Points, window: int = WINDOW) -> tuple[np.ndarray, ...]:
    """(steps, wall times, mean of the last `window` returns) after each episode."""
    steps = np.array([step for step, _, _ in points], dtype=float)
    times = np.array([wall for _, wall, _ in points], dtype=float)
    values = np.array([value for _, _, value in points], dtype=float)
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    means = (cumulative[1:] - cumulative[np.arange(1, len(values) + 1) - counts]) / counts
    return steps, times, means


def band(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, ...] | None:
    """Mean, min and max over the curves on a common grid, up to where the shortest one ends."""
    curves = [(x, y) for x, y in curves if len(x) > 0]
    if not curves:
        return None
    start, end = max(x[0] for x, _ in curves), min(x[-1] for x, _ in curves)
    if end <= start:
        return None
    grid = np.linspace(start, end, GRID_POINTS)
    values = np.stack([np.interp(grid, x, y) for x, y in curves])
    return grid, values.mean(axis=0), values.min(axis=0), values.max(axis=0)


def plot_script(script: str, runs: list[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extra = EXTRA_CURVES.get(script)
    rows = 2 if extra else 1
    figure, axes = plt.subplots(rows, 2, figsize=(10.4, 3.8 * rows), constrained_layout=True)
    axes = axes.reshape(-1)
    groups: dict[str, list[RunResult]] = {}
    for run in runs:
        if run.error is None and run.scalars.get("charts/episodic_return"):
            groups.setdefault(run.script, []).append(run)
    for color, (name, members) in zip(("tab:blue", "tab:orange"), groups.items(), strict=False):
        by_steps, by_time, extra_by_steps, extra_by_time = [], [], [], []
        for run in members:
            steps, times, means = smoothed(run.scalars["charts/episodic_return"])
            by_steps.append((steps, means))
            by_time.append((times - run.launched, means))
            if extra and run.scalars.get(extra[0]):
                points = np.array(run.scalars[extra[0]])
                extra_by_steps.append((points[:, 0], points[:, 2]))
                extra_by_time.append((points[:, 1] - run.launched, points[:, 2]))
        curves = [(axes[0], by_steps), (axes[1], by_time)]
        if extra:
            curves += [(axes[2], extra_by_steps), (axes[3], extra_by_time)]
        for axis, per_seed in curves:
            for x, y in per_seed:
                axis.plot(x, y, color=color, linewidth=0.6, alpha=0.45)
                axis.plot(x[-1:], y[-1:], marker="o", markersize=3, color=color, alpha=0.6)
            summary = band(per_seed)
            if summary is not None:
                grid, mean, low, high = summary
                label = f"{name} ({len(per_seed)} seeds)"
                axis.plot(grid, mean, color=color, linewidth=2, label=label)
                axis.fill_between(grid, low, high, color=color, alpha=0.2)
    axes[0].set_xlabel("environment steps")
    axes[1].set_xlabel("seconds since the process started")
    for axis in axes[:2]:
        axis.set_ylabel(f"training return (mean of last {WINDOW})")
    if extra:
        axes[2].set_xlabel("environment steps")
        axes[3].set_xlabel("seconds since the process started")
        for axis in axes[2:]:
            axis.set_ylabel(extra[1])
    for axis in axes:
        axis.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:  # none where no run logged a training return
        axes[0].legend(loc="best", fontsize=8)
    seeds = sorted({run.seed for run in runs})
    figure.suptitle(
        f"{script}: mean over seeds {', '.join(map(str, seeds))}; band: min-max over seeds; "
        "thin lines: each seed, dot where it ended",
        fontsize=9,
    )
    figure.savefig(path, dpi=90)
    plt.close(figure)


def eval_values(run: RunResult, key: str) -> list[float]:
    return [value for _, _, value in run.scalars.get(key, [])]


def table_rows(runs: list[RunResult]) -> list[dict]:
    """One row per run: what it scored, how far and how fast it got."""
    rows = []
    for run in runs:
        row = {
            "script": run.script,
            "seed": run.seed,
            "wall_s": round(run.wall, 3),
            "settings": run.settings,
            "error": run.error or "",
        }
        if run.error is None:
            steps = run.final_step
            row["steps"] = steps
            known = steps is not None and run.wall > 0
            row["steps_per_s"] = round(steps / run.wall, 1) if known else None
            returns = eval_values(run, "eval/episodic_return")
            row["eval_return"] = float(np.mean(returns)) if returns else None
            row["eval_return_std"] = float(np.std(returns)) if returns else None
            for key, _ in EXTRA_EVALS.get(run.script, ()):
                values = eval_values(run, key)
                row[key] = float(np.mean(values)) if values else None
        rows.append(row)
    return rows


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def write_table(rows: list[dict], args: argparse.Namespace) -> None:
    columns = ["script", "seed", "steps", "wall_s", "steps_per_s", "eval_return", "eval_return_std"]
    columns += sorted({key for row in rows for key in row if key.startswith("eval/")})
    with open(args.out / "results.csv", "w", newline="") as file:
        fieldnames = [*columns, "settings", "error"]
        writer = csv.DictWriter(file, fieldnames=fieldnames, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    parallel = f"{args.jobs} runs at a time on {os.cpu_count()} cores"
    if args.jobs == 1:
        parallel = "one run at a time"
    seeds = sorted({row["seed"] for row in rows})
    settings = dict.fromkeys(row["settings"] for row in rows)
    if len(settings) == 1:  # the same for every run (--add can table runs given other settings)
        given = "".join(f", {setting}" for setting in settings if setting)
    else:
        given = " and, per run, " + "; ".join(
            f"{row['script']} seed {row['seed']}: {row['settings'] or 'nothing more'}"
            for row in rows
        )
    lines = [
        f"Seeds {', '.join(map(str, seeds))}; default settings{given}"
        + f"; {parallel} (wall times and steps/s are whole processes).",
        "",
        "| script | final evaluation, mean ± std over seeds | per seed | env steps (mean) "
        "| wall time (mean) | steps/s (mean) | more |",
        "|---|---|---|---|---|---|---|",
    ]
    for script in dict.fromkeys(row["script"] for row in rows):
        done = [row for row in rows if row["script"] == script and not row["error"]]
        failed = [row for row in rows if row["script"] == script and row["error"]]
        evals = [row["eval_return"] for row in done if row["eval_return"] is not None]
        summary = f"{statistics.mean(evals):.1f} ± {statistics.pstdev(evals):.1f}" if evals else "-"
        per_seed = ", ".join(f"{row['seed']}: {fmt(row['eval_return'])}" for row in done)
        per_seed += "".join(f", {row['seed']}: failed" for row in failed)
        more = []
        unknown_steps = [str(row["seed"]) for row in done if row["steps"] is None]
        if unknown_steps:
            more.append(f"steps not reported: seed {', '.join(unknown_steps)}")
        for key, name in EXTRA_EVALS.get(script, ()):
            values = [row.get(key) for row in done if row.get(key) is not None]
            if values:
                more.append(f"{name}: " + ", ".join(f"{value:.3g}" for value in values))
        lines.append(
            f"| {script} | {summary} | {per_seed} | {fmt(mean_of(done, 'steps'), 0)} | "
            f"{fmt(mean_of(done, 'wall_s'))} s | {fmt(mean_of(done, 'steps_per_s'), 0)} | "
            f"{'; '.join(more)} |"
        )
    figures = dict.fromkeys([*args.scripts, *(row["script"] for row in rows)])
    lines += ["", *(f"![{script}]({script}.png)" for script in figures if script in SCRIPTS)]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")


def mean_of(rows: list[dict], key: str) -> float | None:
    values = [row[key] for row in rows if row.get(key) is not None]
    return statistics.mean(values) if values else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    jobs = [(script, seed) for script in args.scripts for seed in args.seeds]
    if args.peers:
        peers = [PEERS[script] for script in args.scripts if script in PEERS]
        jobs += [(peer, seed) for peer in peers for seed in args.seeds]
    earlier = [(script, seed) for script, seed in jobs if workdir_of(args, script, seed).exists()]
    if earlier:
        runs = "run" if len(earlier) == 1 else "runs"
        names = ", ".join(f"{script} seed {seed}" for script, seed in earlier)
        print(
            f"replacing the earlier {runs} in --out of {names}: "
            f"every run starts in an emptied folder under {args.out / 'runs'}"
        )
    results: list[RunResult] = []
    with (
        ThreadPoolExecutor(max_workers=args.jobs) as pool,
        tqdm(total=len(jobs), unit="run") as progress,
    ):
        futures = [pool.submit(run_one, args, script, seed) for script, seed in jobs]
        for future in futures:
            result = future.result()
            results.append(result)
            progress.update(1)
            progress.set_postfix_str(f"{result.script} seed {result.seed}", refresh=True)
    for result in results:
        if result.error is None:
            write_scalars_record(args, result)
    if args.add:
        results = earlier_runs(args, jobs) + results
    else:  # the new runs replace the record: no earlier run's scalars are left beside them
        kept = {scalars_record(args, run.script, run.seed) for run in results}
        for path in args.out.glob("*_seed-*_scalars.csv"):
            if path not in kept:
                path.unlink()
    for result in results:
        if result.error:
            print(
                f"error: {result.script} seed {result.seed} failed ({result.error})",
                file=sys.stderr,
            )
        elif result.final_step is None:
            print(
                f"warning: {result.script} seed {result.seed} printed no `done: <step> steps` "
                "line; its steps and steps/s are left blank",
                file=sys.stderr,
            )

    for script in args.scripts:
        runs = [run for run in results if run.script in (script, PEERS.get(script))]
        plot_script(script, runs, args.out / f"{script}.png")
    write_table(table_rows(results), args)
    run_records = [
        {
            "script": run.script,
            "seed": run.seed,
            "wall_s": run.wall,
            "launched": run.launched,
            "steps": run.final_step,
            "settings": run.settings,
            "error": run.error,
        }
        for run in results
    ]
    (args.out / "runs.json").write_text(json.dumps(run_records, indent=1))
    print(f"wrote {args.out / 'results.md'}, results.csv and {len(args.scripts)} figures")
    return 1 if any(result.error for result in results) else 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--peer-child":
        peer_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit(main())
