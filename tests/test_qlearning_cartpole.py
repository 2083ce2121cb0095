"""Tests of qlearning_cartpole.py: pure parts against slow references, then the real CLI end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tyro
from conftest import HEADLESS_ENV, ROOT

sys.path.insert(0, str(ROOT))
import qlearning_cartpole  # noqa: E402

SCRIPT = "qlearning_cartpole.py"
SHAPE = ("--num-envs", "8")
TINY = ("--total-timesteps", "4096", *SHAPE, "--log-freq", "1024", "--eval-episodes", "2")


def load_npz(path) -> dict:
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


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
    # Q <- 1 + 0.5 * (5.5 - 1) = 3.25.  s=1, a=0, r=1, terminal: target = 1; Q <- 3 + 0.5 * (1 - 3) = 2.
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
    step = dict(
        states=np.array([0]), actions=np.array([0]), rewards=np.array([1.0]), next_states=np.array([1])
    )
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
    step = dict(
        actions=np.array([1]), rewards=np.array([1.0]), next_states=np.array([1]), terminated=np.array([True])
    )
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
    (checkpoint,) = result.checkpoints("*.npz")
    state = load_npz(checkpoint)  # no pickle needed
    assert str(state["script"]) == "qlearning_cartpole" and str(state["env_id"]) == "CartPole-v1"
    assert int(state["global_step"]) == 4096 and int(state["iteration"]) == 512
    assert state["q_table"].shape == (3 * 3 * 8 * 10, 2) and np.abs(state["q_table"]).sum() > 0
    assert json.loads(str(state["args"]))["bins"] == [3, 3, 8, 10]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("done: 4096 steps") and "episodes/s" in last, last


def test_same_seed_gives_identical_logged_numbers(tmp_path):
    from conftest import run_script_in

    first = run_script_in(tmp_path / "a", SCRIPT, *TINY, "--no-save-model")
    second = run_script_in(tmp_path / "b", SCRIPT, *TINY, "--no-save-model")
    assert first.returncode == 0 and second.returncode == 0, first.describe() + second.describe()
    for key in ("charts/episodic_return", "losses/td_loss", "losses/q_values", "eval/episodic_return"):
        assert first.scalars[key] == second.scalars[key], key
    third = run_script_in(tmp_path / "c", SCRIPT, *TINY, "--no-save-model", "--seed", "2")
    assert third.scalars["losses/td_loss"] != first.scalars["losses/td_loss"]


def test_eval_checkpoint_evaluates_the_saved_table_and_records_video(run_script):
    trained = run_script(SCRIPT, *TINY)
    assert trained.returncode == 0, trained.describe()
    (checkpoint,) = trained.checkpoints("*.npz")
    # The discretisation comes from the checkpoint: other --bins on the command line are ignored.
    evaluated = run_script(
        SCRIPT, "--eval-checkpoint", str(checkpoint), "--eval-episodes", "3", "--capture-video", "--bins", "2"
    )
    assert evaluated.returncode == 0, evaluated.describe()
    line = evaluated.stdout.strip().splitlines()[-1]
    assert line.startswith("eval: return ") and "over 3 episodes" in line
    assert len(list((evaluated.workdir / "videos").rglob("*.mp4"))) == 3


def test_resume_continues_to_the_same_final_step(run_script):
    first = run_script(SCRIPT, *TINY)
    assert first.returncode == 0, first.describe()
    (checkpoint,) = first.checkpoints("*.npz")
    table = load_npz(checkpoint)["q_table"]
    changed = run_script(SCRIPT, *TINY, "--bins", "3", "3", "8", "12", "--resume", str(checkpoint))
    assert (
        changed.returncode == 2
        and "--bins is [3, 3, 8, 12] but the checkpoint was trained with [3, 3, 8, 10]" in changed.stderr
    ), changed.describe()

    resumed = run_script(SCRIPT, *TINY, "--total-timesteps", "8192", "--resume", str(checkpoint))
    assert resumed.returncode == 0, resumed.describe()
    assert resumed.checkpoints("*.npz") == [checkpoint]  # same run folder, same file
    state = load_npz(checkpoint)
    assert int(state["global_step"]) == 8192 and int(state["iteration"]) == 1024
    assert not np.array_equal(state["q_table"], table)  # it went on learning from the saved table
    assert resumed.steps("charts/SPS") == list(range(1024, 8193, 1024))  # 1..4 then 5..8 resumed


def test_replay_runs_and_is_saved_and_resumed(run_script):
    replay = ("--replay-size", "512", "--replay-batch-size", "32")
    first = run_script(SCRIPT, *TINY, *replay)
    assert first.returncode == 0, first.describe()
    (checkpoint,) = first.checkpoints("*.npz")
    state = load_npz(checkpoint)
    assert state["replay_states"].shape == (512,) and int(state["replay_count"]) == 512
    resumed = run_script(SCRIPT, *TINY, *replay, "--total-timesteps", "8192", "--resume", str(checkpoint))
    assert resumed.returncode == 0, resumed.describe()
    assert int(load_npz(checkpoint)["global_step"]) == 8192


def test_ctrl_c_saves_a_checkpoint_that_resumes_to_the_full_budget(run_script):
    budget = ("--total-timesteps", "400000", "--num-envs", "64", "--checkpoint-freq", "1024")
    budget = (*budget, "--eval-episodes", "1", "--log-freq", "100000")

    def first_checkpoint_written(workdir):
        return any(workdir.glob("runs/*/qlearning_cartpole.npz"))

    interrupted = run_script(SCRIPT, *budget, interrupt_when=first_checkpoint_written)
    assert interrupted.returncode == 130, interrupted.describe()
    assert "interrupted at step" in interrupted.stderr and "Traceback" not in interrupted.stderr
    (checkpoint,) = interrupted.checkpoints("*.npz")
    step = int(load_npz(checkpoint)["global_step"])
    assert 0 < step < 400_000, "the run finished before Ctrl-C: make the budget larger"
    assert f"--resume {checkpoint.relative_to(interrupted.workdir)}" in interrupted.stderr

    resumed = run_script(SCRIPT, *budget, "--resume", str(checkpoint))
    assert resumed.returncode == 0, resumed.describe()
    assert int(load_npz(checkpoint)["global_step"]) == 400_000


def test_track_writes_an_offline_wandb_run(run_script):
    result = run_script(SCRIPT, *TINY, "--track", "--no-save-model")
    assert result.returncode == 0, result.describe()
    assert list((result.workdir / "wandb").glob("offline-run-*")), "no offline W&B run"
    # sync_tensorboard saw the writer: W&B keeps a copy of the run's TensorBoard events.
    assert list((result.workdir / "wandb").glob("offline-run-*/files/runs/*/events.out.tfevents.*"))


def test_any_discrete_env_works_with_one_bin_count_per_dimension(run_script):
    result = run_script(
        SCRIPT, "--env-id", "Acrobot-v1", "--total-timesteps", "1024", "--num-envs", "4",
        "--eval-episodes", "1", "--no-save-model",
        "--bins", "2", "2", "2", "2", "3", "3",
        "--obs-low", "-1", "-1", "-1", "-1", "-12", "-28",
        "--obs-high", "1", "1", "1", "1", "12", "28",
    )  # fmt: skip
    assert result.returncode == 0, result.describe()
    assert result.values("eval/episodic_return")


def test_non_finite_values_stop_with_a_saved_state(tmp_path):
    """An env whose reward is infinite makes the TD error NaN: stop, save, exit 1 with the step."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(
        "import sys, numpy as np, gymnasium as gym, tyro\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import qlearning_cartpole as q\n"
        "make = q.make_envs\n"
        "q.make_envs = lambda *a: gym.wrappers.vector.TransformReward(make(*a), lambda r: r * np.inf)\n"
        "q.main(tyro.cli(q.Args))\n"
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
    """Parse `argv` with the script's real tyro parser and run main; return (exit code, stderr lines).

    Bad input must be rejected before any heavy work, so these cases run in-process: the same
    code path as the command line without paying an interpreter start per case.
    """
    with pytest.raises(SystemExit) as exit_info:
        qlearning_cartpole.main(tyro.cli(qlearning_cartpole.Args, args=list(argv)))
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
        (("--gamma", "1.5"), "[0, 1]"),
        (("--start-epsilon", "-0.1"), "[0, 1]"),
        (("--exploration-fraction", "2"), "[0, 1]"),
        (("--learning-rate", "0"), "(0, 1]"),
        (("--end-learning-rate", "1.5"), "(0, 1]"),
        (("--bins", "3", "3", "0", "10"), "--bins must all be positive"),
        (("--bins", "3", "3", "8"), "one value per observation dimension"),
        (("--obs-low", "-2.4", "-1.5", "0.3", "-1.5"), "must be finite and below --obs-high"),
        (("--bins", "100", "100", "100", "100"), "too large"),
        (("--replay-size", "10", "--num-envs", "16"), "cannot hold one step of 16 envs"),
        (("--resume", "missing.npz"), "does not exist"),
        (("--eval-checkpoint", "missing.npz"), "does not exist"),
        (("--resume", "a.npz", "--eval-checkpoint", "b.npz"), "not both"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, args, message):
    code, lines = run_in_process(capsys, *args)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_bad_input_through_the_real_command_line(run_script):
    result = run_script(SCRIPT, "--bins", "3", "3", "8")
    assert result.returncode == 2, result.describe()
    assert result.stderr.strip() == (
        "error: --bins, --obs-low and --obs-high need one value per observation dimension; "
        "got 3, 4 and 4 values"
    )


