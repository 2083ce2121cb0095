"""CartPole-v1, side by side in one run: ppo_cartpole.py vs SB3 PPO, or actor_critic.py vs SB3 A2C.

    pip install -r requirements.txt -r benchmarks/requirements.txt
    python benchmarks/bench_cartpole.py --script ppo_cartpole --seeds 4 5 6
    python benchmarks/bench_cartpole.py --script actor_critic --seeds 4 5 6

For each seed, ours and then the peer run one after the other (never at once: they would share
the cores), each in a fresh process. Ours is the default command (`python <script>.py --seed S`),
which stops once its greedy policy is solved, evaluates and saves. The peer has RL-Zoo's CartPole-v1
hyperparameters: PPO with 8 envs, 32 steps, batch 256, 20 epochs, gamma 0.98, lambda 0.8, lr and
clip annealed from 1e-3 and 0.2, up to 100k steps; A2C with 8 envs, ent_coef 0 and SB3's defaults
(5 steps, RMSprop lr 7e-4, gamma 0.99), up to 500k steps. The peer is solved once the mean return
of its last 20 training episodes reaches 475, and stops there. Measured for each seed:
  - steps to solve: ours the step S of its summary line (`done: N steps ...; solved at step S`),
    the peer its num_timesteps at the episode that brought the mean to 475;
  - training time: wall seconds from the end of the first training episode to the solved moment
    (interpreter start, imports and set-up are in neither). The peer: time.time() in an SB3
    callback at each finished episode. Ours: the wall times of its TensorBoard events under runs/,
    from the first charts/episodic_return to the last charts/ or losses/ event at a step <= S,
    leaving out charts/solved_check_min_return (written after each greedy check has played).
    ppo_cartpole logs charts/SPS after every update, so that event is at S; actor_critic logs
    every --log-interval (640) steps, so the iterations after its last logged event are left out
    (the line then prints that event's step). The greedy check that found ours solved comes after
    the event, left out too: "+x s to its checkpoint" (the final checkpoint file's mtime) bounds
    what is left out, and the closing lines give the ratio to the checkpoint too;
  - peak resident memory of each whole process (ru_maxrss); the greedy final evaluation of ours.
The closing lines give ratios of the medians over seeds, peer / ours (above 1 favours ours).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WINDOW, TARGET = 20, 475.0
PEERS = {"ppo_cartpole": ("sb3_ppo", 100_000), "actor_critic": ("sb3_a2c", 500_000)}


def run_measured(command: list[str], cwd: str) -> tuple[float, str]:
    """Run a process to completion; return (peak RSS in MiB, stdout)."""
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, cwd=cwd, stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
        stdout.seek(0), stderr.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{stderr.read().decode()[-3000:]}")
        return usage.ru_maxrss / 1024, stdout.read().decode()  # ru_maxrss: KiB on Linux


def read_events(run_dir: Path) -> list[tuple[str, int, float]]:
    """(tag, step, wall time) of every scalar in the run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    events = []
    for event_file in sorted(run_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(event_file)).Load():
            for value in event.summary.value:
                events.append((value.tag, event.step, event.wall_time))
    return events


def run_ours(script: str, seed: int, workdir: str) -> dict:
    """The default command; where it stopped from its summary line, when from its events."""
    command = [sys.executable, str(ROOT / f"{script}.py"), "--seed", str(seed)]
    peak, stdout = run_measured(command, workdir)
    summary = stdout.strip().splitlines()[-1]
    solved = re.search(r"solved at step (\d+);", summary)
    evaluation = re.search(r"eval return (-?[\d.]+) ± ([\d.]+)", summary)
    row = {
        "steps": int(solved.group(1)) if solved else None,
        "train_s": None,
        "peak_mib": peak,
        "eval": float(evaluation.group(1)),
        "eval_std": float(evaluation.group(2)),
        "ran": int(re.search(r"done: (\d+) steps", summary).group(1)),
    }
    if solved is None:
        return row
    (run_dir,) = Path(workdir, "runs").iterdir()
    events = read_events(run_dir)
    start = min(wall for tag, _, wall in events if tag == "charts/episodic_return")
    # The greedy check that found the policy solved writes charts/solved_check_min_return once it
    # has played its episodes: that event's time is the check's, not training's.
    training = [
        (wall, step)
        for tag, step, wall in events
        if tag.startswith(("charts/", "losses/"))
        and tag != "charts/solved_check_min_return"
        and step <= row["steps"]
    ]
    end, row["end_step"] = max(training)
    row["train_s"] = end - start
    # The final checkpoint, runs/<run>/<script>.<suffix>: written once the training loop has ended.
    checkpoints = [path for path in run_dir.glob(f"{script}.*") if path.suffix != ".tmp"]
    row["checkpoint_s"] = checkpoints[0].stat().st_mtime - start if checkpoints else None
    return row


def run_peer(script: str, seed: int, workdir: str, torch_threads: int) -> dict:
    log = Path(workdir) / "episodes.json"
    command = [sys.executable, __file__, "--peer-child", script, str(seed), str(log)]
    peak, _ = run_measured(command + [str(torch_threads)], workdir)
    row = {"steps": None, "train_s": None, "peak_mib": peak}
    record = json.loads(log.read_text())
    episodes, row["ran"] = record["episodes"], record["steps"]
    returns: list[float] = []
    for wall_time, step, episode_return in episodes:
        returns = (returns + [episode_return])[-WINDOW:]
        if len(returns) == WINDOW and sum(returns) / WINDOW >= TARGET:
            row["steps"], row["train_s"] = step, wall_time - episodes[0][0]
            break
    return row


