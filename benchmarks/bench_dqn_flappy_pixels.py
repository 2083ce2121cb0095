"""Where the time of a pixel DQN step goes: dqn_flappy.py --obs-type pixels, before and after.

Three whole training runs, one after the other, each a child process with a sampling profiler
inside it (every 5 ms the main thread's Python stack is read and put in one bucket; the innermost
match wins, checked in this order):

  evaluation   the periodic greedy evaluations (keep_if_best) and the final one
  sampling     ReplayBuffer.sample inside dqn_update (drawing indices, gathering frame stacks)
  update       the rest of dqn_update: target and online forward passes, backward, Adam
  render       the game drawing its frame (its render / _draw_surface) inside the vector env's step
  preprocess   the PixelObservation wrapper apart from the drawing: crop, grayscale, resize
  env          the rest of the vector env's step: the game's logic, wrappers, frame stacking
  acting       the epsilon-greedy forward pass of main's loop
  storing      ReplayBuffer.add
  rest         anything else in main's loop (logging, the progress bar, checkpoints)

The runs:
  before            dqn_flappy.py as it was at --before-rev (read from git), its pixel settings
  before, same ratio  that script at the replay ratio of today's pixel defaults (batch 32 every
                    8 steps, 2 threads): what the pipeline alone gained
  after             today's dqn_flappy.py --obs-type pixels, its defaults

Start-up and the evaluations are left out of the shares. Steady agent steps/s is read from the
run's TensorBoard events (from the first log after learning starts to the last); peak resident
memory is the child's own.

    python benchmarks/bench_dqn_flappy_pixels.py                  # 6,000 agent steps a run
    python benchmarks/bench_dqn_flappy_pixels.py --steps 20000

Run it on a quiet machine: two runs at once share the cores and every figure is wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import runpy
import shlex
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "dqn_flappy.py"
# The script before the pixel speed work, and the flags of each run.
BEFORE_REV = "7264478"
RUNS = (
    ("before", "before", "--obs-type pixels"),
    ("before, same ratio", "before", "--obs-type pixels --batch-size 32 --torch-threads 2"),
    ("after", "after", "--obs-type pixels"),
)
LEARNING_STARTS = 2000
BUCKETS = ("render", "preprocess", "env", "acting", "update", "sampling", "storing", "rest")


def classify(frame) -> str:
    """The bucket of the main thread's Python stack whose innermost frame is `frame`."""
    names = []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    if "main" not in names or "make_envs" in names or "build_q_network" in names:
        return "outside"
    if "keep_if_best" in names or "final_evaluation" in names or "finish" in names:
        return "evaluation"
    if "dqn_update" in names:
        return "sampling" if "sample" in names else "update"
    if "step" in names or "reset" in names:  # the vector env's
        if "render" in names or "_draw_surface" in names:
            return "render"
        if "observation" in names:
            return "preprocess"
        return "env"
    if "add" in names:
        return "storing"
    if "forward" in names or "_call_impl" in names:
        return "acting"
    return "rest"


def worker(script: str, argv: list[str]) -> None:
    """Run `script` as __main__ in this process while sampling the main thread's stack."""
    main_thread = threading.main_thread().ident
    samples: Counter[str] = Counter()
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            frame = sys._current_frames().get(main_thread)
            if frame is not None:
                samples[classify(frame)] += 1

    sys.argv = [script, *argv]
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        done.set()
        sampler.join()
    print("SAMPLES " + json.dumps(dict(samples)))
    print(f"PEAK_RSS_MB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")


def steady_steps_per_s(workdir: Path) -> float:
    """Agent steps/s from the first charts/SPS event after learning starts to the last."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = Path(workdir).glob("runs/*")
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    logged = [e for e in events.Scalars("charts/SPS") if e.step > LEARNING_STARTS]
    first, last = logged[0], logged[-1]
    return (last.step - first.step) / (last.wall_time - first.wall_time)


def measure(name: str, script: str, flags: str, steps: int) -> dict:
    """One training run of `script` with `flags`: steady agent steps/s, peak memory, time split."""
    argv = [*shlex.split(flags), "--total-timesteps", str(steps), "--eval-freq", "0"]
    argv += ["--no-save-model", "--eval-episodes", "1", "--seed", "1", "--log-interval", "1000"]
    argv += ["--learning-starts", str(LEARNING_STARTS), "--max-episode-steps", "1000"]
    env = {
        **os.environ,
        "SDL_VIDEODRIVER": "dummy",
        "SDL_AUDIODRIVER": "dummy",
        "CUDA_VISIBLE_DEVICES": "",
        "TQDM_DISABLE": "1",
    }
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, __file__, "--worker", json.dumps([script, argv])]
        process = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        stdout, stderr = process.communicate()
        samples_line = [line for line in stdout.splitlines() if line.startswith("SAMPLES ")]
        if process.returncode != 0 or not samples_line:
            sys.exit(f"{name} failed (exit {process.returncode}):\n{stderr[-3000:]}")
        steps_per_s = steady_steps_per_s(Path(workdir))
    samples = json.loads(samples_line[-1][len("SAMPLES ") :])
    loop = sum(count for key, count in samples.items() if key not in ("outside", "evaluation"))
    split = {key: samples.get(key, 0) / max(loop, 1) for key in BUCKETS}
    peak = float(re.search(r"PEAK_RSS_MB (\d+)", stdout).group(1))
    return {
        "name": name,
        "flags": flags,
        "steps_per_s": steps_per_s,
        "ms_per_step": 1000.0 / steps_per_s,
        "split": split,
        "peak_mb": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=6_000, help="agent steps of each run")
    parser.add_argument("--before-rev", default=BEFORE_REV, help="git revision of 'before'")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker is not None:
        return worker(*json.loads(options.worker))
    with tempfile.TemporaryDirectory() as folder:
        before = Path(folder) / "dqn_flappy.py"
        source = subprocess.run(
            ["git", "show", f"{options.before_rev}:dqn_flappy.py"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        before.write_text(source)
        scripts = {"before": str(before), "after": str(SCRIPT)}
        results = [
            measure(name, scripts[which], flags, options.steps) for name, which, flags in RUNS
        ]
    width = max(len(result["name"]) for result in results) + 2
    header = f"{'':{width}s}{'agent steps/s':>14s}{'ms/step':>9s}{'peak MB':>9s}  "
    print("\n" + header + "".join(f"{bucket:>11s}" for bucket in BUCKETS))
    for result in results:
        shares = "".join(f"{100 * result['split'][bucket]:10.0f}%" for bucket in BUCKETS)
        speed = f"{result['steps_per_s']:14.1f}{result['ms_per_step']:9.2f}{result['peak_mb']:9.0f}"
        print(f"{result['name']:{width}s}{speed}  {shares}")
    for result in results:
        print(f"{result['name']}: {result['flags']}")
    first, *_, last = results
    same_ratio = last["steps_per_s"] / results[1]["steps_per_s"]
    print(f"ratio after / before: {last['steps_per_s'] / first['steps_per_s']:.2f}x; "
          f"after / before at the same replay ratio: {same_ratio:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
