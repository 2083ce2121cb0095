"""Steps per second of ppo_atari.py against CleanRL's own ppo_atari.py, both with their defaults.

What a new user would compare: each script as shipped, on Pong, for the same agent-step budget,
one after the other in one invocation, each in a fresh process:
  - CleanRL   cleanrl/ppo_atari.py from a CleanRL checkout (--cleanrl-repo; a bare git repository
              is read with `git show`), with the five edits it needs on gymnasium 1.x / ale-py 0.12
              applied at run time into a temporary folder (patch_cleanrl: register ale-py's ids,
              two renamed wrappers, same-step autoreset, gymnasium 1.x's episode infos; none
              touches the algorithm), run as `ppo_atari.py --env-id PongNoFrameskip-v4 --no-cuda
              --total-timesteps N`, every other setting its default (torch's default threads);
  - ppo_atari ppo_atari.py --total-timesteps N (ALE/Pong-v5 and every other setting its default;
              --eval-episodes 1 and --no-save-model only shorten what follows training).
Nothing of CleanRL is copied into this project: the file is read and patched when this runs.

Reported per script:
  - steps/s, steady: (last step - first step) / (wall time between them) of the charts/SPS
    points in the run's TensorBoard events: the first iteration (start-up, warm-up) is left out,
    the same rule for both scripts. This is the figure the ratio uses.
  - charts/SPS, last: each script's own figure (CleanRL counts from just before its env reset,
    ppo_atari.py from before building its envs and network).
  - the time split of the training loop (env stepping / acting / PPO update / rest), from a
    sampling profiler inside each process: every 5 ms the main thread's Python stack is read and
    attributed (the env's step below the loop; the update; the acting forward pass; the rest).

    python benchmarks/bench_ppo_atari_cleanrl.py [--total-timesteps 20480]
        [--cleanrl-repo /work/.mirror/vwxyzjn+cleanrl/repo] [--ours-args "--no-bf16"]

Run it on a quiet machine: the ratio is only meaningful when nothing else competes for the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REPO = "/work/.mirror/vwxyzjn+cleanrl/repo"


def read_cleanrl_file(repo: Path, path: str) -> str:
    """A file of the CleanRL checkout: from its work tree, or with `git show` from a bare repo."""
    if (repo / path).is_file():
        return (repo / path).read_text()
    completed = subprocess.run(
        ["git", "-C", str(repo), "show", f"HEAD:{path}"], capture_output=True, text=True
    )
    if completed.returncode != 0:
        sys.exit(f"error: cannot read {path} from {repo}: {completed.stderr.strip()}")
    return completed.stdout


def replace_once(source: str, old: str, new: str, what: str) -> str:
    if source.count(old) != 1:
        sys.exit(
            f"error: CleanRL's ppo_atari.py changed; edit '{what}' "
            f"found {source.count(old)} matches"
        )
    return source.replace(old, new)


def patch_cleanrl(source: str) -> str:
    """The five edits that let CleanRL's ppo_atari.py run on gymnasium 1.x / ale-py 0.12."""
    # 1. ale-py's ids are registered only once ale_py is imported and registered.
    source = replace_once(
        source,
        "import gymnasium as gym\n",
        "import gymnasium as gym\nimport ale_py\n\ngym.register_envs(ale_py)\n",
        "1",
    )
    # 2., 3. renamed wrappers.
    source = replace_once(
        source,
        "gym.wrappers.GrayScaleObservation(env)",
        "gym.wrappers.GrayscaleObservation(env)",
        "2",
    )
    source = replace_once(
        source,
        "gym.wrappers.FrameStack(env, 4)",
        "gym.wrappers.FrameStackObservation(env, stack_size=4)",
        "3",
    )
    # 4. its loop assumes same-step autoreset (gymnasium 0.29's behaviour).
    source = replace_once(
        source,
        "[make_env(args.env_id, i, args.capture_video, run_name) for i in range(args.num_envs)],\n",
        "[make_env(args.env_id, i, args.capture_video, run_name) for i in range(args.num_envs)],\n"
        "        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,\n",
        "4",
    )
    # 5. final_info is a dict of batched arrays in gymnasium 1.x.
    old_logging = re.search(
        r"( *)if \"final_info\" in infos:\n.*?"
        r"writer\.add_scalar\(\"charts/episodic_length\"[^\n]*\n",
        source,
        re.S,
    )
    if old_logging is None:
        sys.exit("error: CleanRL's ppo_atari.py changed; edit '5' found no episode logging")
    pad = old_logging.group(1)
    new_logging = (
        f'{pad}if "final_info" in infos and "_episode" in infos["final_info"]:\n'
        f'{pad}    for i in np.flatnonzero(infos["final_info"]["_episode"]):\n'
        f'{pad}        episode = infos["final_info"]["episode"]\n'
        f'{pad}        print(f"global_step={{global_step}}, '
        f"episodic_return={{episode['r'][i]}}\")\n"
        f'{pad}        writer.add_scalar("charts/episodic_return", episode["r"][i], global_step)\n'
        f'{pad}        writer.add_scalar("charts/episodic_length", episode["l"][i], global_step)\n'
    )
    return source[: old_logging.start()] + new_logging + source[old_logging.end() :]


