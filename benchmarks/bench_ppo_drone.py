"""ppo_drone.py's training loop against the simulator alone (its limit), side by side in one run.

    python benchmarks/bench_ppo_drone.py                      # 1024 drones, 3 rounds
    python benchmarks/bench_ppo_drone.py --num-envs 4096 --rounds 1

Each round runs, one after the other (never at once: they would share the cores), each in its
own fresh process:
  - sim:      crazyflow's DroneFigureEightTrajectory-v0 at 50 Hz with NormalizeActions, stepped
              with uniform random actions drawn by JAX on the simulation's device: the most env
              steps per second any training loop on this simulator can reach;
  - pipeline: the same drones through ppo_drone.py's own env stack (flat observations, attitude
              penalty, JaxToTorch, observation normalisation), random torch actions: what the
              loop pays for the env before any learning;
  - train:    ppo_drone.py itself with its defaults except the step budget; its steps/s is read
              from the TensorBoard events between the first and the last iteration, so neither
              the JAX compilation of the first step nor the final evaluation is counted.
The closing lines give the medians and the ratios train / sim and pipeline / sim (the issue's
target: train at >= 40% of the simulator's own rate at 1024 drones).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV_ID = "DroneFigureEightTrajectory-v0"


def sim_child(num_envs: int, steps: int, pipeline: bool) -> None:
    """Runs in its own process; prints the env steps per second of `steps` random steps."""
    sys.path.insert(0, str(ROOT))
    # isort: off
    import ppo_drone  # imports crazyflow first, as it must be (before anything importing scipy)
    import gymnasium as gym
    import jax
    import torch
    from crazyflow.envs import NormalizeActions

    # isort: on

    torch.set_num_threads(1)
    if pipeline:
        envs = ppo_drone.make_envs(ppo_drone.Args(), num_envs, "cpu", torch.device("cpu"))
        envs.reset(seed=0)
        action_dim = envs.single_action_space.shape[0]  # roll, pitch, thrust: yaw is held at 0

        def step(_):
            obs, reward, *_ = envs.step(torch.rand(num_envs, action_dim) * 2 - 1)
            return reward
    else:
        envs = NormalizeActions(gym.make_vec(ENV_ID, num_envs=num_envs, freq=50, device="cpu"))
        envs.reset(seed=0)
        key = jax.random.key(0)

        def step(index):
            action = jax.random.uniform(
                jax.random.fold_in(key, index), (num_envs, 4), minval=-1.0, maxval=1.0
            )
            _, reward, *_ = envs.step(action)
            return reward

    for index in range(20):  # compile, and let every jitted function reach its steady state
        step(index)
    jax.block_until_ready(step(20))
    start = time.perf_counter()
    for index in range(steps):
        reward = step(index)
    jax.block_until_ready(reward) if not pipeline else float(reward.sum())
    print(steps * num_envs / (time.perf_counter() - start))


def run_sim(num_envs: int, steps: int, pipeline: bool) -> float:
    command = [sys.executable, __file__, "--child", str(num_envs), str(steps), str(int(pipeline))]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"simulator run failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def run_train(num_envs: int, total_timesteps: int) -> float:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    with tempfile.TemporaryDirectory() as workdir:
        command = [
            sys.executable, str(ROOT / "ppo_drone.py"), "--num-envs", str(num_envs),
            "--total-timesteps", str(total_timesteps), "--no-save-model",
            "--eval-episodes", "1", "--num-eval-envs", "1",
        ]  # fmt: skip
        done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"ppo_drone.py failed:\n{done.stderr[-3000:]}")
        marks = []  # (wall time, env step) at the end of every iteration
        for event_file in Path(workdir).rglob("events.out.tfevents.*"):
            for event in EventFileLoader(str(event_file)).Load():
                if any(value.tag == "charts/SPS" for value in event.summary.value):
                    marks.append((event.wall_time, event.step))
    marks.sort()
    if len(marks) < 3:
        raise SystemExit("too few iterations to time: raise --total-timesteps")
    (first_time, first_step), (last_time, last_step) = marks[0], marks[-1]
    return (last_step - first_step) / (last_time - first_time)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-envs", type=int, default=1024)
    parser.add_argument(
        "--total-timesteps", type=int, default=16384 * 12, help="training budget per round"
    )
    parser.add_argument(
        "--sim-steps", type=int, default=300, help="random steps of every drone per sim round"
    )
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    rates: dict[str, list[float]] = {"sim": [], "pipeline": [], "train": []}
    for round_index in range(1, args.rounds + 1):
        rates["sim"].append(run_sim(args.num_envs, args.sim_steps, pipeline=False))
        rates["pipeline"].append(run_sim(args.num_envs, args.sim_steps, pipeline=True))
        rates["train"].append(run_train(args.num_envs, args.total_timesteps))
        print(
            f"round {round_index}: sim {rates['sim'][-1]:9.0f}  "
            f"pipeline {rates['pipeline'][-1]:9.0f}  "
            f"train {rates['train'][-1]:9.0f} env steps/s ({args.num_envs} drones)",
            flush=True,
        )
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(
        f"median env steps/s: sim {median['sim']:.0f}, pipeline {median['pipeline']:.0f}, "
        f"train {median['train']:.0f}"
    )
    print(
        f"ratios: train / sim = {median['train'] / median['sim']:.1%}, "
        f"pipeline / sim = {median['pipeline'] / median['sim']:.1%} (target: train >= 40%)"
    )


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        sim_child(int(sys.argv[2]), int(sys.argv[3]), bool(int(sys.argv[4])))
    else:
        main()
