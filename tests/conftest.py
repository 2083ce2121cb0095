"""Shared test helpers: run a script through its real command line and read what it logged.

Every script is tested the way a user runs it: `python <script>.py --flag ...` in a fresh
temporary directory (so runs/, videos/ and wandb/ never land in the repository), with the
environment a headless, offline machine has. `run_script` returns the exit code, both output
streams, and the TensorBoard scalars the run wrote, so tests can assert on logged numbers.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# No network, no display, no GPU: what CI and a headless server have.
HEADLESS_ENV = {
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "SDL_VIDEODRIVER": "dummy",
    "SDL_AUDIODRIVER": "dummy",
    "MUJOCO_GL": "egl",
    "PYOPENGL_PLATFORM": "egl",
    "CUDA_VISIBLE_DEVICES": "",
    "JAX_PLATFORMS": "cpu",
    "PYTHONUNBUFFERED": "1",
    # Tests run in parallel (pytest -n): one math thread per process avoids oversubscribing cores.
    "OMP_NUM_THREADS": "1",
    # The scripts print progress bars; keep them out of captured output where tqdm allows.
    "TQDM_MININTERVAL": "5",
}


@dataclass
class ScriptResult:
    """What one run of a script left behind."""

    returncode: int
    stdout: str
    stderr: str
    workdir: Path
    # tag -> list of (step, value), in the order they were logged, over every run under runs/
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def run_dirs(self) -> list[Path]:
        """The run folders under runs/, oldest first."""
        runs = self.workdir / "runs"
        return (
            sorted((p for p in runs.iterdir() if p.is_dir()), key=os.path.getmtime)
            if runs.exists()
            else []
        )

    def checkpoints(self, pattern: str = "*.pt") -> list[Path]:
        """The runs' checkpoint files under runs/, not the copies kept in runs/*/checkpoints/."""
        return sorted(
            path
            for path in (self.workdir / "runs").rglob(pattern)
            if path.parent.name != "checkpoints"
        )

    def values(self, tag: str) -> list[float]:
        return [value for _, value in self.scalars.get(tag, [])]

    def steps(self, tag: str) -> list[int]:
        return [step for step, _ in self.scalars.get(tag, [])]

    def describe(self) -> str:
        """Both output streams, for assertion messages."""
        return (
            f"exit {self.returncode}\n--- stdout ---\n{self.stdout[-4000:]}\n"
            f"--- stderr ---\n{self.stderr[-4000:]}"
        )


