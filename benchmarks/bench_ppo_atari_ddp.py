"""ppo_atari.py alone against the same file under torchrun with 2 ranks, and the cost of a gradient
all-reduce, on this machine.

    python benchmarks/bench_ppo_atari_ddp.py                      # Pong, 4,096 agent steps each
    python benchmarks/bench_ppo_atari_ddp.py --total-timesteps 20480 --env-id ALE/Breakout-v5

1. One process, then `torchrun --standalone --nproc-per-node 2`, one after the other, with the same
   per-rank settings (the script's defaults, --torch-threads 1 for both: two ranks on two cores
   would otherwise fight over them): agent steps per second over the whole training, from the
   first to the last `charts/SPS` event (start-up and the final evaluation left out).
2. Communication: two gloo processes all-reduce a float32 tensor the size of the Nature CNN's
   parameters (what `mean_over_ranks` sends once per gradient step), 50 times; the median time, and
   that times the gradient steps of one update (epochs x minibatches).

On one 2-core machine two ranks share the cores that one process had: expect little or no
speed-up. The point is that they train correctly; the figures say what the communication costs.
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


def steady_sps(workdir: Path) -> tuple[float, int]:
    """(agent steps/s between the first and the last charts/SPS event, last step) of one run."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    events = []
    for event_file in sorted(workdir.rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(event_file)).Load():
            if any(value.tag == "charts/SPS" for value in event.summary.value):
                events.append((event.step, event.wall_time))
    (first_step, first_time), (last_step, last_time) = events[0], events[-1]
    return (last_step - first_step) / (last_time - first_time), last_step


def train(command: list[str], workdir: Path) -> tuple[float, int, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    start = time.time()
    process = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.time() - start
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{process.stderr[-3000:]}")
    sps, steps = steady_sps(workdir)
    return sps, steps, wall


def all_reduce_worker(rank: int, world: int, numel: int, repeats: int, port: int, queue) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tensor = torch.randn(numel)
    times = []
    for _ in range(repeats + 5):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(tensor)
        times.append(time.perf_counter() - start)
    dist.destroy_process_group()
    if rank == 0:
        queue.put(times[5:])  # the first few set up the connections


def all_reduce_ms(numel: int, repeats: int) -> float:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    workers = [
        context.Process(target=all_reduce_worker, args=(rank, 2, numel, repeats, port, queue))
        for rank in range(2)
    ]
    for worker in workers:
        worker.start()
    times = queue.get(timeout=300)
    for worker in workers:
        worker.join()
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--env-id", default="ALE/Pong-v5")
    parser.add_argument("--total-timesteps", type=int, default=4096)
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    import ppo_atari

    agent = ppo_atari.build_agent(args.env_id, ppo_atari.torch.device("cpu"), bf16=False)
    numel = sum(parameter.numel() for parameter in agent.parameters())
    defaults = ppo_atari.Args()
    steps_per_update = defaults.update_epochs * defaults.num_minibatches

    script = [
        str(ROOT / "ppo_atari.py"),
        "--env-id",
        args.env_id,
        "--total-timesteps",
        str(args.total_timesteps),
    ]
    script += ["--torch-threads", "1", "--eval-episodes", "1", "--no-save-model"]
    rows = []
    for name, launcher in (
        ("1 process", [sys.executable]),
        (
            "2 ranks (torchrun)",
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
            ],
        ),
    ):
        with tempfile.TemporaryDirectory() as workdir:
            sps, steps, wall = train(launcher + script, Path(workdir))
        rows.append((name, sps))
        print(
            f"{name:<20} {sps:7.1f} agent steps/s "
            f"(steady, {steps} steps; whole process {wall:.1f} s)",
            flush=True,
        )
    milliseconds = all_reduce_ms(numel, repeats=50)
    print(f"\nspeed-up of 2 ranks over 1 process: x{rows[1][1] / rows[0][1]:.2f}")
    print(
        f"all-reduce of the gradients ({numel:,} float32, gloo, 2 processes on this machine): "
        f"{milliseconds:.2f} ms median; x {steps_per_update} gradient steps = "
        f"{milliseconds * steps_per_update:.0f} ms per update"
    )


if __name__ == "__main__":
    main()
