"""actor_critic.py against Stable-Baselines3 A2C on CartPole-v1, side by side in one run.

    pip install -r requirements.txt -r benchmarks/requirements.txt
    python benchmarks/bench_actor_critic.py --seeds 1 2 3

For each seed the two are run one after the other (never at once: they would share the cores),
each in its own process started from scratch, so the times include interpreter start and imports
for both. The peer is SB3's A2C with the RL-Zoo hyperparameters for CartPole-v1 (8 envs,
ent_coef 0, SB3's defaults otherwise: 5 steps, RMSprop with lr 7e-4, gamma 0.99, lambda 1, value
coefficient 0.5, gradient norm 0.5; up to 500k steps). The peer stops as soon as it has solved (or
at 500k steps): its time to solve is unaffected, and a slow peer does not hold the benchmark for
minutes. actor_critic.py runs its default budget. For each seed it reports:
  - ours: the default command (`python actor_critic.py --seed S`) as a whole process, from launch to
    exit: it trains until its greedy policy is solved (--stop-when-solved), evaluates it on 10
    other episodes and saves the checkpoint; the step it stopped at and that final evaluation;
  - the peer: its time to solve, the first moment the mean return of the last 20 finished training
    episodes reaches 475, measured from process launch (wall clock) and in environment steps;
  - steps/s over the whole run; peak resident memory of the process (ru_maxrss).
The closing lines give the median ratios peer / ours (a ratio above 1 favours ours): the time a
user waits for a solved agent is our whole process against the peer's time to solve.
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


def first_solved(episodes: list[tuple[float, int, float]], start: float) -> tuple[float, int] | None:
    """(seconds since start, env steps) at which the mean of the last WINDOW returns hits TARGET."""
    returns: list[float] = []
    for wall_time, step, episode_return in episodes:
        returns = (returns + [episode_return])[-WINDOW:]
        if len(returns) == WINDOW and sum(returns) / WINDOW >= TARGET:
            return wall_time - start, step
    return None


def run_measured(command: list[str], cwd: str) -> tuple[float, float, float, str]:
    """Run a process to completion; return (launch time, wall seconds, peak RSS in MiB, stdout)."""
    start = time.time()
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, cwd=cwd, stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.time() - start
        stdout.seek(0), stderr.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{stderr.read().decode()[-3000:]}")
        return start, wall, usage.ru_maxrss / 1024, stdout.read().decode()  # ru_maxrss: KiB on Linux


def run_ours(seed: int, workdir: str) -> dict:
    """The default command, as a user runs it; its summary line says where it stopped and scored."""
    command = [sys.executable, str(ROOT / "actor_critic.py"), "--seed", str(seed)]
    start, wall, peak, stdout = run_measured(command, workdir)
    summary = stdout.strip().splitlines()[-1]
    steps = int(re.search(r"done: (\d+) steps", summary).group(1))
    solved = re.search(r"solved at step (\d+);", summary)
    evaluation = re.search(r"eval return (-?[\d.]+) ± ([\d.]+)", summary)
    return {
        "wall": wall,
        "peak_mib": peak,
        "steps": steps,
        "solved_steps": int(solved.group(1)) if solved else None,
        "eval_mean": float(evaluation.group(1)),
        "eval_std": float(evaluation.group(2)),
    }


def run_peer(seed: int, workdir: str, torch_threads: int) -> dict:
    log = Path(workdir) / "episodes.json"
    command = [sys.executable, __file__, "--peer-child", str(seed), str(log), str(torch_threads)]
    start, wall, peak, _ = run_measured(command, workdir)
    record = json.loads(log.read_text())
    return {
        "start": start,
        "wall": wall,
        "peak_mib": peak,
        "episodes": record["episodes"],
        "steps": record["steps"],
    }


def peer_child(seed: int, log_path: str, torch_threads: int) -> None:
    """Runs in its own process: SB3 A2C with RL-Zoo's CartPole-v1 hyperparameters."""
    import torch
    from stable_baselines3 import A2C
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    if torch_threads > 0:
        torch.set_num_threads(torch_threads)

    class RecordEpisodes(BaseCallback):
        def __init__(self):
            super().__init__()
            self.episodes: list[tuple[float, int, float]] = []
            self.recent: list[float] = []

        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:  # added by SB3's Monitor wrapper when an episode ends
                    self.episodes.append((time.time(), self.num_timesteps, float(info["episode"]["r"])))
                    self.recent = (self.recent + [float(info["episode"]["r"])])[-WINDOW:]
            # Stop once solved (same rule as first_solved): only time and steps to solve are compared.
            return not (len(self.recent) == WINDOW and sum(self.recent) / WINDOW >= TARGET)

    envs = make_vec_env("CartPole-v1", n_envs=8, seed=seed)
    model = A2C("MlpPolicy", envs, ent_coef=0.0, seed=seed, device="cpu", verbose=0)
    callback = RecordEpisodes()
    model.learn(total_timesteps=500_000, callback=callback)
    Path(log_path).write_text(json.dumps({"episodes": callback.episodes, "steps": model.num_timesteps}))


