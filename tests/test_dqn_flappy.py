"""Tests of dqn_flappy.py: replay buffer and targets against slow references, then the real CLI."""

from __future__ import annotations

import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT))
import dqn_flappy  # noqa: E402

SCRIPT = "dqn_flappy.py"
TINY = (
    "--total-timesteps", "1200", "--learning-starts", "400", "--buffer-size", "2000",
    "--batch-size", "32", "--eval-episodes", "2", "--max-episode-steps", "200",
)  # fmt: skip


# --- replay buffer ---------------------------------------------------------------------------


class NumberedFrames(gym.Env):
    """A toy env whose 3x3 uint8 frames encode (episode, step): every frame is unique.

    Episodes last 1 to 7 steps and end by termination or by truncation at random, so a stream of
    them exercises every kind of episode boundary, including one-step episodes.
    """

    observation_space = gym.spaces.Box(0, 255, (3, 3), np.uint8)
    action_space = gym.spaces.Discrete(1_000_000)

    def __init__(self, env_index: int):
        self.env_index, self.episode, self.t = env_index, -1, 0
        self.frame_rng = np.random.default_rng(100 + env_index)

    def frame(self):
        return np.full((3, 3), (self.env_index * 50 + self.episode * 7 + self.t) % 256, np.uint8)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode, self.t = self.episode + 1, 0
        self.length = int(self.frame_rng.integers(1, 8))
        self.ends_by_termination = bool(self.frame_rng.random() < 0.5)
        return self.frame(), {}

    def step(self, action):
        self.t += 1
        ended = self.t >= self.length
        terminated, truncated = (
            ended and self.ends_by_termination,
            ended and not self.ends_by_termination,
        )
        return self.frame(), float(action) / 1000.0, terminated, truncated, {}


def reference_stacks(num_envs, stack, steps, seed=0):
    """Drive stacked toy envs as `main` does; return the stream to store and the transitions.

    The stacks come from gymnasium's own FrameStackObservation (padding_type="reset"), the
    wrapper the agent acts through; the buffer must give back exactly these arrays. Actions are
    unique ids, so a sampled transition names the reference transition it must equal.
    Returns (rows, transitions): rows are the `add` calls in order; transitions maps an action
    id to (obs, reward, terminated, next_obs) for every real transition (autoreset steps are not).
    """
    envs = gym.vector.SyncVectorEnv(
        [
            lambda i=i: gym.wrappers.FrameStackObservation(NumberedFrames(i), stack, padding_type="reset")
            for i in range(num_envs)
        ]
    )
    obs, _ = envs.reset(seed=seed)
    final = np.zeros(num_envs, dtype=bool)
    rows, transitions = [], {}
    for step in range(steps):
        actions = np.arange(num_envs) + step * num_envs + 1
        next_obs, rewards, terminated, truncated, _ = envs.step(actions)
        rows.append((obs.copy(), actions, rewards, terminated, final.copy()))
        for e in range(num_envs):
            if not final[e]:  # the step after an episode ended is the autoreset: no transition
                transitions[int(actions[e])] = (
                    obs[e].copy(),
                    rewards[e],
                    terminated[e],
                    next_obs[e].copy(),
                )
        final = terminated | truncated
        obs = next_obs
    envs.close()
    return rows, transitions


@pytest.mark.parametrize(
    ("num_envs", "stack", "capacity", "steps"), [(3, 4, 1000, 60), (2, 4, 17, 60), (1, 1, 10, 40)]
)
def test_buffer_returns_exactly_the_stored_stacks_across_episode_boundaries(num_envs, stack, capacity, steps):
    rows, transitions = reference_stacks(num_envs, stack, steps)
    frame_shape = rows[0][0].shape[2:] if stack > 1 else rows[0][0].shape[1:]
    buffer = dqn_flappy.ReplayBuffer(capacity, num_envs, frame_shape, np.uint8, stack, seed=3)
    for row in rows:
        buffer.add(*row)
    # Only transitions whose frames are all still in the ring may come back; with wrap-around the
    # oldest ones are gone. The newest stored row has no next observation yet.
    first_kept_step = max(0, steps - capacity) + (stack - 1 if steps > capacity else 0)
    reachable = {
        int(a)
        for step, row in enumerate(rows[:-1])
        if step >= first_kept_step
        for a, f in zip(row[1], row[4], strict=True)
        if not f
    }
    obs, actions, rewards, terminated, next_obs = buffer.sample(4_000)
    seen = set()
    for i, action in enumerate(actions.tolist()):
        assert action in transitions, f"sampled the autoreset step of action {action}"
        expected_obs, reward, term, expected_next = transitions[action]
        np.testing.assert_array_equal(obs[i], expected_obs)
        np.testing.assert_array_equal(next_obs[i], expected_next)
        assert rewards[i] == np.float32(reward) and terminated[i] == term
        seen.add(action)
    assert seen == reachable  # uniform sampling reaches every stored transition and nothing else
    assert obs.dtype == np.uint8 and buffer.frames.nbytes == capacity * num_envs * int(np.prod(frame_shape))