def prepare_cleanrl(repo: Path, folder: Path) -> Path:
    """Write the patched script and the wrappers it imports into `folder`; return the script."""
    (folder / "cleanrl_utils").mkdir(parents=True)
    (folder / "cleanrl_utils" / "__init__.py").write_text("")
    wrappers = read_cleanrl_file(repo, "cleanrl_utils/atari_wrappers.py")
    (folder / "cleanrl_utils" / "atari_wrappers.py").write_text(wrappers)
    script = folder / "ppo_atari.py"
    script.write_text(patch_cleanrl(read_cleanrl_file(repo, "cleanrl/ppo_atari.py")))
    return script


# --- inside each worker process ------------------------------------------------------------------


def loop_ranges(script: Path) -> dict[str, tuple[int, int]]:
    """Line ranges of CleanRL's rollout and update (its loop is module-level, not functions)."""
    lines = script.read_text().splitlines()

    def first(pattern: str) -> int:
        return next(number for number, line in enumerate(lines, 1) if pattern in line)

    return {
        "rollout": (
            first("for step in range(0, args.num_steps)"),
            first("# bootstrap value if not done"),
        ),
        "update": (first("for epoch in range(args.update_epochs)"), first("y_pred, y_true")),
    }


def classify(frame, script: str, ranges: dict | None) -> str:
    """What the main thread is doing, from its Python stack (innermost frame `frame`)."""
    names, files, script_line = [], [], None
    while frame is not None:
        filename = frame.f_code.co_filename
        names.append(frame.f_code.co_name)
        files.append(filename)
        if filename == script:  # the outermost one wins: CleanRL's loop is module-level code
            script_line = frame.f_lineno
        frame = frame.f_back
    in_env = any(("/gymnasium/" in f or "ale_py" in f or "cleanrl_utils" in f) for f in files)
    if ranges is None:  # ppo_atari.py: the loop is made of functions
        if "update" in names:
            return "update"
        if (
            "main" not in names
            or "evaluate" in names
            or "make_envs" in names
            or "build_agent" in names
        ):
            return "outside"
        if in_env and ("step" in names or "recv" in names):
            return "env"
        if "get_action_and_value" in names:
            return "acting"
        return "rest"
    if script_line is None:
        return "outside"
    if ranges["update"][0] <= script_line <= ranges["update"][1]:
        return "update"
    if ranges["rollout"][0] <= script_line <= ranges["rollout"][1]:
        if in_env:
            return "env"
        if "get_action_and_value" in names:
            return "acting"
        return "rest"
    # The loop's other module-level lines (GAE, logging) count as rest; start-up does not.
    return "rest" if script_line > ranges["rollout"][0] - 10 else "outside"


def worker(which: str, script: Path, argv: list[str]) -> None:
    """Run `script` as __main__ in this process while sampling the main thread's stack."""
    main_thread = threading.main_thread().ident
    ranges = loop_ranges(script) if which == "cleanrl" else None
    samples: Counter[str] = Counter()
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            frame = sys._current_frames().get(main_thread)
            if frame is not None:
                samples[classify(frame, str(script), ranges)] += 1

    sys.argv = [str(script), *argv]
    sys.path.insert(0, str(script.parent))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        done.set()
        sampler.join()
    print("SAMPLES " + json.dumps(dict(samples)))