def peer_child(script: str, seed: int, log_path: str, torch_threads: int) -> None:
    """Runs in its own process: SB3 PPO or A2C with RL-Zoo's CartPole-v1 hyperparameters."""
    import torch
    from stable_baselines3 import A2C, PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    if torch_threads > 0:
        torch.set_num_threads(torch_threads)

    class RecordEpisodes(BaseCallback):
        """Notes (wall time, env steps, return) of every finished episode; stops once solved."""

        def __init__(self):
            super().__init__()
            self.episodes: list[tuple[float, int, float]] = []

        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:  # added by SB3's Monitor wrapper when an episode ends
                    episode_return = float(info["episode"]["r"])
                    self.episodes.append((time.time(), self.num_timesteps, episode_return))
            recent = [episode_return for _, _, episode_return in self.episodes[-WINDOW:]]
            return not (len(recent) == WINDOW and sum(recent) / WINDOW >= TARGET)

    def linear(start: float):
        return lambda progress_remaining: progress_remaining * start

    envs = make_vec_env("CartPole-v1", n_envs=8, seed=seed)
    common = {"ent_coef": 0.0, "seed": seed, "device": "cpu", "verbose": 0}
    if script == "ppo_cartpole":
        model = PPO(
            "MlpPolicy", envs, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98,
            n_epochs=20, learning_rate=linear(1e-3), clip_range=linear(0.2), **common,
        )  # fmt: skip
    else:
        model = A2C("MlpPolicy", envs, **common)
    callback = RecordEpisodes()
    model.learn(total_timesteps=PEERS[script][1], callback=callback)
    record = {"episodes": callback.episodes, "steps": model.num_timesteps}
    Path(log_path).write_text(json.dumps(record))


def describe(name: str, seed: int, row: dict) -> str:
    if row["steps"] is None:
        return f"{name:<13} seed {seed}  not solved in {row['ran']} steps"
    line = f"{name:<13} seed {seed}  solved at {row['steps']:>6d} steps"
    line += f", training {row['train_s']:5.2f} s"
    if row.get("end_step") is not None and row["end_step"] < row["steps"]:
        line += f" (to its last event, at step {row['end_step']})"
    if row.get("checkpoint_s") is not None:
        line += f" (+{row['checkpoint_s'] - row['train_s']:.2f} s to its checkpoint)"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--script", choices=sorted(PEERS), default="ppo_cartpole")
    parser.add_argument("--seeds", type=int, nargs="+", default=[4, 5, 6])
    parser.add_argument(
        "--peer-torch-threads", type=int, default=1,
        help="torch threads for SB3 (the scripts use 1); 0 keeps torch's default",
    )  # fmt: skip
    args = parser.parse_args()
    ours_name, peer_name = args.script, PEERS[args.script][0]

    ours_rows, peer_rows = [], []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as ours_dir, tempfile.TemporaryDirectory() as peer_dir:
            ours = run_ours(args.script, seed, ours_dir)
            evaluation = f"greedy eval {ours['eval']:5.1f} ± {ours['eval_std']:4.1f}"
            peak = f"peak {ours['peak_mib']:4.0f} MiB"
            print(f"{describe(ours_name, seed, ours)}  {evaluation}  {peak}", flush=True)
            peer = run_peer(args.script, seed, peer_dir, args.peer_torch_threads)
            print(
                f"{describe(peer_name, seed, peer)}  peak {peer['peak_mib']:4.0f} MiB", flush=True
            )
            ours_rows.append(ours)
            peer_rows.append(peer)

    def median(rows: list[dict], key: str) -> float | None:
        values = [row[key] for row in rows if row.get(key) is not None]
        return statistics.median(values) if values else None

    print()
    for label, ours_key, peer_key, digits in (
        ("steps to solve", "steps", "steps", 0),
        ("training time (s)", "train_s", "train_s", 2),
        ("ours to its checkpoint", "checkpoint_s", "train_s", 2),
        ("peak memory (MiB)", "peak_mib", "peak_mib", 0),
    ):
        ours, peer = median(ours_rows, ours_key), median(peer_rows, peer_key)
        if ours is None or peer is None:
            print(f"{label:<22} ours {ours}  peer {peer}  (no ratio: a side never solved)")
            continue
        print(
            f"{label:<22} median ours {ours:8.{digits}f}  peer {peer:8.{digits}f}  "
            f"peer / ours x{peer / ours:.2f}"
        )
    for name, rows in ((ours_name, ours_rows), (peer_name, peer_rows)):
        solved = sum(row["steps"] is not None for row in rows)
        print(f"{name} solved {solved} of {len(rows)} seeds")
    evals = [row["eval"] for row in ours_rows]
    passed = all(value >= TARGET for value in evals)
    print(f"greedy evaluation of ours >= {TARGET:.0f} on every seed: {passed} ({evals})")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--peer-child":
        peer_child(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
    else:
        main()
