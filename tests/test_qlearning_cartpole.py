"""Tests of qlearning_cartpole.py: pure parts against slow references, then the CLI end to end."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import HEADLESS_ENV, ROOT, read_scalars, read_wandb_runs

sys.path.insert(0, str(ROOT))
import qlearning_cartpole  # noqa: E402

SCRIPT = "qlearning_cartpole.py"
SHAPE = ("--num-envs", "8")
TINY = ("--total-timesteps", "4096", *SHAPE, "--log-interval", "1024", "--eval-episodes", "2")
EVAL = re.compile(r"eval return (\S+) ± (\S+) over (\d+) episodes")


def load_npz(path) -> dict:
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def eval_figures(output: str) -> tuple[str, str, str]:
    """(mean, std, episodes) of the one `eval return X ± Y over N episodes` sentence in `output`."""
    (figures,) = EVAL.findall(output)
    return figures


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """For tests that call main in-process: the cwd is tmp_path, so a regression cannot write runs/
    into the checkout, and the signal handlers main installs are put back afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SDL_NO_SIGNAL_HANDLERS", "1")  # StopFlag sets it; undone after the test
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield tmp_path
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


# --- discretisation --------------------------------------------------------------------------


def reference_cell(x, low, high, bins):
    """Slow, literal discretisation of ONE observation: count the inner edges at or below each
    value, clip into [0, bins - 1], then flatten in C order (last dimension fastest)."""
    cell = 0
    for value, lo, hi, n in zip(x, low, high, bins, strict=True):
        width = (hi - lo) / n
        index = sum(1 for k in range(1, n) if value >= lo + k * width)
        cell = cell * n + index
    return cell


def test_discretize_matches_slow_reference_including_edges_and_clipping():
    # Bounds and widths that are exact in binary, so values placed on an edge are on it exactly.
    low = np.array([-2.0, -1.0, -0.25, -4.0])
    high = np.array([2.0, 1.0, 0.25, 4.0])
    bins = np.array([4, 1, 8, 16])
    generator = np.random.default_rng(0)
    inside = generator.uniform(low, high, size=(300, 4))
    outside = generator.uniform(3 * low, 3 * high, size=(300, 4))  # about 2/3 out of bounds
    width = (high - low) / bins
    on_edges = low + generator.integers(0, bins + 1, size=(300, 4)) * width  # includes low, high
    obs = np.concatenate([inside, outside, on_edges]).astype(np.float32)
    cells = qlearning_cartpole.discretize(obs, low, high, bins)
    expected = [reference_cell(x, low, high, bins) for x in obs.astype(np.float64)]
    np.testing.assert_array_equal(cells, expected)
    assert cells.min() >= 0 and cells.max() < np.prod(bins)


def test_discretize_edges_go_up_and_out_of_range_values_clip():
    low, high, bins = np.array([-1.0]), np.array([1.0]), np.array([4])
    values = [-np.inf, -5.0, -1.0, -0.75, -0.5, -1e-9, 0.0, 0.5, 0.999, 1.0, 7.0, np.inf]
    expected = [0, 0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 3]
    cells = qlearning_cartpole.discretize(np.array(values)[:, None], low, high, bins)
    assert cells.tolist() == expected


def test_discretize_flattens_in_c_order():
    low, high, bins = np.zeros(3), np.ones(3), np.array([2, 3, 4])
    # bin (1, 2, 3) -> 1 * 12 + 2 * 4 + 3 = 23; bin (0, 1, 0) -> 4
    obs = np.array([[0.75, 0.9, 0.99], [0.1, 0.5, 0.0]])
    assert qlearning_cartpole.discretize(obs, low, high, bins).tolist() == [23, 4]


# --- Q update --------------------------------------------------------------------------------


def test_q_update_matches_hand_computed_values():
    q = np.array([[0.0, 1.0], [3.0, 0.0], [2.0, 5.0]])
    # s=0, a=1, r=1, s'=2, not terminal: target = 1 + 0.9 * max(2, 5) = 5.5;
    # Q <- 1 + 0.5 * (5.5 - 1) = 3.25.
    # s=1, a=0, r=1, terminal: target = 1; Q <- 3 + 0.5 * (1 - 3) = 2.
    td = qlearning_cartpole.q_learning_update(
        q,
        states=np.array([0, 1]),
        actions=np.array([1, 0]),
        rewards=np.array([1.0, 1.0]),
        next_states=np.array([2, 2]),
        terminated=np.array([False, True]),
        learning_rate=0.5,
        gamma=0.9,
    )
    np.testing.assert_allclose(td, [4.5, -2.0])
    np.testing.assert_allclose(q, [[0.0, 3.25], [2.0, 0.0], [2.0, 5.0]])