def test_bad_checkpoints_exit_2_with_one_line(capsys, tmp_path):
    def write(name, **overrides):
        state = {
            "script": "qlearning_cartpole",
            "env_id": "CartPole-v1",
            "run_name": "x",
            "args": json.dumps({}),
            "global_step": 0,
            "iteration": 0,
            "q_table": np.zeros((720, 2)),
            **overrides,
        }
        qlearning_cartpole.save_checkpoint(tmp_path / name, state)
        return name

    data = (tmp_path / write("good.npz")).read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.npz").write_text("not a checkpoint")
    np.save(tmp_path / "array.npy", np.zeros(3))
    # An object array needs pickle to load; allow_pickle=False refuses it instead of running it.
    np.savez(tmp_path / "pickled.npz", script=np.array([{"x": 1}], dtype=object))
    np.savez(tmp_path / "foreign.npz", q_table=np.zeros(3))  # an npz, but not one of ours
    cases = {
        "truncated.npz": "not a readable checkpoint",
        "text.npz": "not a readable checkpoint",
        "pickled.npz": "not a readable checkpoint",
        "array.npy": "not a checkpoint of this project",
        "foreign.npz": "not a checkpoint of this project",
        write("other.npz", script="dqn_flappy"): "saved by dqn_flappy.py",
        write("acrobot.npz", env_id="Acrobot-v1"): "pass --env-id Acrobot-v1",
    }
    eval_only = {write("no-bins.npz"): "does not say how it discretised observations"}
    for flag, flag_cases in (("--resume", cases), ("--eval-checkpoint", {**cases, **eval_only})):
        for name, message in flag_cases.items():
            code, lines = run_in_process(capsys, flag, str(tmp_path / name))
            assert code == 2, (flag, name)
            assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (
                flag,
                name,
                lines,
            )


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
