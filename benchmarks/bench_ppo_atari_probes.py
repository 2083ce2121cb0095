"""Two speed levers of ppo_atari.py side by side on whole Pong runs: torch.compile, --num-envs.

Each variant trains ppo_atari.py on ALE/Pong-v5 for the same agent-step budget, in a fresh process,
one after the other, every setting its default unless the variant names it:
  - default                 8 envs x 128 steps, 4 epochs x 4 minibatches (minibatch 256);
  - compiled network        the default with the network's trunk (the 3 convolutions and the
                            hidden layer, where the time goes) wrapped in torch.compile (inductor
                            on CPU); the compiling happens inside the run, so it is paid for;
  - --num-envs 16/32/64     more games per rollout (the 4 minibatches grow with the rollout, so
                            each sample still gets 4 passes: the update's work per step is equal);
  - any --variant "NAME=FLAGS" given on the command line (e.g. a candidate fast configuration).
Reported per variant: steady agent steps/s (between the first and last charts/SPS points of the
run's TensorBoard events, the first iteration left out), the whole process's wall time (start-up,
compiling and the one-game evaluation included) and the ratio of each to the default's.

    python benchmarks/bench_ppo_atari_probes.py [--total-timesteps 24576] [--skip-compile]
        [--variant "fast=--num-envs 64 --update-epochs 2"]

The budget must be a multiple of every variant's rollout (64 x 128 = 8192) for all variants to
train the same number of steps. Run it on a quiet machine: the ratios mean nothing otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def worker(argv: list[str], compile_trunk: bool) -> None:
    """Train ppo_atari.py in this process, its network's trunk compiled when asked."""
    import torch

    import ppo_atari

    if compile_trunk:
        build_agent = ppo_atari.build_agent

        def build_compiled_agent(*args, **kwargs):
            agent = build_agent(*args, **kwargs)
            agent.trunk = torch.compile(agent.trunk)
            return agent

        ppo_atari.build_agent = build_compiled_agent
    sys.argv = ["ppo_atari.py", *argv]
    ppo_atari.main(ppo_atari.parse_args())


def run_variant(name: str, argv: list[str], compile_trunk: bool) -> dict:
    from bench_ppo_atari_cleanrl import sps_from_events

    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, __file__, "--worker", json.dumps([argv, compile_trunk])]
        env = {**os.environ, "WANDB_MODE": "offline", "TQDM_DISABLE": "1"}
        start = time.perf_counter()
        completed = subprocess.run(command, cwd=workdir, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if completed.returncode != 0:
            sys.exit(f"{name} failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}")
        steady, _, steps = sps_from_events(Path(workdir) / "runs")
    return {"steady": steady, "wall": wall, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--total-timesteps", type=int, default=24576, help="agent steps per run")
    parser.add_argument("--skip-compile", action="store_true", help="no compiled variant")
    parser.add_argument(
        "--variant", action="append", default=[], help='an extra variant, "NAME=FLAGS"'
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        argv, compile_trunk = json.loads(options.worker)
        worker(argv, compile_trunk)
        return

    common = ["--total-timesteps", str(options.total_timesteps), "--eval-episodes", "1"]
    common += ["--no-save-model", "--checkpoint-freq", "0"]
    variants: dict[str, tuple[list[str], bool]] = {"default": ([], False)}
    if not options.skip_compile:
        variants["compiled network"] = ([], True)
    for num_envs in (16, 32, 64):
        variants[f"--num-envs {num_envs}"] = (["--num-envs", str(num_envs)], False)
    for text in options.variant:
        name, _, flags = text.partition("=")
        variants[name] = (shlex.split(flags), False)

    results = {}
    for name, (flags, compile_trunk) in variants.items():
        print(f"running {name}: {' '.join(flags)} ...", file=sys.stderr, flush=True)
        results[name] = run_variant(name, common + flags, compile_trunk)

    base = results["default"]
    print(
        f"\nALE/Pong-v5, {options.total_timesteps} agent steps per run, one after the other "
        f"(cpu_count {os.cpu_count()})"
    )
    print(f"{'variant':32s} {'steps/s':>8s} {'x':>6s} {'wall s':>7s} {'x':>6s}")
    for name, result in results.items():
        print(
            f"{name:32s} {result['steady']:8.1f} {result['steady'] / base['steady']:5.2f}x "
            f"{result['wall']:7.1f} {base['wall'] / result['wall']:5.2f}x"
        )
    print(
        "steps/s: steady, between the first and last charts/SPS points (first iteration left "
        "out); wall: the whole process (start-up, compiling, one evaluation game); x: against "
        "the default (higher is faster)"
    )


if __name__ == "__main__":
    main()