def summarise_ours(seed: int, run: dict) -> dict:
    row = {
        "impl": "actor_critic",
        "seed": seed,
        "agent_s": run["wall"],  # the whole process: a solved (or not) agent, evaluated and saved
        "solve_steps": run["solved_steps"],
        "sps": run["steps"] / run["wall"],
        "peak_mib": run["peak_mib"],
        "eval": run["eval_mean"],
    }
    stop = f"solved at {run['solved_steps']:>6d}" if run["solved_steps"] else "   not solved    "
    print(
        f"{row['impl']:<14} seed {seed}  whole process {run['wall']:6.1f}s  {stop}  "
        f"greedy eval {run['eval_mean']:6.1f} ± {run['eval_std']:5.1f}  {row['sps']:6.0f} steps/s  "
        f"peak {run['peak_mib']:4.0f} MiB",
        flush=True,
    )
    return row


def summarise_peer(seed: int, run: dict) -> dict:
    solved = first_solved(run["episodes"], run["start"])
    row = {
        "impl": "sb3_a2c",
        "seed": seed,
        "agent_s": solved[0] if solved else None,  # from launch to the first solved training mean
        "solve_steps": solved[1] if solved else None,
        "sps": run["steps"] / run["wall"],
        "peak_mib": run["peak_mib"],
        "eval": None,
    }
    solve = f"solved after {solved[0]:5.1f}s at {solved[1]:>6d}" if solved else "never solved"
    print(
        f"{row['impl']:<14} seed {seed}  {solve} (run {run['wall']:5.1f}s)  "
        f"{row['sps']:6.0f} steps/s  peak {run['peak_mib']:4.0f} MiB",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[4, 5, 6])
    parser.add_argument(
        "--peer-torch-threads", type=int, default=1,
        help="torch threads for SB3 (actor_critic.py uses 1); 0 keeps torch's default",
    )  # fmt: skip
    args = parser.parse_args()

    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as ours_dir, tempfile.TemporaryDirectory() as peer_dir:
            rows.append(summarise_ours(seed, run_ours(seed, ours_dir)))
            rows.append(summarise_peer(seed, run_peer(seed, peer_dir, args.peer_torch_threads)))

    def median(impl: str, key: str) -> float | None:
        values = [row[key] for row in rows if row["impl"] == impl and row[key] is not None]
        return statistics.median(values) if values else None

    print()
    for key, label in (
        ("agent_s", "time to a solved agent"),
        ("solve_steps", "steps to solve"),
        ("sps", "steps/s"),
        ("peak_mib", "peak memory"),
    ):
        ours, peer = median("actor_critic", key), median("sb3_a2c", key)
        if ours is None or peer is None:
            print(f"{label:<23} ours {ours}  peer {peer}  (no ratio: a side never solved)")
            continue
        ratio = ours / peer if key == "sps" else peer / ours
        print(f"{label:<23} median ours {ours:9.1f}  peer {peer:9.1f}  advantage of ours x{ratio:.2f}")
    evals = [row["eval"] for row in rows if row["impl"] == "actor_critic"]
    print(f"greedy evaluation of ours, every seed >= 475: {all(value >= 475 for value in evals)} ({evals})")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--peer-child":
        peer_child(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    else:
        main()