def test_buffer_stores_each_frame_once():
    buffer = dqn_flappy.ReplayBuffer(1000, 2, (84, 84), np.uint8, stack=4)
    assert buffer.frames.shape == (1000, 2, 84, 84)  # not (1000, 2, 4, 84, 84), nor a next_obs copy


# --- targets and schedules -------------------------------------------------------------------


def test_td_targets_with_and_without_double_dqn_against_hand_computation():
    rewards = torch.tensor([1.0, 0.1, -1.0])
    terminated = torch.tensor([False, False, True])
    next_q_target = torch.tensor([[2.0, 5.0], [3.0, 1.0], [7.0, 9.0]])
    next_q_online = torch.tensor([[4.0, 0.0], [0.0, 6.0], [1.0, 2.0]])
    gamma = 0.9
    # DQN: max over the target network's own values.
    dqn = dqn_flappy.td_targets(rewards, terminated, next_q_target, None, gamma)
    np.testing.assert_allclose(dqn.numpy(), [1.0 + 0.9 * 5.0, 0.1 + 0.9 * 3.0, -1.0], rtol=1e-6)
    # Double DQN: the online net picks (a' = 0, 1, 1), the target net values.
    double = dqn_flappy.td_targets(rewards, terminated, next_q_target, next_q_online, gamma)
    np.testing.assert_allclose(double.numpy(), [1.0 + 0.9 * 2.0, 0.1 + 0.9 * 1.0, -1.0], rtol=1e-6)


def test_truncated_transitions_bootstrap_and_terminated_ones_do_not():
    # The buffer keeps `terminated` only: a time-limit truncation reaches td_targets as not
    # terminated, so its target still adds gamma * Q(final observation).
    next_q = torch.tensor([[10.0, 0.0]])
    truncated_target = dqn_flappy.td_targets(torch.tensor([0.1]), torch.tensor([False]), next_q, None, 0.5)
    terminated_target = dqn_flappy.td_targets(torch.tensor([0.1]), torch.tensor([True]), next_q, None, 0.5)
    assert truncated_target.item() == pytest.approx(5.1) and terminated_target.item() == pytest.approx(0.1)


def test_linear_epsilon_schedule():
    values = [dqn_flappy.linear_schedule(1.0, 0.05, 100, step) for step in (0, 50, 100, 1000)]
    np.testing.assert_allclose(values, [1.0, 0.525, 0.05, 0.05])


def test_polyak_and_hard_target_updates():
    online, target = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    before = target.weight.detach().clone()
    dqn_flappy.update_target(target, online, 0.25)
    np.testing.assert_allclose(
        target.weight.detach(), 0.75 * before + 0.25 * online.weight.detach(), rtol=1e-6
    )
    dqn_flappy.update_target(target, online, 1.0)
    assert torch.equal(target.weight, online.weight)


# --- the CLI ---------------------------------------------------------------------------------


def test_smoke_run_logs_every_key_and_saves_a_checkpoint(run_script):
    result = run_script(SCRIPT, *TINY)
    assert result.returncode == 0, result.describe()
    for key in (
        "charts/episodic_return", "charts/episodic_length", "charts/episodic_score", "charts/SPS",
        "charts/epsilon", "charts/learning_rate", "losses/td_loss", "losses/q_values",
        "eval/episodic_return", "eval/episodic_score",
    ):  # fmt: skip
        assert key in result.scalars, f"{key} not logged"
    epsilons = result.values("charts/epsilon")
    assert epsilons[0] < 1.0 and epsilons == sorted(epsilons, reverse=True)
    for ret, length, score in zip(
        result.values("charts/episodic_return"), result.values("charts/episodic_length"),
        result.values("charts/episodic_score"), strict=True,
    ):  # fmt: skip
        # The true game return: a step is worth at most +0.1, a pipe +1, and never below -1.
        assert -1.0 * length - 1e-4 <= ret <= 0.1 * length + 0.9 * score + 1e-4, (
            ret,
            length,
            score,
        )
    assert result.steps("losses/td_loss")[0] >= 400  # nothing is learned before learning starts
    assert len(result.values("eval/episodic_score")) == 2
    (checkpoint,) = result.checkpoints()
    state = torch.load(checkpoint, weights_only=True)
    assert state["script"] == "dqn_flappy" and state["env_id"] == "FlappyBird-v0"
    assert state["global_step"] == 1200 and {
        "model",
        "target_model",
        "optimizer",
        "epsilon",
    } <= set(state)
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("done: 1200 steps") and "over 2 episodes, pipes " in last


