"""ppo_atari.py under torchrun: two ranks with gloo on the CPU, and the same file alone."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import HEADLESS_ENV, ROOT, read_scalars, run_script_in

sys.path.insert(0, str(ROOT))
import ppo_atari  # noqa: E402

# Per rank: 4 envs x 32 steps, 4 minibatches, 2 epochs. Two ranks: 256 agent steps an iteration.
SHAPE = ("--num-envs", "4", "--num-steps", "32", "--num-minibatches", "4", "--update-epochs", "2")
GAME = ("--env-id", "ALE/Pong-v5", "--eval-episodes", "1", "--log-interval", "256")


def torchrun(
    workdir: Path,
    *args: str,
    timeout: float = 300,
    signal_rank=None,
    script: Path = ROOT / "ppo_atari.py",
) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 ppo_atari.py *args` in `workdir`.

    `signal_rank=(rank, signum, ready)` sends `signum` to that rank's process alone once
    `ready(workdir)` holds. `script` launches another file in place of ppo_atari.py.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(script), *args,
    ]  # fmt: skip
    env = {**os.environ, **HEADLESS_ENV, "OMP_NUM_THREADS": "1"}
    out, err = open(workdir / "out.log", "w+"), open(workdir / "err.log", "w+")  # noqa: SIM115
    process = subprocess.Popen(command, cwd=workdir, env=env, stdout=out, stderr=err, text=True)
    deadline, sent = time.monotonic() + timeout, False
    while process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(
                f"torchrun ran past {timeout}s:\n{Path(err.name).read_text()[-3000:]}"
            )
        if signal_rank is not None and not sent and signal_rank[2](workdir):
            rank, signum, _ = signal_rank
            os.kill(rank_pid(process.pid, rank), signum)
            sent = True
        time.sleep(0.1)
    out.seek(0), err.seek(0)
    result = subprocess.CompletedProcess(command, process.returncode, out.read(), err.read())
    out.close(), err.close()
    return result


def rank_pid(launcher: int, rank: int) -> int:
    """The process of `rank` among the launcher's children (its environment says RANK=...)."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    for child in children:
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"no rank {rank} among {children}")


def test_two_ranks_train_one_agent_that_evaluates_and_resumes_in_one_process(tmp_path):
    result = torchrun(tmp_path, *GAME, *SHAPE, "--total-timesteps", "1024")
    assert result.returncode == 0, result.stderr[-4000:]
    # The step counter counts both ranks: 4 iterations of 2 x 128 agent steps.
    assert re.search(r"^done: 1024 steps", result.stdout, re.MULTILINE), result.stdout
    # After 4 updates (8 gradient steps each) both ranks hold the same parameters, bit for bit.
    assert "ranks: 2 ranks, parameters identical after training" in result.stderr
    # Rank 0 alone writes a run folder (and logs, saves and evaluates).
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert result.stdout.count("done: ") == 1 and result.stdout.count("eval return") == 1
    checkpoint = run_dir / "ppo_atari.pt"
    state = torch.load(checkpoint, weights_only=True)
    assert state["global_step"] == 1024 and state["iteration"] == 4

    # The same file format: one process evaluates it, with the figures of rank 0's evaluation...
    evaluated = run_script_in(tmp_path, "ppo_atari.py", "--eval-checkpoint", str(checkpoint))
    assert evaluated.returncode == 0, evaluated.describe()
    final = re.search(r"eval return [^;(]*", result.stdout).group().strip()
    assert final in evaluated.stdout, (final, evaluated.stdout)
    # ...and resumes it: one process's iterations are 128 steps, two more reach 1280.
    resumed = run_script_in(
        tmp_path, "ppo_atari.py", "--resume", str(checkpoint), "--total-timesteps", "1280"
    )
    assert resumed.returncode == 0, resumed.describe()
    assert resumed.stdout.strip().splitlines()[-1].startswith("done: 1280 steps")
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 1280