def test_truncation_bootstraps_and_termination_does_not():
    """The same last step of an episode: cut off by the time limit it still has a future."""
    q_truncated = np.array([[0.0, 0.0], [10.0, 4.0]])
    q_terminated = q_truncated.copy()
    step = dict(states=np.array([0]), actions=np.array([0]), rewards=np.array([1.0]))
    step["next_states"] = np.array([1])
    qlearning_cartpole.q_learning_update(
        q_truncated, **step, terminated=np.array([False]), learning_rate=1.0, gamma=0.99
    )
    qlearning_cartpole.q_learning_update(
        q_terminated, **step, terminated=np.array([True]), learning_rate=1.0, gamma=0.99
    )
    assert q_truncated[0, 0] == pytest.approx(1.0 + 0.99 * 10.0)
    assert q_terminated[0, 0] == pytest.approx(1.0)


def reference_batch_update(q, states, actions, rewards, next_states, terminated, alpha, gamma):
    """Slow reference of the documented batch semantics: targets from the table before the batch;
    a cell hit k times gets k single updates in a row towards the mean of its k targets."""
    before = q.copy()
    targets = {}
    for s, a, r, s2, done in zip(states, actions, rewards, next_states, terminated, strict=True):
        target = r + (0.0 if done else gamma * max(before[s2]))
        targets.setdefault((s, a), []).append(target)
    for (s, a), cell_targets in targets.items():
        mean = sum(cell_targets) / len(cell_targets)
        for _ in cell_targets:
            q[s, a] += alpha * (mean - q[s, a])


def test_batched_q_update_matches_sequential_reference_with_repeated_cells():
    generator = np.random.default_rng(1)
    q = generator.normal(size=(5, 3))
    expected = q.copy()
    batch = dict(
        states=generator.integers(0, 5, 200),  # 200 transitions over 15 cells: many repeats
        actions=generator.integers(0, 3, 200),
        rewards=generator.normal(size=200),
        next_states=generator.integers(0, 5, 200),
        terminated=generator.random(200) < 0.2,
    )
    qlearning_cartpole.q_learning_update(q, **batch, learning_rate=0.3, gamma=0.95)
    reference_batch_update(expected, *batch.values(), 0.3, 0.95)
    np.testing.assert_allclose(q, expected, rtol=1e-12)


def test_repeated_identical_transition_equals_that_many_single_updates():
    q_batched, q_sequential = np.zeros((2, 2)), np.zeros((2, 2))
    step = dict(actions=np.array([1]), rewards=np.array([1.0]), next_states=np.array([1]))
    step["terminated"] = np.array([True])
    qlearning_cartpole.q_learning_update(
        q_batched, np.array([0, 0, 0]), *(np.repeat(v, 3) for v in step.values()), 0.5, 0.9
    )
    for _ in range(3):
        qlearning_cartpole.q_learning_update(q_sequential, np.array([0]), *step.values(), 0.5, 0.9)
    assert q_batched[0, 1] == pytest.approx(q_sequential[0, 1]) == pytest.approx(1 - 0.5**3)


# --- schedules and exploration ---------------------------------------------------------------


def test_linear_schedule_goes_from_start_to_end_then_stays():
    schedule = qlearning_cartpole.linear_schedule
    assert schedule(1.0, 0.1, 100, 0) == 1.0
    assert schedule(1.0, 0.1, 100, 50) == pytest.approx(0.55)
    assert schedule(1.0, 0.1, 100, 100) == pytest.approx(0.1)
    assert schedule(1.0, 0.1, 100, 1000) == pytest.approx(0.1)
    assert schedule(1.0, 0.1, 0, 0) == 0.1  # a zero-length decay starts at the end value


def test_epsilon_greedy_is_greedy_at_zero_and_uniform_at_one():
    generator = np.random.default_rng(0)
    q_values = np.tile([0.0, 2.0, 1.0], (20_000, 1))
    assert (qlearning_cartpole.epsilon_greedy(q_values, 0.0, generator) == 1).all()
    counts = np.bincount(qlearning_cartpole.epsilon_greedy(q_values, 1.0, generator), minlength=3)
    np.testing.assert_allclose(counts / 20_000, [1 / 3] * 3, atol=0.02)
    mixed = qlearning_cartpole.epsilon_greedy(q_values, 0.3, generator)
    assert (mixed != 1).mean() == pytest.approx(0.3 * 2 / 3, abs=0.02)