def sps_from_events(runs: Path) -> tuple[float, float, int]:
    """(steady steps/s between the first and last charts/SPS points, the last charts/SPS, steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = [path for path in runs.iterdir() if path.is_dir()]
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    points = accumulator.Scalars("charts/SPS")
    first, last = points[0], points[-1]
    steady = (
        (last.step - first.step) / (last.wall_time - first.wall_time)
        if len(points) > 1
        else float("nan")
    )
    return steady, last.value, last.step


def run_one(name: str, which: str, script: Path, argv: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, __file__, "--worker", which, str(script), json.dumps(argv)]
        env = {**os.environ, "WANDB_MODE": "offline", "TQDM_DISABLE": "1"}
        start = time.perf_counter()
        completed = subprocess.run(command, cwd=workdir, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        lines = [line for line in completed.stdout.splitlines() if line.startswith("SAMPLES ")]
        if completed.returncode != 0 or not lines:
            sys.exit(f"{name} failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}")
        steady, last_sps, steps = sps_from_events(Path(workdir) / "runs")
    samples = json.loads(lines[-1][len("SAMPLES ") :])
    loop = sum(count for key, count in samples.items() if key != "outside") or 1
    split = {key: samples.get(key, 0) / loop for key in ("env", "acting", "update", "rest")}
    return {"steady": steady, "last_sps": last_sps, "steps": steps, "wall": wall, "split": split}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--total-timesteps", type=int, default=20480, help="agent steps for each script"
    )
    parser.add_argument(
        "--cleanrl-repo", default=DEFAULT_REPO, help="CleanRL checkout or bare git repo"
    )
    parser.add_argument(
        "--ours-args", default="", help="extra flags for ppo_atari.py (e.g. --no-bf16)"
    )
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        which, script, argv = options.worker
        worker(which, Path(script), json.loads(argv))
        return

    steps = str(options.total_timesteps)
    with tempfile.TemporaryDirectory() as folder:
        cleanrl = prepare_cleanrl(Path(options.cleanrl_repo), Path(folder))
        runs = {
            "CleanRL ppo_atari.py": (
                "cleanrl",
                cleanrl,
                ["--env-id", "PongNoFrameskip-v4", "--no-cuda", "--total-timesteps", steps],
            ),
            "ppo_atari.py": (
                "ours",
                ROOT / "ppo_atari.py",
                ["--total-timesteps", steps, "--eval-episodes", "1", "--no-save-model"]
                + shlex.split(options.ours_args),
            ),
        }
        results = {}
        for name, (which, script, argv) in runs.items():
            print(f"running {name} {' '.join(argv)} ...", file=sys.stderr, flush=True)
            results[name] = run_one(name, which, script, argv)

    print(
        f"\nPong, {options.total_timesteps} agent steps each, one after the other "
        f"(cpu_count {os.cpu_count()})"
    )
    print(
        f"{'script':22s} {'steps/s':>8s} {'SPS last':>9s} {'wall s':>7s} "
        f"{'env':>5s} {'act':>5s} {'update':>6s} {'rest':>5s}"
    )
    for name, result in results.items():
        split = result["split"]
        print(
            f"{name:22s} {result['steady']:8.1f} {result['last_sps']:9.0f} {result['wall']:7.1f} "
            f"{split['env']:5.0%} {split['acting']:5.0%} "
            f"{split['update']:6.0%} {split['rest']:5.0%}"
        )
    ratio = results["ppo_atari.py"]["steady"] / results["CleanRL ppo_atari.py"]["steady"]
    print(f"ratio ppo_atari.py / CleanRL: {ratio:.2f}x (steady steps/s)")
    print(
        "steps/s: between the first and last charts/SPS points (first iteration left out); "
        "SPS last: each script's own charts/SPS; "
        "wall: the whole process, start-up and evaluation included; "
        "env/act/update/rest: shares of the training loop, sampled every 5 ms"
    )


if __name__ == "__main__":
    main()