def test_a_single_process_run_resumes_on_two_ranks_only_where_their_iterations_fit(tmp_path):
    # One process: 4 envs x 32 steps = 128 agent steps an iteration, a checkpoint kept at each.
    trained = run_script_in(
        tmp_path, "ppo_atari.py", *GAME, *SHAPE, "--total-timesteps", "1152",
        "--checkpoint-freq", "128",
    )  # fmt: skip
    assert trained.returncode == 0, trained.describe()
    (run_dir,) = trained.run_dirs
    final = run_dir / "ppo_atari.pt"

    # Step 1152 is 9 rollouts of 128: inside the fifth 2-rank iteration (1024-1280), where 2 ranks
    # would end at 2176 past a 2048 budget, their learning rate scheduled as if at step 1024.
    # Refused, saying which numbers of ranks fit, before anything is written.
    refused = torchrun(tmp_path, "--resume", str(final), "--total-timesteps", "2048")
    assert refused.returncode != 0 and "done: " not in refused.stdout
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and errors[0] == errors[1], refused.stderr[-4000:]  # one per rank
    assert "step 1152" in errors[0] and errors[0].endswith("resume it on 1, 3 or 9 ranks"), errors
    assert torch.load(final, weights_only=True)["global_step"] == 1152

    # Step 1024 ends the fourth 2-rank iteration: 2 ranks go on to the budget, the learning rate
    # where the uninterrupted schedule has it (the fraction of the budget still ahead).
    kept = run_dir / "checkpoints" / f"ppo_atari_{1024:012d}.pt"
    resumed = torchrun(tmp_path, "--resume", str(kept), "--total-timesteps", "2048")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert re.search(r"^done: 2048 steps", resumed.stdout, re.MULTILINE), resumed.stdout
    learning_rate = dict(read_scalars(tmp_path / "runs")["charts/learning_rate"])
    expected = ppo_atari.Args().learning_rate * (1 - 1024 / 2048)
    assert learning_rate[1280] == pytest.approx(expected, rel=1e-6)
    assert torch.load(final, weights_only=True)["global_step"] == 2048


def test_ctrl_c_on_one_rank_stops_both_with_one_checkpoint(tmp_path):
    started = lambda workdir: any(workdir.glob("runs/*/events.out.tfevents.*"))  # noqa: E731
    ctrl_c = (1, signal.SIGINT, started)
    result = torchrun(tmp_path, *GAME, *SHAPE, "--total-timesteps", "200000", signal_rank=ctrl_c)
    assert result.returncode != 0  # torchrun reports the ranks' exit status 130
    assert "interrupted at step" in result.stderr, result.stderr[-4000:]
    (checkpoint,) = tmp_path.glob("runs/*/ppo_atari.pt")
    step = torch.load(checkpoint, weights_only=True)["global_step"]
    assert 0 < step < 200_000 and step % 256 == 0  # both ranks stopped at the same iteration
    assert "parameters identical" in result.stderr


def test_a_rank_that_dies_ends_the_other_instead_of_hanging(tmp_path):
    started = lambda workdir: any(workdir.glob("runs/*/events.out.tfevents.*"))  # noqa: E731
    began = time.monotonic()
    result = torchrun(
        tmp_path,
        *GAME,
        *SHAPE,
        "--total-timesteps",
        "200000",
        signal_rank=(1, signal.SIGKILL, started),
        timeout=240,
    )
    assert result.returncode != 0
    assert time.monotonic() - began < 200
    assert "done: " not in result.stdout


# Launched by torchrun in place of ppo_atari.py: the script itself, except that on one rank the
# policy loss of one gradient step is NaN (the other rank's loss at that step stays finite).
NAN_ON_ONE_RANK = """
import os, sys
sys.path.insert(0, {root!r})
import ppo_atari

calls = 0
def ppo_loss(*args):
    global calls
    calls += 1
    policy_loss, value_loss, ratio = original(*args)
    return policy_loss * float("nan") if calls == {call} else policy_loss, value_loss, ratio

if os.environ["RANK"] == "{rank}":
    original, ppo_atari.ppo_loss = ppo_atari.ppo_loss, ppo_loss
ppo_atari.main(ppo_atari.parse_args())
"""