def test_logged_q_values_and_td_loss_match_a_slow_reference_with_replay(workdir, monkeypatch):
    """losses/q_values is the mean of Q(s, a) over the new transitions right after their update;
    losses/td_loss the mean squared TD error over every transition updated, replayed ones included.
    Both are recomputed here, one value at a time, from a record of every call of the Q update.
    (The replay once made q_values divide the new transitions' sum by the replayed count too.)"""
    calls = []
    real_update = qlearning_cartpole.q_learning_update

    def recording_update(q_table, states, actions, *rest):
        td_errors = real_update(q_table, states, actions, *rest)
        calls.append((td_errors.tolist(), q_table[states, actions].tolist()))
        return td_errors

    monkeypatch.setattr(qlearning_cartpole, "q_learning_update", recording_update)
    replay = ("--replay-size", "64", "--replay-batch-size", "24")
    argv = ["--total-timesteps", "512", *SHAPE, "--log-interval", "16", *replay]
    argv += ["--eval-episodes", "1", "--no-save-model"]
    qlearning_cartpole.main(qlearning_cartpole.parse_args(argv))

    assert len(calls) == 2 * 64  # per vector step: the new transitions, then a replayed sample
    expected_q, expected_td = [], []
    for first in range(0, 64, 2):  # a log every 16 env steps: every 2 vector steps of 8 envs
        window = calls[2 * first : 2 * first + 4]
        q_values = [value for _, q_after in window[0::2] for value in q_after]
        td_errors = [error for errors, _ in window for error in errors]
        expected_q.append(sum(q_values) / len(q_values))
        expected_td.append(sum(error * error for error in td_errors) / len(td_errors))
    scalars = read_scalars(workdir / "runs")
    assert [step for step, _ in scalars["losses/q_values"]] == list(range(16, 513, 16))
    for key, expected in (("losses/q_values", expected_q), ("losses/td_loss", expected_td)):
        np.testing.assert_allclose([value for _, value in scalars[key]], expected, rtol=1e-6)


def test_a_second_signal_aborts_without_saving(workdir, monkeypatch):
    """The first signal asks for a stop at the end of the iteration; a second one, of either kind,
    aborts at once (exit 128 + the second's number), without a checkpoint."""
    calls = 0
    real_epsilon_greedy = qlearning_cartpole.epsilon_greedy

    def signalled_twice_at_the_third_step(*args):
        nonlocal calls
        calls += 1
        if calls == 3:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
        return real_epsilon_greedy(*args)

    monkeypatch.setattr(qlearning_cartpole, "epsilon_greedy", signalled_twice_at_the_third_step)

    def exit_now(code: int):  # the abort's os._exit, as an exception this process survives
        raise SystemExit(code)

    monkeypatch.setattr(qlearning_cartpole.os, "_exit", exit_now)
    with pytest.raises(SystemExit) as exit_info:
        qlearning_cartpole.main(qlearning_cartpole.parse_args([*TINY]))
    assert exit_info.value.code == 130
    assert calls == 3
    assert not list(workdir.rglob("*.npz"))


# --- the CLI ---------------------------------------------------------------------------------


def test_smoke_run_logs_every_key_and_saves_a_checkpoint(run_script):
    result = run_script(SCRIPT, *TINY)
    assert result.returncode == 0, result.describe()
    for key in (
        "charts/episodic_return", "charts/episodic_length", "charts/learning_rate", "charts/SPS",
        "charts/epsilon", "losses/td_loss", "losses/q_values", "eval/episodic_return",
    ):  # fmt: skip
        assert key in result.scalars, f"{key} not logged"
    # CartPole gives +1 per step: the logged return of an episode is its length.
    assert result.values("charts/episodic_return") == result.values("charts/episodic_length")
    assert result.steps("charts/SPS") == [1024, 2048, 3072, 4096]
    epsilons = result.values("charts/epsilon")
    assert epsilons == sorted(epsilons, reverse=True) and epsilons[0] < 1.0
    assert len(result.values("eval/episodic_return")) == 2
    (checkpoint,) = result.checkpoints("*.npz")  # the default --checkpoint-freq keeps no copies
    state = load_npz(checkpoint)  # no pickle needed
    assert str(state["kind"]) == "q-table/1" and str(state["env_id"]) == "CartPole-v1"
    assert int(state["global_step"]) == 4096
    assert state["q_table"].shape == (3 * 3 * 8 * 10, 2) and np.abs(state["q_table"]).sum() > 0
    assert json.loads(str(state["args"]))["bins"] == [3, 3, 8, 10]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("done: 4096 steps") and "episodes/s" in last, last
    assert eval_figures(last)[2] == "2"