def test_same_seed_gives_identical_logged_numbers(tmp_path):
    from conftest import run_script_in

    first = run_script_in(tmp_path / "a", SCRIPT, *TINY, "--no-save-model")
    second = run_script_in(tmp_path / "b", SCRIPT, *TINY, "--no-save-model")
    assert first.returncode == 0 and second.returncode == 0, first.describe() + second.describe()
    for key in ("charts/episodic_return", "losses/td_loss", "losses/q_values", "eval/episodic_return"):
        assert first.scalars[key] == second.scalars[key], key
    third = run_script_in(tmp_path / "c", SCRIPT, *TINY, "--no-save-model", "--seed", "2")
    assert third.scalars["charts/episodic_return"] != first.scalars["charts/episodic_return"]


def test_eval_checkpoint_reports_pipes_and_records_the_game(run_script):
    trained = run_script(SCRIPT, *TINY)
    assert trained.returncode == 0, trained.describe()
    (checkpoint,) = trained.checkpoints()
    evaluated = run_script(
        SCRIPT, "--eval-checkpoint", str(checkpoint), "--eval-episodes", "2", "--capture-video"
    )
    assert evaluated.returncode == 0, evaluated.describe()
    line = evaluated.stdout.strip().splitlines()[-1]
    assert line.startswith("eval: return ") and "over 2 episodes, pipes " in line and str(checkpoint) in line
    videos = list((evaluated.workdir / "videos").rglob("*.mp4"))
    assert len(videos) == 2


def test_resume_continues_to_the_same_final_step(run_script):
    first = run_script(SCRIPT, *TINY)
    assert first.returncode == 0, first.describe()
    (checkpoint,) = first.checkpoints()
    resumed = run_script(SCRIPT, *TINY[2:], "--total-timesteps", "2400", "--resume", str(checkpoint))
    assert resumed.returncode == 0, resumed.describe()
    assert resumed.checkpoints() == [checkpoint] and len(resumed.run_dirs) == 1  # same run folder
    state = torch.load(checkpoint, weights_only=True)
    assert state["global_step"] == 2400 and state["iteration"] == 2400 // 8  # 8 envs by default
    assert resumed.steps("charts/SPS") == [1000, 1200, 2000, 2400]  # first run, then resumed
    # The buffer is not in the checkpoint: the resumed run refills --learning-starts steps first.
    resumed_updates = [step for step in resumed.steps("losses/td_loss") if step > 1200]
    assert resumed_updates and min(resumed_updates) >= 1600


def test_ctrl_c_saves_a_checkpoint_that_resumes_to_the_full_budget(run_script):
    def training_has_logged(workdir):
        return any(f.stat().st_size > 3000 for f in workdir.glob("runs/*/events.out.tfevents.*"))

    budget = ("--total-timesteps", "500000", "--learning-starts", "500", "--max-episode-steps", "200")
    interrupted = run_script(SCRIPT, *budget, interrupt_when=training_has_logged)
    assert interrupted.returncode == 130, interrupted.describe()
    assert "interrupted at step" in interrupted.stderr and "Traceback" not in interrupted.stderr
    (checkpoint,) = interrupted.checkpoints()
    step = torch.load(checkpoint, weights_only=True)["global_step"]
    assert 0 < step < 500000 and "(continue with --resume " in interrupted.stderr
    resumed = run_script(
        SCRIPT,
        *budget[2:],
        "--total-timesteps",
        str(step + 400),
        "--eval-episodes",
        "1",
        "--resume",
        str(checkpoint),
    )
    assert resumed.returncode == 0, resumed.describe()
    assert torch.load(checkpoint, weights_only=True)["global_step"] == step + 400


def test_track_writes_an_offline_wandb_run(run_script):
    result = run_script(SCRIPT, *TINY, "--track", "--no-save-model")
    assert result.returncode == 0, result.describe()
    assert list((result.workdir / "wandb").glob("offline-run-*")), "no offline W&B run"


