"""Steps per second of ppo_atari.py against a straightforward CleanRL-style pipeline, same run.

Both train the same PPO (Nature CNN, 8 envs x 128 steps, 4 epochs x 4 minibatches) on the same game
for the same number of iterations, one after the other, each in a fresh process, with the same
number of torch threads:
  - ppo_atari          ppo_atari.py as shipped: ale-py's native C++ vector env, uint8 storage;
  - ppo_atari (gym)    ppo_atari.py --env-backend gymnasium: its learner on the peer's kind of env;
  - CleanRL-style peer bench_ppo_atari_peer.py: SyncVectorEnv + per-env Python wrappers, float32
                       storage, a tensor built from NumPy at every step.
Each is timed once without a profiler (the steps/s and the ratio come from this run) and once
under cProfile, to split the time between stepping the environments, the PPO update, and the
rest (acting, copies, GAE, logging). Machines are noisy: compare the ratios, not the seconds.

    python benchmarks/bench_ppo_atari.py [--iterations 3] [--env-id ALE/Pong-v5] [--repeats 1]

Measured on the shared 2-core Xeon (load average 7-9 from other jobs), Pong, 2 iterations, torch
threads 1: ppo_atari 1.27x and 1.48x the peer's steps/s in two runs (48 vs 38, 68 vs 46), its
learner on the peer's env (gym) 1.64-1.70x. The PPO update is ~70% of the loop in every pipeline
(env 13-20%, the rest 15-17%), so the env swap alone gains little; the channels-last convolutions
give most of the gain. Under such load the native env stepped only ~1.4x faster than the Python
loop (535 vs 380 agent steps/s, random actions), against ~4x on an idle machine.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = {
    "ppo_atari": ("ours", "ale"),
    "ppo_atari (gym)": ("ours", "gymnasium"),
    "CleanRL-style peer": ("peer", None),
}


def cumulative_time(
    stats: pstats.Stats, file_suffix: str, function: str, caller: str | None = None
) -> float:
    """Cumulative seconds of `function` (defined in a file ending with `file_suffix`), counting
    only the calls made from a function named `caller` when one is given."""
    total = 0.0
    for (filename, _, name), (_, _, _, cumulative, callers) in stats.stats.items():
        if name == function and filename.endswith(file_suffix):
            if caller is None:
                total += cumulative
            else:
                total += sum(entry[3] for (_, _, by), entry in callers.items() if by == caller)
    return total


def run_ours(env_id: str, backend: str, steps: int, threads: int, workdir: Path) -> float:
    """Train ppo_atari.py in-process; return the steps/s it logged over its training loop."""
    sys.path.insert(0, str(ROOT))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import ppo_atari

    args = ppo_atari.Args(
        env_id=env_id,
        env_backend=backend,
        total_timesteps=steps,
        torch_threads=threads,
        eval_episodes=1,
        save_model=False,
        cuda=False,
    )
    ppo_atari.main(args)
    (run_dir,) = (workdir / "runs").iterdir()
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    return accumulator.Scalars("charts/SPS")[-1].value


def run_peer(env_id: str, steps: int, threads: int) -> float:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_ppo_atari_peer as peer
    import torch

    torch.set_num_threads(threads)
    return peer.main(peer.Args(env_id=env_id, total_timesteps=steps))


def worker(
    which: str, backend: str | None, env_id: str, steps: int, threads: int, profile: bool
) -> dict:
    """One timed (or profiled) training run in this process; runs/ goes to a temporary folder."""
    import os

    with tempfile.TemporaryDirectory() as workdir:
        os.chdir(workdir)
        profiler = cProfile.Profile() if profile else None
        if profiler:
            profiler.enable()
        start = time.perf_counter()
        if which == "ours":
            sps = run_ours(env_id, backend, steps, threads, Path(workdir))
        else:
            sps = run_peer(env_id, steps, threads)
        result = {"sps": sps, "wall": time.perf_counter() - start}
        if profiler:
            profiler.disable()
            stats = pstats.Stats(profiler)
            loop = steps / sps
            # The envs' step as called by the training loop (`main`), not by the evaluation.
            if which == "ours":
                env = cumulative_time(
                    stats, "gymnasium/wrappers/vector/common.py", "step", caller="main"
                )
                update = cumulative_time(stats, "ppo_atari.py", "update")
            else:
                env = cumulative_time(
                    stats, "gymnasium/vector/sync_vector_env.py", "step", caller="main"
                )
                update = cumulative_time(stats, "bench_ppo_atari_peer.py", "ppo_update")
            result.update(env_share=env / loop, update_share=update / loop)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--env-id", default="ALE/Pong-v5")
    parser.add_argument(
        "--iterations", type=int, default=3, help="PPO iterations (1024 agent steps each)"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed runs of each pipeline, interleaved"
    )
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="torch threads of every pipeline"
    )
    parser.add_argument(
        "--no-profile", action="store_true", help="skip the profiled runs (time split)"
    )
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    options = parser.parse_args()

    if options.worker:
        which, backend, env_id, steps, threads, profile = options.worker
        result = worker(
            which,
            None if backend == "-" else backend,
            env_id,
            int(steps),
            int(threads),
            profile == "1",
        )
        print("RESULT " + json.dumps(result))
        return

    steps = options.iterations * 1024
    results: dict[str, list[dict]] = {name: [] for name in PIPELINES}
    profiles: dict[str, dict] = {}
    runs = [(name, False) for _ in range(options.repeats) for name in PIPELINES]
    if not options.no_profile:
        runs += [(name, True) for name in PIPELINES]
    for name, profile in runs:
        which, backend = PIPELINES[name]
        command = [
            sys.executable, __file__, "--worker", which, backend or "-", options.env_id,
            str(steps), str(options.torch_threads), "1" if profile else "0",
        ]  # fmt: skip
        completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
        if completed.returncode != 0 or not lines:
            sys.exit(f"{name} failed:\n{completed.stderr[-3000:]}")
        result = json.loads(lines[-1][len("RESULT ") :])
        (profiles.__setitem__(name, result) if profile else results[name].append(result))
        kind = "profiled" if profile else "timed"
        print(f"  {kind:8s} {name:20s} {result['sps']:7.1f} steps/s", file=sys.stderr, flush=True)

    peer_sps = sum(r["sps"] for r in results["CleanRL-style peer"]) / options.repeats
    print(
        f"\n{options.env_id}, {options.iterations} iterations x 1024 agent steps, "
        f"torch threads {options.torch_threads}, {options.repeats} timed run(s) each"
    )
    print(
        f"{'pipeline':22s} {'steps/s':>8s} {'vs peer':>8s} {'env':>6s} {'update':>7s} {'rest':>6s}"
    )
    for name in PIPELINES:
        sps = sum(r["sps"] for r in results[name]) / options.repeats
        split = ""
        if name in profiles:
            env, update = profiles[name]["env_share"], profiles[name]["update_share"]
            split = f" {env:6.0%} {update:7.0%} {1 - env - update:6.0%}"
        print(f"{name:22s} {sps:8.1f} {sps / peer_sps:7.2f}x{split}")
    print("(env / update / rest: shares of the training loop's time, from the profiled runs)")


if __name__ == "__main__":
    main()