def test_same_seed_gives_identical_logged_numbers(tmp_path):
    from conftest import run_script_in

    first = run_script_in(tmp_path / "a", SCRIPT, *TINY, "--no-save-model")
    second = run_script_in(tmp_path / "b", SCRIPT, *TINY, "--no-save-model")
    assert first.returncode == 0 and second.returncode == 0, first.describe() + second.describe()
    for key in ("charts/episodic_return", "losses/td_loss", "losses/q_values"):
        assert first.scalars[key] == second.scalars[key], key
    assert first.scalars["eval/episodic_return"] == second.scalars["eval/episodic_return"]
    third = run_script_in(tmp_path / "c", SCRIPT, *TINY, "--no-save-model", "--seed", "2")
    assert third.scalars["losses/td_loss"] != first.scalars["losses/td_loss"]


def test_eval_checkpoint_repeats_the_final_evaluation_and_periodic_checkpoints_resume(tmp_path):
    """--eval-checkpoint PATH alone takes the run's settings (seed 9 here) and evaluates on the same
    episodes as the end of training: the same figures. Every --checkpoint-freq steps a copy is
    kept, and the trained table at the end; resuming one continues with the schedules of the
    uninterrupted run, step for step."""
    from conftest import run_script_in

    settings = ("--seed", "9", "--eval-episodes", "3", "--checkpoint-freq", "3000")
    trained = run_script_in(tmp_path / "train", SCRIPT, *TINY, *settings)
    assert trained.returncode == 0, trained.describe()
    (run_dir,) = trained.run_dirs
    checkpoint = run_dir / "qlearning_cartpole.npz"
    kept = sorted(path.name for path in (run_dir / "checkpoints").iterdir())
    assert kept == ["qlearning_cartpole_000000003000.npz", "qlearning_cartpole_000000004096.npz"]

    evaluated = run_script_in(
        tmp_path / "train", SCRIPT, "--eval-checkpoint", str(checkpoint), "--capture-video"
    )
    assert evaluated.returncode == 0, evaluated.describe()
    assert eval_figures(evaluated.stdout) == eval_figures(trained.stdout)
    assert eval_figures(evaluated.stdout)[2] == "3"
    assert len(list((evaluated.workdir / "videos").rglob("*.mp4"))) == 3

    halfway = tmp_path / "halfway.npz"
    shutil.copy(run_dir / "checkpoints" / kept[0], halfway)
    assert int(load_npz(halfway)["global_step"]) == 3000
    resumed = run_script_in(tmp_path / "resume", SCRIPT, "--resume", str(halfway))
    assert resumed.returncode == 0, resumed.describe()
    for key in ("charts/epsilon", "charts/learning_rate"):
        assert resumed.scalars[key] == trained.scalars[key][2:], key  # the logs at 3072 and 4096
    assert int(load_npz(resumed.checkpoints("qlearning_cartpole.npz")[0])["global_step"]) == 4096


def test_eval_checkpoint_of_a_folder_draws_the_curve_of_its_kept_checkpoints(capsys, workdir):
    """--eval-checkpoint runs/<run>/checkpoints evaluates each kept checkpoint in step order, and
    the random policy, on the episodes that --eval-checkpoint of each file plays: eval_curve.csv
    has the same figures, eval_curve.png draws them. A folder without checkpoints of this script
    gets one line."""
    qlearning_cartpole.main(qlearning_cartpole.parse_args([*TINY, "--checkpoint-freq", "1500"]))
    (folder,) = workdir.glob("runs/*/checkpoints")
    kept = sorted(folder.glob("*.npz"))
    assert [int(load_npz(path)["global_step"]) for path in kept] == [1504, 3000, 4096]
    argv = ["--eval-checkpoint", str(folder), "--eval-episodes", "2"]
    qlearning_cartpole.main(qlearning_cartpole.parse_args(argv))
    assert (folder / "eval_curve.png").stat().st_size > 0
    with open(folder / "eval_curve.csv") as csv_file:
        rows = list(csv.DictReader(csv_file))
    assert [row["step"] for row in rows] == ["-1", "1504", "3000", "4096"]
    assert rows[0]["episodes"] == "2"  # the random policy's
    capsys.readouterr()
    for path, row in zip(kept, rows[1:], strict=True):
        qlearning_cartpole.main(qlearning_cartpole.parse_args(["--eval-checkpoint", str(path)]))
        mean, std, episodes = eval_figures(capsys.readouterr().out)
        assert (f"{float(row['mean']):.2f}", f"{float(row['std']):.2f}") == (mean, std), path
        assert row["episodes"] == episodes == "2"

    (workdir / "empty").mkdir()
    (workdir / "torch").mkdir()
    (workdir / "torch" / "ppo_cartpole_000000001024.pt").write_bytes(b"not ours")
    (workdir / "other").mkdir()
    write_checkpoint(workdir / "other" / "dqn_000000001024.npz", kind="dqn/1")
    for name, message in {
        "empty": "holds no checkpoints (*.npz)",
        "torch": "holds no checkpoints (*.npz)",
        "other": "holds a dqn/1 checkpoint",
    }.items():
        code, lines = run_in_process(capsys, "--eval-checkpoint", str(workdir / name))
        assert code == 2 and len(lines) == 1 and message in lines[0], (name, lines)


