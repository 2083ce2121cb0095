"""bfloat16 autocast against fp32 for ppo_atari.py's network on this machine, interleaved.

Times what the training loop does with the network, with ppo_atari.py's own code:
  - one PPO minibatch step (`update` with 1 epoch of 1 minibatch of --minibatch samples: forward,
    backward, gradient clipping, Adam), Nature CNN, channels-last, uint8 frames;
  - one acting forward pass over --num-envs frames (inference mode).
fp32 and bf16 alternate (ABAB..., the order flipped every other round) in one process, so that
a busy machine slows both alike; the medians and minima of the repetitions are printed. On a CPU
without native bf16 (no AVX512-BF16/AMX), ppo_atari.py ignores --bf16; this measures the
emulated path anyway.

    python benchmarks/bench_ppo_atari_bf16.py [--threads 1 2] [--repeats 20]

Measured on the project's 2-core AMD EPYC (Zen 4, AVX512-BF16, no AMX), shared with 5 other jobs
(load ~5), 30 interleaved repetitions, 1 thread: minibatch of 256 fp32 421 ms vs bf16 261 ms
median (1.61x; minima 223 vs 128 ms, 1.74x); acting on 8 frames 7.1 vs 5.1 ms (1.39x). A second
run (load ~3.5, 10 repetitions): 1 thread 259 vs 179 ms (1.45x; minima 1.56x), acting 1.32x;
2 threads 330 vs 313 ms median, minima 132 vs 120 ms (1.10x): on a loaded machine two threads
wait for each other (medians worse than one thread), and their minima (the quiet moments) show a
smaller bf16 gain than one thread does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ppo_atari  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--minibatch", type=int, default=256)
    parser.add_argument("--num-envs", type=int, default=8)
    options = parser.parse_args()
    device = torch.device("cpu")
    print(f"native bf16 on this CPU: {ppo_atari.native_bf16(device)}")

    generator = torch.Generator().manual_seed(0)
    size = options.minibatch
    obs = torch.randint(0, 256, (size, 4, 84, 84), dtype=torch.uint8, generator=generator)
    actions = torch.randint(0, 6, (size,), generator=generator)
    logprobs = torch.full((size,), -torch.log(torch.tensor(6.0)).item())
    advantages, returns = (
        torch.randn(size, generator=generator),
        torch.randn(size, generator=generator),
    )
    values = torch.zeros(size)
    keep = torch.arange(size)
    args = ppo_atari.Args(num_envs=1, num_steps=size, num_minibatches=1, update_epochs=1)

    agents, optimizers = {}, {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        agent = ppo_atari.Agent(6, bf16=bf16).to(device, memory_format=torch.channels_last)
        agents[bf16], optimizers[bf16] = (
            agent,
            torch.optim.Adam(agent.parameters(), lr=2.5e-4, eps=1e-5),
        )

    def minibatch_step(bf16: bool) -> float:
        start = time.perf_counter()
        ppo_atari.update(
            agents[bf16],
            optimizers[bf16],
            args,
            keep,
            obs,
            actions,
            logprobs,
            advantages,
            returns,
            values,
        )
        return time.perf_counter() - start

    @torch.inference_mode()
    def act(bf16: bool) -> float:
        start = time.perf_counter()
        for _ in range(10):
            agents[bf16].get_action_and_value(obs[: options.num_envs])
        return (time.perf_counter() - start) / 10

    for threads in options.threads:
        torch.set_num_threads(threads)
        for bf16 in (False, True, False, True):  # warm-up: oneDNN picks and caches its kernels
            minibatch_step(bf16)
            act(bf16)
        times = {(kind, bf16): [] for kind in ("update", "act") for bf16 in (False, True)}
        for repeat in range(options.repeats):
            for bf16 in (False, True) if repeat % 2 == 0 else (True, False):
                times["update", bf16].append(minibatch_step(bf16))
                times["act", bf16].append(act(bf16))
        for kind, label in (
            ("update", f"minibatch of {size}"),
            ("act", f"acting on {options.num_envs}"),
        ):
            fp32, bf16 = times[kind, False], times[kind, True]
            print(
                f"threads {threads}, {label:16s}: fp32 {statistics.median(fp32) * 1e3:7.1f} ms "
                f"(min {min(fp32) * 1e3:6.1f}), bf16 {statistics.median(bf16) * 1e3:7.1f} ms "
                f"(min {min(bf16) * 1e3:6.1f}); "
                f"fp32/bf16 {statistics.median(fp32) / statistics.median(bf16):.2f}x "
                f"median, {min(fp32) / min(bf16):.2f}x min"
            )


if __name__ == "__main__":
    main()