def test_pixels_mode_trains_on_stacked_frames_and_records_video(run_script):
    result = run_script(
        SCRIPT, "--obs-type", "pixels", "--total-timesteps", "300", "--learning-starts", "100",
        "--buffer-size", "400", "--batch-size", "8", "--eval-episodes", "1", "--max-episode-steps", "100",
        "--capture-video",
    )  # fmt: skip
    assert result.returncode == 0, result.describe()
    assert result.values("losses/td_loss") and result.values("eval/episodic_score")
    assert len(list((result.workdir / "videos").rglob("*.mp4"))) == 1
    (checkpoint,) = result.checkpoints()
    weights = torch.load(checkpoint, weights_only=True)["model"]
    assert weights["network.0.weight"].shape == (32, 4, 8, 8)  # the Nature CNN on 4 stacked frames


def test_lidar_mode_and_other_discrete_envs_work(run_script):
    lidar = run_script(SCRIPT, *TINY, "--obs-type", "lidar", "--no-save-model")
    assert lidar.returncode == 0, lidar.describe()
    assert lidar.values("losses/td_loss") and lidar.values("eval/episodic_score")
    cartpole = run_script(SCRIPT, *TINY, "--env-id", "CartPole-v1", "--no-save-model")
    assert cartpole.returncode == 0, cartpole.describe()
    last = cartpole.stdout.strip().splitlines()[-1]
    assert "eval return " in last and "pipes" not in last  # CartPole has no score to report


def test_non_finite_loss_stops_with_a_saved_state(run_script):
    result = run_script(SCRIPT, *TINY, "--learning-rate", "1e30", "--max-grad-norm", "1e30")
    assert result.returncode == 1, result.describe()
    assert "loss became non-finite at step" in result.stderr
    assert result.checkpoints("*_nan.pt")


def write_checkpoint(path, **overrides):
    state = {"script": "dqn_flappy", "env_id": "FlappyBird-v0", "run_name": "x", "args": {}, **overrides}
    torch.save(state, path)
    return str(path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--env-id", "Pendulum-v1"), "needs Discrete"),
        (("--env-id", "FlapyBird-v0"), "did you mean FlappyBird-v0"),
        (("--env-id", "NoSuchEnv-v0"), "unknown environment id"),
        (("--env-id", "CartPole-v1", "--obs-type", "lidar"), "needs a FlappyBird environment"),
        (("--total-timesteps", "0"), "must be positive"),
        (("--batch-size", "-1"), "must be positive"),
        (("--buffer-size", "16", "--batch-size", "32"), "smaller than --batch-size"),
        (("--train-frequency", "0"), "must be positive"),
        (("--gamma", "1.5"), "[0, 1]"),
        (("--end-e", "-0.1"), "[0, 1]"),
        (("--tau", "0"), "(0, 1]"),
        (("--learning-rate", "0"), "must be positive"),
        (("--resume", "missing.pt"), "does not exist"),
        (("--eval-checkpoint", "missing.pt"), "does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_line(run_script, args, message):
    result = run_script(SCRIPT, *args)
    assert result.returncode == 2, result.describe()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


@pytest.mark.parametrize("flag", ["--resume", "--eval-checkpoint"])
def test_bad_checkpoints_exit_2_with_one_line(run_script, tmp_path, flag):
    good = run_script(SCRIPT, *TINY)
    assert good.returncode == 0, good.describe()
    (checkpoint,) = good.checkpoints()
    data = checkpoint.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    cases = {
        "truncated.pt": "not a readable checkpoint",
        "text.pt": "not a readable checkpoint",
        "list.pt": "not a checkpoint of this project",
        write_checkpoint(tmp_path / "other.pt", script="ppo_cartpole"): "saved by ppo_cartpole.py",
        write_checkpoint(tmp_path / "cartpole.pt", env_id="CartPole-v1"): "pass --env-id CartPole-v1",
    }
    for name, message in cases.items():
        result = run_script(SCRIPT, flag, str(tmp_path / name))
        assert result.returncode == 2, (name, result.describe())
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (name, result.stderr)
    if flag == "--resume":  # (--eval-checkpoint rebuilds the network from the saved args)
        mismatch = run_script(SCRIPT, flag, str(checkpoint), "--obs-type", "lidar")
        assert mismatch.returncode == 2 and "does not match these args" in mismatch.stderr, (
            mismatch.describe()
        )


# --- learning --------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_args_learn_to_pass_pipes(run_script):
    """Default args (features mode, 250k steps), seed 1: the greedy policy averages >= 10 pipes.

    An untrained or random policy passes none (the bird falls or flies into the first pipe).
    """
    result = run_script(
        SCRIPT, "--eval-episodes", "10", "--no-save-model", timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.describe()
    scores = result.values("eval/episodic_score")
    assert len(scores) == 10
    assert np.mean(scores) >= 10, scores