def test_resume_alone_restores_the_table_and_replay_exactly(run_script, tmp_path):
    """Trained with settings other than the defaults, `--resume PATH` alone continues with them.
    With the budget already spent it trains nothing: its final checkpoint must equal the one it
    started from, table, replay and settings, and its evaluation the training run's."""
    settings = ("--seed", "9", "--num-envs", "4", "--gamma", "0.95", "--replay-size", "64")
    settings = (*settings, "--replay-batch-size", "8", "--total-timesteps", "2048")
    settings = (*settings, "--log-interval", "512")
    trained = run_script(SCRIPT, *settings, "--eval-episodes", "2")
    assert trained.returncode == 0, trained.describe()
    (checkpoint,) = trained.checkpoints("*.npz")
    saved = tmp_path / "saved.npz"
    shutil.copy(checkpoint, saved)
    state = load_npz(saved)
    assert state["replay_states"].shape == (64,) and int(state["replay_count"]) == 64

    again = run_script(SCRIPT, "--resume", str(saved))
    assert again.returncode == 0, again.describe()
    assert eval_figures(again.stdout) == eval_figures(trained.stdout)
    restored = load_npz(checkpoint)
    assert restored.keys() == state.keys()
    for key in state:
        if key == "args":
            restored_args, saved_args = json.loads(str(restored[key])), json.loads(str(state[key]))
            assert restored_args == {**saved_args, "resume": str(saved)}
        else:
            np.testing.assert_array_equal(restored[key], state[key], err_msg=key)

    longer = run_script(SCRIPT, "--resume", str(saved), "--total-timesteps", "4096")
    assert longer.returncode == 0, longer.describe()
    assert int(load_npz(checkpoint)["global_step"]) == 4096
    # It went on learning.
    assert not np.array_equal(load_npz(checkpoint)["q_table"], state["q_table"])
    assert longer.steps("charts/SPS")[-4:] == [2560, 3072, 3584, 4096]


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint_that_resumes_to_the_full_budget(run_script, signum, exit_code):
    """Ctrl-C, and SIGTERM as job schedulers, `timeout` and `docker stop` send it, stop the run at
    the end of the iteration with a checkpoint; `--resume PATH` then continues it to its budget.
    The budget is far longer than the run to the first checkpoint, so the signal always lands."""
    budget = ("--total-timesteps", "100000000", "--num-envs", "64", "--checkpoint-freq", "1024")
    budget = (*budget, "--seed", "9", "--eval-episodes", "1", "--log-interval", "100000")

    def first_checkpoint_written(workdir):
        return any(workdir.glob("runs/*/qlearning_cartpole.npz"))

    interrupted = run_script(
        SCRIPT, *budget, interrupt_when=first_checkpoint_written, interrupt_signals=(signum,)
    )
    assert interrupted.returncode == exit_code, interrupted.describe()
    assert "interrupted at step" in interrupted.stderr and "Traceback" not in interrupted.stderr
    (checkpoint,) = interrupted.checkpoints("qlearning_cartpole.npz")
    step = int(load_npz(checkpoint)["global_step"])
    assert 0 < step < 100_000_000
    assert f"--resume {checkpoint.relative_to(interrupted.workdir)}" in interrupted.stderr

    # The settings (seed 9, 64 envs...) come from the checkpoint; only the budget is shortened.
    resumed = run_script(SCRIPT, "--resume", str(checkpoint), "--total-timesteps", str(step + 4096))
    assert resumed.returncode == 0, resumed.describe()
    assert int(load_npz(checkpoint)["global_step"]) == step + 4096


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_the_final_evaluation_ends_it_with_the_signal_status(
    run_script, signum, code
):
    """After training the checkpoint is saved: a signal ends the evaluation and the process, with
    128 + the signal's number, rather than being noted and ignored."""

    def evaluation_recording(workdir):
        return any(workdir.glob("videos/*/eval/*.mp4"))

    # Thirty recorded episodes take seconds: the signal lands after the first, while they play.
    result = run_script(
        SCRIPT, *TINY[:-2], "--eval-episodes", "30", "--capture-video",
        interrupt_when=evaluation_recording, interrupt_signals=(signum,),
    )  # fmt: skip
    assert result.returncode == code, result.describe()
    name = signal.Signals(signum).name
    assert f"{name}: the final evaluation was stopped at step 4096" in result.stderr
    assert "Traceback" not in result.stderr and "done:" not in result.stdout
    (checkpoint,) = result.checkpoints("*.npz")
    assert int(load_npz(checkpoint)["global_step"]) == 4096
    assert len(list(result.workdir.glob("videos/*/eval/*.mp4"))) < 30