@pytest.mark.parametrize("rank", [1, 0])
def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_that_step(tmp_path, rank):
    # 2 epochs x 4 minibatches: 8 gradient steps an iteration, so step 11 is in the second
    # iteration, which ends at 2 x 256 agent steps.
    script = tmp_path / f"nan_on_rank_{rank}.py"
    script.write_text(NAN_ON_ONE_RANK.format(root=str(ROOT), call=11, rank=rank))
    result = torchrun(tmp_path, *GAME, *SHAPE, "--total-timesteps", "2048", script=script)
    assert result.returncode != 0
    # Both ranks agreed on the verdict at the same step: none waited alone in a collective.
    assert result.stderr.count("loss became non-finite at step 512") == 2, result.stderr[-4000:]
    assert "stopped answering" not in result.stderr
    # Rank 0 saved the state of that step (rank 1's copy of the network is the same)...
    (saved,) = tmp_path.glob("runs/*/ppo_atari_nan.pt")
    assert torch.load(saved, weights_only=True)["global_step"] == 512
    # ...and closed its log: the first iteration's numbers are all in it.
    scalars = read_scalars(tmp_path / "runs")
    assert scalars["charts/SPS"][-1][0] == 256 and "losses/policy_loss" in scalars


def test_a_lost_collective_closes_rank_0s_log_before_the_hard_exit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SDL_NO_SIGNAL_HANDLERS", "1")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    ranks = ppo_atari.Ranks(want_cuda=False)
    run = ppo_atari.MainRun(ppo_atari.Args(), 1000, ranks)
    for signum, handler in saved.items():
        signal.signal(signum, handler)
    for step in range(300):
        run.writer.add_scalar("charts/SPS", 1.0, step)

    def hard_exit(code):
        raise SystemExit(code)

    def lost():
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(ppo_atari.os, "_exit", hard_exit)
    with pytest.raises(SystemExit):
        ranks.collective(lost)
    run.progress.close()
    # Read at once: only a closed writer has written every event it was given.
    assert len(read_scalars(tmp_path / "runs")["charts/SPS"]) == 300


def test_alone_it_is_rank_0_of_1_and_the_collectives_do_nothing(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ranks = ppo_atari.Ranks(want_cuda=False)
    assert (ranks.world, ranks.rank, ranks.is_main) == (1, 0, True)
    gradients = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    ppo_atari.mean_over_ranks(gradients, ranks)
    assert gradients[0].tolist() == [1.0, 2.0] and gradients[1].tolist() == [[3.0]]
    assert ranks.agree_on_signal(None) is None
    assert ranks.agree_on_signal(signal.SIGTERM) == signal.SIGTERM
    assert ranks.local_device(torch.device("cpu")) == torch.device("cpu")
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("world", ["2"])
def test_torchrun_refuses_rollouts_that_could_leave_a_rank_without_a_minibatch(
    monkeypatch, capsys, world
):
    monkeypatch.setenv("WORLD_SIZE", world)
    args = ppo_atari.Args(num_envs=1, num_steps=4, num_minibatches=4)
    with pytest.raises(SystemExit) as exit_info:
        ppo_atari.validate(args)
    assert exit_info.value.code == 2
    assert "under torchrun each rank needs" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("global_step", "world", "fitting"),
    [(1152, 2, "1, 3 or 9 ranks"), (768, 4, "1, 2, 3 or 6 ranks"), (128, 2, "one rank")],
)
def test_a_resume_inside_an_iteration_is_refused(capsys, global_step, world, fitting):
    ppo_atari.check_resume_step(global_step - global_step % (128 * world), 128, world)  # fits
    with pytest.raises(SystemExit) as exit_info:
        ppo_atari.check_resume_step(global_step, 128, world)
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: the checkpoint is at step {global_step}, inside an iteration")
    assert line.endswith(f"resume it on {fitting}"), line
