"""Steps/s and peak memory of dqn_flappy.py against the same run with a deque-of-tuples buffer.

For each observation type it runs, one after the other in this process's machine:
  1. dqn_flappy.py (preallocated NumPy ring, each frame stored once);
  2. benchmarks/dqn_flappy_deque_peer.py: the same script and flags with the tutorials' buffer,
     a deque of (obs, action, reward, terminated, next_obs) tuples (pixels: two 4x84x84 stacks
     per transition);
  3. dqn_flappy.py with a buffer of two batches (too small to ever start learning): what the
     process needs without a buffer (torch, the env, the network). "buffer MB" is a run's peak
     minus this, so it also holds the learner's own allocations, the same for both runs.
Both buffers hold the same number of transitions and are filled past capacity. Peak memory is
the child's maximum resident set size (wait4); steps/s is what the script's `done:` line says.
Machines are noisy: read the ratios, which come from runs made back to back.

    python benchmarks/bench_dqn_flappy.py                     # features and pixels, a few minutes
    python benchmarks/bench_dqn_flappy.py --modes pixels --pixels-buffer 20000
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADLESS = {
    "SDL_VIDEODRIVER": "dummy",
    "SDL_AUDIODRIVER": "dummy",
    "CUDA_VISIBLE_DEVICES": "",
    "TQDM_DISABLE": "1",
}


def run(script: Path, flags: list[str], workdir: str) -> tuple[float, float]:
    """Run one training; return (steps/s, peak resident memory in MB)."""
    command = [sys.executable, str(script), *flags, "--no-save-model", "--eval-episodes", "1"]
    process = subprocess.Popen(
        command,
        cwd=workdir,
        env={**os.environ, **HEADLESS},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed with status {status}:\n{stdout}")
    match = re.search(r"\(([\d.]+) steps/s\)", stdout)
    if match is None:
        raise SystemExit(f"no 'done:' line in the output of {' '.join(command)}:\n{stdout}")
    return float(match.group(1)), usage.ru_maxrss / 1024.0  # ru_maxrss is in KiB on Linux


def compare(mode: str, flags: list[str], buffer_size: int, batch_size: int) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        sized = [*flags, "--buffer-size", str(buffer_size), "--batch-size", str(batch_size)]
        ours = run(ROOT / "dqn_flappy.py", sized, workdir)
        peer = run(ROOT / "benchmarks" / "dqn_flappy_deque_peer.py", sized, workdir)
        bare = run(
            ROOT / "dqn_flappy.py",
            [*flags, "--buffer-size", str(2 * batch_size), "--batch-size", str(batch_size)],
            workdir,
        )
    ours_buffer, peer_buffer = max(ours[1] - bare[1], 1.0), max(peer[1] - bare[1], 1.0)
    print(f"\n{mode}: {' '.join(flags)} --buffer-size {buffer_size} --batch-size {batch_size}")
    print(f"  {'':34s}{'steps/s':>10s}{'peak MB':>10s}{'buffer MB':>11s}")
    print(f"  {'dqn_flappy.py (NumPy ring)':34s}{ours[0]:10.0f}{ours[1]:10.0f}{ours_buffer:11.0f}")
    print(f"  {'deque-of-tuples peer':34s}{peer[0]:10.0f}{peer[1]:10.0f}{peer_buffer:11.0f}")
    print(
        f"  {'dqn_flappy.py, two-batch buffer':34s}{'(idle)':>10s}{bare[1]:10.0f}"
        "   (memory baseline: it never trains)"
    )
    print(
        f"  ratios: {ours[0] / peer[0]:.2f}x the peer's steps/s,"
        f" {peer[1] / ours[1]:.2f}x less peak memory,"
        f" {peer_buffer / ours_buffer:.1f}x less buffer memory"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--modes", nargs="+", default=["features", "pixels"], choices=["features", "pixels"]
    )
    parser.add_argument("--features-steps", type=int, default=30_000)
    parser.add_argument("--features-buffer", type=int, default=20_000)
    parser.add_argument("--pixels-steps", type=int, default=5_200)
    parser.add_argument("--pixels-buffer", type=int, default=5_000)
    options = parser.parse_args()
    common = ["--max-episode-steps", "500", "--seed", "1"]
    if "features" in options.modes:
        steps = ["--total-timesteps", str(options.features_steps), "--learning-starts", "2000"]
        compare("features", [*common, *steps], options.features_buffer, 128)
    if "pixels" in options.modes:
        steps = [
            "--total-timesteps",
            str(options.pixels_steps),
            "--learning-starts",
            str(options.pixels_buffer),
        ]
        compare(
            "pixels",
            [*common, "--obs-type", "pixels", *steps, "--train-frequency", "8"],
            options.pixels_buffer,
            32,
        )


if __name__ == "__main__":
    main()