def test_a_resumed_run_records_its_evaluation_into_a_folder_of_its_own(run_script):
    first = run_script(SCRIPT, *TINY, "--capture-video")
    assert first.returncode == 0, first.describe()
    (checkpoint,) = first.checkpoints("*.npz")
    resumed = run_script(SCRIPT, "--resume", checkpoint, "--total-timesteps", "8192")
    assert resumed.returncode == 0, resumed.describe()
    assert "Overwriting" not in resumed.stderr, resumed.stderr
    videos = resumed.workdir / "videos" / checkpoint.parent.name
    assert len(list((videos / "eval").glob("*.mp4"))) == 2
    assert len(list((videos / "eval-step-8192").glob("*.mp4"))) == 2


def test_track_writes_an_offline_wandb_run_with_its_group_and_config(run_script):
    tracked = ("--track", "--wandb-group", "g", "--no-save-model")
    result = run_script(SCRIPT, *TINY, "--seed", "9", *tracked)
    assert result.returncode == 0, result.describe()
    # sync_tensorboard saw the writer: W&B keeps a copy of the run's TensorBoard events.
    assert list((result.workdir / "wandb").glob("offline-run-*/files/runs/*/events.out.tfevents.*"))
    (run,) = read_wandb_runs(result.workdir)
    (run_dir,) = result.run_dirs
    assert run.group == "g" and run.name == run_dir.name
    assert run.config["seed"] == 9 and run.config["env_id"] == "CartPole-v1"
    assert run.config["bins"] == [3, 3, 8, 10] and run.config["wandb_group"] == "g"


def test_wandb_group_defaults_to_the_exp_name_and_resuming_continues_the_wandb_run(
    workdir, monkeypatch
):
    """The W&B side of --track, in-process with a stand-in for wandb (a real offline run costs
    about 20 s; the test above makes one)."""
    inits = []
    fake_wandb = type(sys)("wandb")
    fake_wandb.init = lambda **kwargs: inits.append(kwargs)
    fake_wandb.finish = lambda: None
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    qlearning_cartpole.main(qlearning_cartpole.parse_args([*TINY, "--seed", "9", "--track"]))
    (checkpoint,) = workdir.glob("runs/*/qlearning_cartpole.npz")
    argv = ["--resume", str(checkpoint), "--total-timesteps", "8192", "--track"]
    qlearning_cartpole.main(qlearning_cartpole.parse_args(argv))
    first, resumed = inits
    assert first["group"] == resumed["group"] == "qlearning_cartpole"
    assert first["config"]["seed"] == 9 and first["config"]["bins"] == (3, 3, 8, 10)
    assert first["name"] == resumed["name"] == checkpoint.parent.name
    assert first["id"] == resumed["id"] and resumed["resume"] == "allow"
    assert resumed["config"]["total_timesteps"] == 8192 and first["sync_tensorboard"]


def test_any_discrete_env_works_and_eval_checkpoint_takes_its_env_from_the_checkpoint(run_script):
    result = run_script(
        SCRIPT, "--env-id", "Acrobot-v1", "--total-timesteps", "1024", "--num-envs", "4",
        "--eval-episodes", "1",
        "--bins", "2", "2", "2", "2", "3", "3",
        "--obs-low", "-1", "-1", "-1", "-1", "-12", "-28",
        "--obs-high", "1", "1", "1", "1", "12", "28",
    )  # fmt: skip
    assert result.returncode == 0, result.describe()
    assert result.values("eval/episodic_return")
    (checkpoint,) = result.checkpoints("*.npz")
    evaluated = run_script(SCRIPT, "--eval-checkpoint", str(checkpoint))  # no --env-id, no --bins
    assert evaluated.returncode == 0, evaluated.describe()
    assert eval_figures(evaluated.stdout) == eval_figures(result.stdout)