def read_scalars(runs_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in every TensorBoard event file under `runs_dir`, in file then event order."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    scalars: dict[str, list[tuple[int, float]]] = defaultdict(list)
    if not runs_dir.exists():
        return {}
    for event_file in sorted(
        runs_dir.rglob("events.out.tfevents.*"), key=lambda p: (p.stat().st_mtime, p.name)
    ):
        for event in EventFileLoader(str(event_file)).Load():
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars[value.tag].append((event.step, value.simple_value))
                elif value.metadata.plugin_data.plugin_name == "scalars":
                    scalars[value.tag].append(
                        (event.step, float(tensor_util.make_ndarray(value.tensor)))
                    )
    return dict(scalars)


def run_script_in(
    workdir: Path,
    script: str,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    interrupt_when: Callable[[Path], bool] | None = None,
    interrupt_signals: tuple[int, ...] = (signal.SIGINT,),
) -> ScriptResult:
    """Run `python ROOT/script *args` with `workdir` as the current directory.

    `env` adds variables to the headless environment. `interrupt_when(workdir)` is polled while
    the script runs; once it returns True the script gets `interrupt_signals` (default: one SIGINT,
    Ctrl-C; SIGTERM is what job schedulers, `timeout` and `docker stop` send), one after another
    0.2 s apart, to test the save-on-interrupt path at a point the test chooses rather than after a
    guessed delay.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **HEADLESS_ENV, **(env or {})}
    command = [sys.executable, str(ROOT / script), *map(str, args)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        # Files rather than pipes: a long run cannot block on a full pipe while we poll.
        process = subprocess.Popen(
            command, cwd=workdir, env=full_env, stdout=out, stderr=err, text=True
        )
        deadline = time.monotonic() + timeout
        interrupted = False
        while process.poll() is None:
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                err.seek(0)
                raise AssertionError(
                    f"{script} {' '.join(args)} ran past {timeout}s\n{err.read()[-4000:]}"
                )
            if interrupt_when is not None and not interrupted and interrupt_when(workdir):
                for index, signum in enumerate(interrupt_signals):
                    if index:
                        time.sleep(0.2)
                    if process.poll() is None:
                        process.send_signal(signum)
                interrupted = True
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    return ScriptResult(process.returncode, stdout, stderr, workdir, read_scalars(workdir / "runs"))


@pytest.fixture
def run_script(tmp_path):
    """`run_script("ppo_cartpole.py", "--total-timesteps", "512")` -> ScriptResult.

    Every call of one test shares the test's temporary directory, so a later call can resume from
    or evaluate a checkpoint an earlier call wrote.
    """

    def run(script: str, *args: str, **kwargs) -> ScriptResult:
        return run_script_in(tmp_path, script, *args, **kwargs)

    return run


@dataclass
class WandbRun:
    """What an offline W&B run recorded about itself."""

    run_id: str
    name: str
    group: str
    config: dict
    resumed: bool


def read_wandb_runs(workdir: Path) -> list[WandbRun]:
    """The run records of every offline W&B run under `workdir/wandb`, oldest first.

    An offline run stores its records in `run-<id>.wandb`, a LevelDB-style log: after a 7-byte
    file header, 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type: 1 full,
    2 first, 3 middle, 4 last). Each whole record is a `wandb_internal_pb2.Record` protobuf.
    """
    from wandb.proto import wandb_internal_pb2

    runs = []
    for path in sorted((workdir / "wandb").glob("offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B", f"{path} is not a W&B run file"
        position, block, pending = 7, 32768, b""
        while position + 7 <= len(data):
            left_in_block = block - position % block
            if left_in_block < 7:  # a block's tail too short for a header is padding
                position += left_in_block
                continue
            length, kind = struct.unpack("<HB", data[position + 4 : position + 7])
            pending += data[position + 7 : position + 7 + length]
            position += 7 + length
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                pending = b""
                if record.WhichOneof("record_type") == "run":
                    run = record.run
                    config = {item.key: json.loads(item.value_json) for item in run.config.update}
                    config = {
                        key: value.get("value", value) if isinstance(value, dict) else value
                        for key, value in config.items()
                    }
                    runs.append(
                        WandbRun(run.run_id, run.display_name, run.run_group, config, run.resumed)
                    )
                    break
    return runs


@pytest.fixture
def tensors_as_if_on_a_gpu(monkeypatch):
    """Make every torch tensor refuse NumPy conversion the way a CUDA tensor does, on a CPU.

    On a GPU, `t.numpy()`, `np.asarray(t)` and `array[i] = t` raise TypeError ("can't convert
    cuda:0 device type tensor to numpy") unless the tensor was first copied to host memory with
    `.cpu()` or `.to("cpu")`. On the CPU all of them silently work, so a script that forgets the
    copy passes every CPU test and crashes on its first rollout on a GPU machine. With this
    fixture active, code running on the CPU gets the GPU's refusals:

    - `Tensor.cpu()` and `Tensor.to(<the CPU>)` return a copy (as they do for a GPU tensor) and
      record its memory as host memory;
    - `Tensor.numpy()` and `Tensor.__array__` (which NumPy calls for `np.asarray(t)` and for
      `array[i] = t`) raise TypeError for a tensor whose memory is not recorded. Views of a host
      copy (indexing, reshape, detach) share its memory and convert.

    Every other tensor counts as a device tensor, including one built on the CPU without a device
    (`torch.from_numpy`) and a result computed from a host copy (convert at the end instead).
    Calls from torch's model and optimizer code (`Module.to`, `Optimizer.load_state_dict`) record
    nothing, so a model moved "to the device" stays a device tensor. Not caught, because a GPU
    allows them: scalar reads (`.item()`, `float(t)`, `.tolist()`). Not caught either: an op that
    mixes a CPU tensor with a device tensor (a RuntimeError on a GPU).

    Use: request the fixture and run the script in-process (`main(parse_args([...]))`) with a
    tiny budget; any conversion that would fail on a GPU raises TypeError.
    """
    import torch

    host_copies: list[torch.Tensor] = []  # kept alive, so that their memory is not reused
    host_memory: set[int] = set()
    original_cpu, original_to = torch.Tensor.cpu, torch.Tensor.to
    original_numpy, original_array = torch.Tensor.numpy, torch.Tensor.__array__

    def copy_to_host(tensor: torch.Tensor) -> torch.Tensor:
        copy = tensor.clone()
        host_copies.append(copy)
        host_memory.add(copy.untyped_storage().data_ptr())
        return copy

    def called_from_torch() -> bool:
        # Frame 0: this function; 1: the patched method; 2: its caller. Only the model and optimizer
        # machinery moves tensors "to the device"; torch's other helpers (the TensorBoard writer's
        # `.cpu().numpy()`) copy to the host as they would from a GPU.
        caller = sys._getframe(2).f_globals.get("__name__", "")
        return caller.startswith(("torch.nn", "torch.optim"))

    def cpu(self, *args, **kwargs):
        result = original_cpu(self, *args, **kwargs)
        return result if called_from_torch() else copy_to_host(result)

    def to(self, *args, **kwargs):
        result = original_to(self, *args, **kwargs)
        target = kwargs.get("device", args[0] if args else None)
        to_cpu = isinstance(target, str | torch.device) and torch.device(target).type == "cpu"
        return copy_to_host(result) if to_cpu and not called_from_torch() else result

    def refused_off_the_host(original):
        def guarded(self, *args, **kwargs):
            if self.untyped_storage().data_ptr() not in host_memory and not kwargs.get("force"):
                raise TypeError(
                    "can't convert a device tensor to numpy (tensors_as_if_on_a_gpu): "
                    "use Tensor.cpu() to copy the tensor to host memory first."
                )
            return original(self, *args, **kwargs)

        return guarded

    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.Tensor, "numpy", refused_off_the_host(original_numpy))
    monkeypatch.setattr(torch.Tensor, "__array__", refused_off_the_host(original_array))