def test_non_finite_values_stop_with_a_saved_state(tmp_path):
    """An env whose reward is infinite makes the TD error NaN: stop, save, exit 1 with the step."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(
        "import sys, numpy as np, gymnasium as gym\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import qlearning_cartpole as q\n"
        "make = q.make_envs\n"
        "infinite = lambda envs: gym.wrappers.vector.TransformReward(envs, lambda r: r * np.inf)\n"
        "q.make_envs = lambda *a: infinite(make(*a))\n"
        "q.main(q.parse_args())\n"
    )
    result = subprocess.run(
        [sys.executable, str(launcher), *TINY],
        cwd=tmp_path,
        env={**os.environ, **HEADLESS_ENV},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert "error: loss became non-finite at step 8;" in result.stderr, result.stderr
    (nan_state,) = Path(tmp_path, "runs").rglob("*_nan.npz")
    assert int(load_npz(nan_state)["global_step"]) == 8


def run_in_process(capsys, *argv: str) -> tuple[int, list[str]]:
    """Parse `argv` with the script's real parser and run main; return (exit code, stderr lines).

    Bad input must be rejected before any heavy work, so these cases run in-process (in the
    `workdir` fixture's temporary folder): the same code path as the command line without paying
    an interpreter start per case.
    """
    with pytest.raises(SystemExit) as exit_info:
        qlearning_cartpole.main(qlearning_cartpole.parse_args(list(argv)))
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--env-id", "Pendulum-v1"), "needs Discrete"),
        (("--env-id", "NoSuchEnv-v0"), "unknown environment id"),
        (("--env-id", "CartPol-v1"), "did you mean CartPole-v1"),
        (("--env-id", "Acrobot-v1"), "observations have 6 dimensions but --bins gives 4"),
        (("--total-timesteps", "0"), "must be positive"),
        (("--num-envs", "-1"), "must be positive"),
        (("--log-interval", "0"), "must be positive"),
        (("--gamma", "1.5"), "[0, 1]"),
        (("--start-epsilon", "-0.1"), "[0, 1]"),
        (("--exploration-fraction", "2"), "[0, 1]"),
        (("--learning-rate", "0"), "--learning-rate must be positive"),
        (("--end-learning-rate", "1.5"), "--end-learning-rate must be in [0, 1]"),
        (("--bins", "3", "3", "0", "10"), "--bins must all be positive"),
        (("--bins", "3", "3", "8"), "one value per observation dimension"),
        (("--obs-low", "-2.4", "-1.5", "0.3", "-1.5"), "must be finite and below --obs-high"),
        (("--bins", "100", "100", "100", "100"), "too large"),
        (("--replay-size", "10", "--num-envs", "16"), "cannot hold one step of 16 envs"),
        (("--resume", "missing.npz"), "does not exist"),
        (("--eval-checkpoint", "missing.npz"), "does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, workdir, args, message):
    code, lines = run_in_process(capsys, *args)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (workdir / "runs").exists()


def test_bad_input_through_the_real_command_line(run_script):
    result = run_script(SCRIPT, "--bins", "3", "3", "8")
    assert result.returncode == 2, result.describe()
    assert result.stderr.strip() == (
        "error: --bins, --obs-low and --obs-high need one value per observation dimension; "
        "got 3, 4 and 4 values"
    )


def write_checkpoint(path: Path, **overrides) -> str:
    """A checkpoint as training writes it (default settings, step 0), with `overrides`."""
    state = {
        "kind": "q-table/1",
        "env_id": "CartPole-v1",
        "run_name": "x",
        "args": json.loads(json.dumps(qlearning_cartpole.asdict(qlearning_cartpole.Args()))),
        "global_step": 0,
        "q_table": np.zeros((720, 2)),
        "replay": qlearning_cartpole.new_replay(0),
        **overrides,
    }
    qlearning_cartpole.save_checkpoint(path, state)
    return path.name


def test_bad_checkpoints_exit_2_with_one_line(capsys, workdir):
    good = write_checkpoint(workdir / "good.npz")
    data = (workdir / good).read_bytes()
    (workdir / "truncated.npz").write_bytes(data[: len(data) // 2])
    (workdir / "text.npz").write_text("not a checkpoint")
    np.save(workdir / "array.npy", np.zeros(3))
    # An object array needs pickle to load; allow_pickle=False refuses it instead of running it.
    np.savez(workdir / "pickled.npz", kind=np.array([{"x": 1}], dtype=object))
    np.savez(workdir / "foreign.npz", q_table=np.zeros(3))  # an npz, but not one of ours
    acrobot_args = {**json.loads(str(load_npz(workdir / good)["args"])), "env_id": "Acrobot-v1"}
    acrobot_args.update(bins=[2] * 6, obs_low=[-1] * 6, obs_high=[1] * 6)
    cases = {
        "truncated.npz": "not a readable checkpoint",
        "text.npz": "not a readable checkpoint",
        "pickled.npz": "not a readable checkpoint",
        "array.npy": "not a checkpoint of this project",
        "foreign.npz": "not a checkpoint of this project",
        write_checkpoint(workdir / "other.npz", kind="dqn/1"): "holds a dqn/1 checkpoint",
        write_checkpoint(workdir / "no-bins.npz", args={}): "does not say how it discretised",
        write_checkpoint(workdir / "no-table.npz", q_table=None): "not a readable checkpoint",
    }
    for flag in ("--resume", "--eval-checkpoint"):
        for name, message in cases.items():
            code, lines = run_in_process(capsys, flag, str(workdir / name))
            assert code == 2, (flag, name)
            assert len(lines) == 1 and lines[0].startswith("error: "), (flag, name, lines)
            assert message in lines[0], (flag, name, lines)
    # The settings come from the checkpoint: an explicit flag against them is refused.
    write_checkpoint(
        workdir / "acrobot.npz", env_id="Acrobot-v1", args=acrobot_args, q_table=np.zeros((64, 3))
    )
    refused = {
        ("--resume", good, "--seed", "2"): "--seed is 2 but the checkpoint was trained with 1",
        ("--resume", good, "--bins", "3", "3", "8", "12"): "--bins is (3, 3, 8, 12) but the",
        ("--resume", good, "--num-envs", "4"): "--num-envs is 4 but the checkpoint was",
        ("--resume", "acrobot.npz", "--env-id", "CartPole-v1"): "--env-id is 'CartPole-v1' but",
        ("--eval-checkpoint", "acrobot.npz", "--env-id", "CartPole-v1"): "--env-id is 'CartPole",
        ("--eval-checkpoint", good, "--bins", "2"): "--bins is (2,) but the checkpoint was trained",
        ("--resume", good, "--eval-checkpoint", good): "not both",
    }
    for argv, message in refused.items():
        code, lines = run_in_process(capsys, *argv)
        assert code == 2, argv
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, lines)
        assert message in lines[0], (argv, lines)
    assert not (workdir / "runs").exists()


def test_checkpoints_reach_the_disk_before_and_after_they_replace_the_old_one(
    tmp_path, monkeypatch
):
    """fsync of the new file before os.replace, of the folder after it, and of a new folder's
    parent once: a power loss cannot leave an empty file under the checkpoint's name, nor lose
    the folder it is in."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name))
        real_fsync(fd)

    def replace(source, target):
        events.append(("replace", Path(target).name))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "run" / "agent.npz"
    write_checkpoint(path)
    once = [("fsync", "agent.npz.tmp"), ("replace", "agent.npz"), ("fsync", "run")]
    assert events == [("fsync", tmp_path.name), *once]
    events.clear()
    write_checkpoint(path)  # into the folder that is there now
    assert events == once
    assert int(load_npz(path)["global_step"]) == 0
    assert [p.name for p in path.parent.iterdir()] == ["agent.npz"]


def test_an_evaluated_kind_evaluates_but_does_not_resume(capsys, workdir, monkeypatch):
    """The rule for the day the file changes: an earlier kind named in EVALUATED_KINDS is still
    evaluated, and --resume of it is refused in one line."""
    monkeypatch.setattr(qlearning_cartpole, "EVALUATED_KINDS", ("q-table/0",))
    old = write_checkpoint(workdir / "old.npz", kind="q-table/0")
    qlearning_cartpole.main(qlearning_cartpole.parse_args(["--eval-checkpoint", old]))
    assert eval_figures(capsys.readouterr().out)[2] == "10"
    code, lines = run_in_process(capsys, "--resume", old)
    assert code == 2 and len(lines) == 1, lines
    assert "holds a q-table/0 checkpoint" in lines[0] and "not resumed" in lines[0]


# --- learning --------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_args_solve_cartpole(run_script):
    """Default args, seed 1, the default budget (2M steps): the greedy policy must average >= 475
    of 500 over 100 evaluation episodes."""
    result = run_script(SCRIPT, "--eval-episodes", "100", "--no-save-model")
    assert result.returncode == 0, result.describe()
    eval_returns = result.values("eval/episodic_return")
    assert len(eval_returns) == 100
    assert np.mean(eval_returns) >= 475, eval_returns
    assert result.steps("charts/SPS")[-1] == 2_000_000
