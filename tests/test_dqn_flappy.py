"""Tests of dqn_flappy.py: replay buffer and targets against slow references, then the real CLI."""

from __future__ import annotations

import importlib.util
import re
import signal
import sys
import time
from pathlib import Path

import cv2
import gymnasium as gym
import imageio.v3 as iio
import numpy as np
import pytest
import torch
from conftest import ROOT, read_scalars, read_wandb_runs

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

    def make(i):  # stack None: the bare frames, as a vector observation is stored
        env = NumberedFrames(i)
        return (
            env
            if stack is None
            else gym.wrappers.FrameStackObservation(env, stack, padding_type="reset")
        )

    envs = gym.vector.SyncVectorEnv([lambda i=i: make(i) for i in range(num_envs)])
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
    ("num_envs", "stack", "capacity", "steps"),
    [(3, 4, 1000, 60), (2, 4, 17, 60), (2, 1, 10, 40), (1, None, 10, 40)],
)
def test_buffer_returns_exactly_the_stored_stacks_across_episode_boundaries(
    num_envs, stack, capacity, steps
):
    rows, transitions = reference_stacks(num_envs, stack, steps)
    frame_shape = rows[0][0].shape[1:] if stack is None else rows[0][0].shape[2:]
    buffer = dqn_flappy.ReplayBuffer(capacity, num_envs, frame_shape, np.uint8, stack, seed=3)
    for row in rows:
        buffer.add(*row)
    # Only transitions whose frames are all still in the ring may come back; with wrap-around the
    # oldest ones are gone. The newest stored row has no next observation yet.
    first_kept_step = max(0, steps - capacity) + ((stack or 1) - 1 if steps > capacity else 0)
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
    assert obs.dtype == np.uint8 and buffer.frames.nbytes == capacity * num_envs * int(
        np.prod(frame_shape)
    )


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
    truncated_target = dqn_flappy.td_targets(
        torch.tensor([0.1]), torch.tensor([False]), next_q, None, 0.5
    )
    terminated_target = dqn_flappy.td_targets(
        torch.tensor([0.1]), torch.tensor([True]), next_q, None, 0.5
    )
    assert truncated_target.item() == pytest.approx(
        5.1
    ) and terminated_target.item() == pytest.approx(0.1)


@pytest.mark.parametrize("repeat", [1, 2, 3])
def test_action_repeat_plays_each_action_for_its_frames_and_sums_their_rewards(repeat):
    """The slow way: the bare game, stepped frame by frame, the same action `repeat` times (fewer
    when the episode ends first). The wrapped env must give the sums and the last frame's state,
    and RecordEpisodeStatistics, beneath the repeat, the episode's length in frames."""
    args = dqn_flappy.Args(action_repeat=repeat, max_episode_steps=10_000)
    env = dqn_flappy.make_env(args)
    bare = gym.make("FlappyBird-v0", max_episode_steps=10_000, **dqn_flappy.env_kwargs(args))
    obs, _ = env.reset(seed=3)
    expected_obs, _ = bare.reset(seed=3)
    rng, frames, agent_steps = np.random.default_rng(0), 0, 0
    for _ in range(3):  # episodes: the random bird dies within a few seconds
        done = False
        while not done:
            action = int(rng.random() < 0.15)
            obs, reward, terminated, truncated, info = env.step(action)
            expected_reward = 0.0
            for _ in range(repeat):
                expected_obs, frame_reward, expected_terminated, _, expected_info = bare.step(
                    action
                )
                expected_reward, frames = expected_reward + frame_reward, frames + 1
                if expected_terminated:
                    break
            agent_steps += 1
            np.testing.assert_allclose(obs, expected_obs, rtol=1e-6)
            assert reward == pytest.approx(expected_reward) and terminated == expected_terminated
            assert info["score"] == expected_info["score"]
            done = terminated or truncated
        assert info["episode"]["l"] == frames  # frames, not agent steps
        obs, _ = env.reset()
        expected_obs, _ = bare.reset()
        frames = 0
    assert agent_steps > 30


def test_one_agent_step_discounts_gamma_to_the_power_of_its_frames(monkeypatch):
    """dqn_update hands td_targets the discount of an agent step: gamma per game frame, over its
    --action-repeat frames."""
    discounts = []
    real_td_targets = dqn_flappy.td_targets

    def recording_td_targets(rewards, terminated, next_q_target, next_q_online, gamma):
        discounts.append(gamma)
        return real_td_targets(rewards, terminated, next_q_target, next_q_online, gamma)

    monkeypatch.setattr(dqn_flappy, "td_targets", recording_td_targets)
    rb = dqn_flappy.ReplayBuffer(16, 2, (4,), np.float32, None)
    for step in range(8):
        zeros = np.zeros(2, dtype=np.bool_)
        rb.add(np.full((2, 4), step, np.float32), np.zeros(2, int), np.ones(2), zeros, zeros)
    q_network = dqn_flappy.QNetwork((4,), 2, hidden_size=8)
    optimizer = torch.optim.Adam(q_network.parameters())
    for repeat in (1, 3):
        args = dqn_flappy.Args(env_id="CartPole-v1", gamma=0.9, action_repeat=repeat, batch_size=4)
        dqn_flappy.dqn_update(q_network, q_network, optimizer, rb, args, torch.device("cpu"))
    assert discounts == [pytest.approx(0.9), pytest.approx(0.9**3)]


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


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """For runs of `main` inside the test process: the test's temporary folder as the cwd (so a
    regression cannot write runs/ into the checkout), and afterwards the signal handlers and the
    SDL hint that the run installs put back."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SDL_NO_SIGNAL_HANDLERS", raising=False)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield tmp_path
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def run_main(*argv) -> int:
    """`python dqn_flappy.py *argv` inside this process; returns the exit status."""
    try:
        dqn_flappy.main(dqn_flappy.parse_args([str(arg) for arg in argv]))
    except SystemExit as exit_:
        return exit_.code
    return 0


def has_periodic_checkpoint(workdir) -> bool:
    """Training is under way (past its first --checkpoint-freq steps): time to send a signal."""
    return any(workdir.glob("runs/*/checkpoints/*.pt"))


def final_eval(line: str) -> str:
    """The `eval return X ± Y over N episodes[, pipes A ± B]` part of a summary line."""
    return re.search(r"eval return [^;]*", line).group()


# --- Greedy evaluation and the best network ----------------------------------------------------


def test_evaluate_plays_one_seeded_episode_per_env_like_envs_played_one_by_one():
    args = dqn_flappy.Args(env_id="CartPole-v1", max_episode_steps=500)
    torch.manual_seed(0)
    q_network = dqn_flappy.QNetwork((4,), 2, hidden_size=8)
    returns, scores = dqn_flappy.evaluate(q_network, args, 4, 7, torch.device("cpu"))
    expected = []
    for episode in range(4):  # the slow way: one env at a time, reset with seed + i
        env = gym.make("CartPole-v1")
        obs, _ = env.reset(seed=7 + episode)
        total, done = 0.0, False
        while not done:
            with torch.no_grad():
                action = int(q_network(torch.as_tensor(obs, dtype=torch.float32)[None]).argmax())
            obs, reward, terminated, truncated, _ = env.step(action)
            total, done = total + float(reward), terminated or truncated
        expected.append(total)
    assert len(set(expected)) > 1, "the reference episodes should differ to test anything"
    assert returns.tolist() == expected and np.isnan(scores).all()  # CartPole has no score


class RecordingWriter:
    def __init__(self):
        self.logged = []

    def add_scalar(self, key, value, step):
        self.logged.append((step, key, value))


def test_the_best_periodic_evaluation_keeps_its_network(monkeypatch):
    """Each periodic evaluation logs its means; a copy of the network is kept only when it beats
    the best so far, and the delivered network is that copy."""
    args = dqn_flappy.Args(env_id="CartPole-v1", eval_freq=1000, eval_episodes=2)
    q_network = dqn_flappy.QNetwork((4,), 2, hidden_size=8)
    means = iter([1.0, 3.0, 2.0])
    seeds = []

    def fake_evaluate(network, args, episodes, seed, device, video_folder=None):
        seeds.append(seed)
        mean = next(means)
        return np.full(episodes, mean), np.full(episodes, mean / 10)

    monkeypatch.setattr(dqn_flappy, "evaluate", fake_evaluate)
    best, writer = dqn_flappy.fresh_best(args), RecordingWriter()
    kept = {}
    for step in (1000, 2000, 3000):
        with torch.no_grad():
            for parameter in q_network.parameters():
                parameter.fill_(step)
        kept[step] = {name: tensor.clone() for name, tensor in q_network.state_dict().items()}
        dqn_flappy.keep_if_best(best, q_network, args, step, torch.device("cpu"), writer)
    assert best["step"] == 2000 and best["mean_return"] == 3.0
    assert all(torch.equal(best["model"][name], tensor) for name, tensor in kept[2000].items())
    assert writer.logged == [
        logged
        for step, mean in ((1000, 1.0), (2000, 3.0), (3000, 2.0))
        for logged in (
            (step, "charts/greedy_return", mean),
            (step, "charts/greedy_score", mean / 10),
        )
    ]
    # Fresh episodes each time, never those of the final evaluation (seed + EVAL_SEED_OFFSET + i).
    final = set(
        range(args.seed + dqn_flappy.EVAL_SEED_OFFSET, args.seed + dqn_flappy.EVAL_SEED_OFFSET + 10)
    )
    assert len(set(seeds)) == 3 and not final & {seed + i for seed in seeds for i in range(2)}
    dqn_flappy.load_delivered(q_network, best)
    assert all(
        torch.equal(q_network.state_dict()[name], tensor) for name, tensor in kept[2000].items()
    )
    # Without periodic evaluations nothing is kept, and the last network is delivered.
    none = dqn_flappy.fresh_best(args)
    args.eval_freq = 0
    dqn_flappy.keep_if_best(none, q_network, args, 4000, torch.device("cpu"), writer)
    assert none["model"] is None and len(seeds) == 3 and len(writer.logged) == 6


def test_smoke_run_logs_every_key_and_eval_checkpoint_repeats_its_evaluation(run_script):
    result = run_script(SCRIPT, *TINY)
    assert result.returncode == 0, result.describe()
    for key in (
        "charts/episodic_return", "charts/episodic_length", "charts/episodic_score",
        "charts/SPS", "charts/epsilon", "charts/learning_rate", "losses/td_loss",
        "losses/q_values", "eval/episodic_return", "eval/episodic_score",
        "charts/greedy_return", "charts/greedy_score",
        "eval/last_network/episodic_return", "eval/last_network/episodic_score",
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
    # Everything that resume needs and nothing it does not read (epsilon follows from the step).
    assert set(state) == {
        "kind",
        "env_id",
        "run_name",
        "args",
        "global_step",
        "model",
        "target_model",
        "optimizer",
        "best",
    }
    assert state["kind"] == "dqn/3" and state["env_id"] == "FlappyBird-v0"
    assert state["global_step"] == 1200
    # The best keeps what its mean return is a mean over, so that a resume can tell if it compares.
    assert state["best"]["scored_on"] == {
        "env_id": "FlappyBird-v0",
        "max_episode_steps": 200,
        "episodes": 2,
        "seed_base": 1 + dqn_flappy.PERIODIC_EVAL_SEED_OFFSET,
    }
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("done: 1200 steps") and "over 2 episodes, pipes " in last

    # --eval-checkpoint alone: the checkpoint's settings and the final evaluation's seed, so it
    # prints the same figures; --capture-video records the game's own frames.
    evaluated = run_script(SCRIPT, "--eval-checkpoint", str(checkpoint), "--capture-video")
    assert evaluated.returncode == 0, evaluated.describe()
    line = evaluated.stdout.strip().splitlines()[-1]
    assert final_eval(line) == final_eval(last) and line.endswith(f"; checkpoint {checkpoint}")
    assert len(list((evaluated.workdir / "videos").rglob("*.mp4"))) == 2


def test_eval_checkpoint_uses_the_seed_of_the_final_evaluation(in_tmp, capsys):
    # CartPole starts each episode at random, so the evaluation's figures depend on its seed.
    assert run_main(*TINY, "--env-id", "CartPole-v1", "--eval-episodes", "5", "--seed", "3") == 0
    final = final_eval(capsys.readouterr().out.strip().splitlines()[-1])
    (checkpoint,) = in_tmp.glob("runs/*/dqn_flappy.pt")
    assert run_main("--eval-checkpoint", checkpoint) == 0  # seed 3 and CartPole from the checkpoint
    assert final_eval(capsys.readouterr().out.strip().splitlines()[-1]) == final
    # The check has teeth: evaluating at the training seed itself gives other figures.
    args = dqn_flappy.parse_args(["--eval-checkpoint", str(checkpoint)])
    q_network = dqn_flappy.build_q_network(args, torch.device("cpu"))
    dqn_flappy.load_delivered(q_network, torch.load(checkpoint, weights_only=True)["best"])
    returns, scores = dqn_flappy.evaluate(q_network, args, 5, args.seed, torch.device("cpu"))
    assert dqn_flappy.describe_eval(returns, scores) != final


def test_a_folder_of_kept_checkpoints_evaluates_into_a_curve(in_tmp, capsys):
    """--eval-checkpoint FOLDER: every kept checkpoint in step order, each with the figures that
    --eval-checkpoint gives it alone (returns and pipes), and the random policy on the same
    episodes."""
    assert run_main(*TINY, "--checkpoint-freq", "400") == 0
    (folder,) = in_tmp.glob("runs/*/checkpoints")
    kept = sorted(folder.glob("*.pt"))
    assert len(kept) == 3
    alone = []
    for path in kept:
        capsys.readouterr()
        assert run_main("--eval-checkpoint", path) == 0
        alone.append(final_eval(capsys.readouterr().out.strip().splitlines()[-1]))
    assert run_main("--eval-checkpoint", folder) == 0
    rows = [line.split(",") for line in (folder / "eval_curve.csv").read_text().splitlines()]
    assert rows[0] == ["step", "mean", "std", "min", "max", "episodes", "pipes_mean", "pipes_std"]
    assert [row[0] for row in rows[1:]] == ["-1", "400", "800", "1200"]
    for row, figures in zip(rows[2:], alone, strict=True):
        mean, std, _, _, episodes, pipes, pipes_std = row[1:]
        assert figures == (
            f"eval return {float(mean):.2f} ± {float(std):.2f} over {episodes} episodes, "
            f"pipes {float(pipes):.1f} ± {float(pipes_std):.1f}"
        )
    assert (folder / "eval_curve.png").stat().st_size > 0
    # The random policy plays the same episodes, with random actions: not one fixed action.
    args, cpu = dqn_flappy.Args(env_id="CartPole-v1", max_episode_steps=500), torch.device("cpu")
    random_returns, _ = dqn_flappy.evaluate(None, args, 20, 3, cpu)
    one_action, _ = dqn_flappy.evaluate(dqn_flappy.QNetwork((4,), 2, 8), args, 20, 3, cpu)
    assert random_returns.std() > 0 and not np.array_equal(random_returns, one_action)

    # Bad input: an empty folder, and a folder of another script's checkpoints.
    (in_tmp / "empty").mkdir()
    (in_tmp / "other").mkdir()
    torch.save({"kind": "ppo-discrete-mlp/3", "args": {}}, in_tmp / "other" / "x.pt")
    capsys.readouterr()
    for name, message in (("empty", "holds no checkpoints"), ("other", "holds a ppo-discrete")):
        assert run_main("--eval-checkpoint", in_tmp / name) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines


def test_same_seed_gives_identical_logged_numbers(in_tmp, monkeypatch):
    scalars = []
    for folder, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        (in_tmp / folder).mkdir()
        monkeypatch.chdir(in_tmp / folder)
        assert run_main(*TINY, "--no-save-model", "--seed", seed) == 0
        scalars.append(read_scalars(in_tmp / folder / "runs"))
    first, second, third = scalars
    for key in (
        "charts/episodic_return",
        "losses/td_loss",
        "losses/q_values",
        "eval/episodic_return",
    ):
        assert first[key] == second[key], key
    assert third["charts/episodic_return"] != first["charts/episodic_return"]


def assert_same_state(saved, restored, where="checkpoint"):
    """Equal dicts, lists and numbers, and tensors equal element for element."""
    if isinstance(saved, dict):
        assert saved.keys() == restored.keys(), where
        for key in saved:
            assert_same_state(saved[key], restored[key], f"{where}[{key!r}]")
    elif isinstance(saved, list | tuple):
        assert len(saved) == len(restored), where
        for index, (a, b) in enumerate(zip(saved, restored, strict=True)):
            assert_same_state(a, b, f"{where}[{index}]")
    elif isinstance(saved, torch.Tensor):
        assert torch.equal(saved, restored), where
    else:
        assert saved == restored, where


def test_resume_alone_restores_the_state_and_settings_of_the_run(in_tmp, monkeypatch, capsys):
    # Non-default settings throughout, so that falling back to a default would show.
    settings = (
        *TINY[2:], "--total-timesteps", "2400", "--seed", "9", "--num-envs", "4",
        "--start-epsilon", "0.5", "--exploration-fraction", "1.0", "--checkpoint-freq", "1200",
        "--log-interval", "400",
    )  # fmt: skip
    assert run_main(*settings) == 0
    (run_dir,) = (in_tmp / "runs").iterdir()
    kept = sorted(path.name for path in (run_dir / "checkpoints").iterdir())
    assert kept == ["dqn_flappy_000000001200.pt", "dqn_flappy_000000002400.pt"]  # periodic copies
    epsilon = dict(read_scalars(in_tmp / "runs")["charts/epsilon"])
    copy = in_tmp / "copy.pt"
    copy.write_bytes((run_dir / "checkpoints" / kept[0]).read_bytes())
    saved = torch.load(copy, weights_only=True)

    # A budget already reached (an explicit --total-timesteps is a change resume allows): nothing
    # trains, so the checkpoint written on the way out must hold exactly what was loaded.
    (in_tmp / "restored").mkdir()
    monkeypatch.chdir(in_tmp / "restored")
    assert run_main("--resume", copy, "--total-timesteps", "1200") == 0
    (restored_path,) = (in_tmp / "restored" / "runs").glob("*/dqn_flappy.pt")
    restored = torch.load(restored_path, weights_only=True)
    assert restored["args"] == {**saved["args"], "total_timesteps": 1200, "resume": str(copy)}
    for key in ("kind", "env_id", "run_name", "global_step", "model", "target_model", "optimizer"):
        assert_same_state(saved[key], restored[key], key)
    assert restored["optimizer"]["state"]  # Adam's moments and step count, not a fresh optimizer

    # --resume alone: the run goes on with seed 9, 4 envs, its budget and its epsilon schedule.
    (in_tmp / "continued").mkdir()
    monkeypatch.chdir(in_tmp / "continued")
    assert run_main("--resume", copy) == 0
    (continued_path,) = (in_tmp / "continued" / "runs").glob("*/dqn_flappy.pt")
    continued = torch.load(continued_path, weights_only=True)
    assert continued["global_step"] == 2400
    assert {key: continued["args"][key] for key in ("seed", "num_envs", "total_timesteps")} == {
        "seed": 9,
        "num_envs": 4,
        "total_timesteps": 2400,
    }
    resumed_epsilon = dict(read_scalars(in_tmp / "continued" / "runs")["charts/epsilon"])
    assert sorted(resumed_epsilon) == [1600, 2000, 2400]
    assert resumed_epsilon == {step: epsilon[step] for step in resumed_epsilon}

    # An explicit flag against the checkpoint's settings is refused in one line.
    capsys.readouterr()
    for flag in (
        ("--num-envs", "8"),
        ("--seed", "1"),
        ("--obs-type", "lidar"),
        ("--gamma", "0.99"),
    ):
        assert run_main("--resume", copy, *flag) == 2, flag
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {flag[0]} is "), lines
        assert "but the checkpoint was trained with" in lines[0]


def test_resume_continues_the_run_and_its_wandb_run(run_script):
    first = run_script(SCRIPT, *TINY, "--track")
    assert first.returncode == 0, first.describe()
    (checkpoint,) = first.checkpoints()
    resumed = run_script(
        SCRIPT,
        "--resume",
        str(checkpoint),
        "--total-timesteps",
        "2400",
        "--track",
        "--wandb-group",
        "g",
    )
    assert resumed.returncode == 0, resumed.describe()
    assert resumed.checkpoints() == [checkpoint] and len(resumed.run_dirs) == 1  # same run folder
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 2400
    assert resumed.steps("charts/SPS") == [1000, 2000]  # every --log-interval, resumed or not
    # The buffer is not in the checkpoint: the resumed run refills --learning-starts steps first.
    resumed_updates = [step for step in resumed.steps("losses/td_loss") if step > 1200]
    assert resumed_updates and min(resumed_updates) >= 1600
    runs = read_wandb_runs(resumed.workdir)
    assert (
        len(runs) == 2 and runs[0].run_id == runs[1].run_id
    )  # a resumed run continues its W&B run
    assert [run.group for run in runs] == ["dqn_flappy", "g"]  # default: the experiment name
    assert runs[0].config["seed"] == 1 and runs[0].config["env_id"] == "FlappyBird-v0"
    assert runs[0].config["total_timesteps"] == 1200 and runs[1].config["total_timesteps"] == 2400


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_signal_saves_a_checkpoint_that_resumes_to_the_full_budget(run_script, signum, code):
    # A budget of minutes, interrupted after 2,000 steps: the run cannot finish first.
    budget = (
        "--total-timesteps",
        "500000",
        "--learning-starts",
        "500",
        "--max-episode-steps",
        "200",
    )
    interrupted = run_script(
        SCRIPT, *budget, "--checkpoint-freq", "2000",
        interrupt_when=has_periodic_checkpoint, interrupt_signals=(signum,),
    )  # fmt: skip
    assert interrupted.returncode == code, interrupted.describe()
    assert "interrupted at step" in interrupted.stderr and "Traceback" not in interrupted.stderr
    checkpoint = interrupted.run_dirs[0] / "dqn_flappy.pt"
    step = torch.load(checkpoint, weights_only=True)["global_step"]
    assert (
        2000 <= step < 500000
        and f"(continue with --resume {checkpoint.relative_to(interrupted.workdir)})"
        in (interrupted.stderr)
    )
    resumed = run_script(
        SCRIPT,
        "--resume",
        str(checkpoint),
        "--total-timesteps",
        str(step + 400),
        "--eval-episodes",
        "1",
    )
    assert resumed.returncode == 0, resumed.describe()
    assert torch.load(checkpoint, weights_only=True)["global_step"] == step + 400


PIXELS_CARTPOLE = (
    "--env-id", "CartPole-v1", "--obs-type", "pixels", "--total-timesteps", "100000",
    "--buffer-size", "400", "--eval-episodes", "1",
)  # fmt: skip


def test_sigterm_while_pygame_renders_saves_and_exits_143(run_script):
    # Rendering CartPole starts SDL, which installs a SIGTERM handler of its own where none is set
    # (the run then ignored SIGTERM and trained on). No updates: only the rendering is timed here.
    result = run_script(
        SCRIPT, *PIXELS_CARTPOLE, "--num-envs", "2", "--learning-starts", "100000",
        "--checkpoint-freq", "100", interrupt_when=has_periodic_checkpoint,
        interrupt_signals=(signal.SIGTERM,), timeout=180,
    )  # fmt: skip
    assert result.returncode == 143, result.describe()
    assert "SIGTERM: stopping" in result.stderr and "interrupted at step" in result.stderr
    state = torch.load(result.run_dirs[0] / "dqn_flappy.pt", weights_only=True)
    assert 100 <= state["global_step"] < 100000 and state["args"]["obs_type"] == "pixels"


def test_a_second_signal_aborts_without_saving(run_script):
    # Four CNN updates of 256 frames per iteration make an iteration last a second or more (1.7 s
    # on 2 cores). A checkpoint is written at an iteration's end, just before the loop reads the
    # stop flag, so the first Ctrl-C waits 0.4 s after the first checkpoint appears: both it and
    # the second, 0.2 s later, then land inside the next iteration, far from its ends.
    first_seen = []

    def mid_iteration(workdir) -> bool:
        if not first_seen and has_periodic_checkpoint(workdir):
            first_seen.append(time.monotonic())
        return bool(first_seen) and time.monotonic() - first_seen[0] >= 0.4

    result = run_script(
        SCRIPT, *PIXELS_CARTPOLE, "--num-envs", "4", "--batch-size", "256",
        "--learning-starts", "0", "--train-frequency", "1", "--checkpoint-freq", "8",
        interrupt_when=mid_iteration, interrupt_signals=(signal.SIGINT, signal.SIGINT),
        timeout=180,
    )  # fmt: skip
    assert result.returncode == 130, result.describe()
    aborted = "SIGINT again: aborted; nothing was saved since the last checkpoint"
    assert aborted in result.stderr.splitlines(), result.describe()
    assert "Traceback" not in result.stderr and "interrupted at step" not in result.stderr


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_the_final_evaluation_ends_it_with_the_signal_status(
    run_script, signum, code
):
    """After training the checkpoint is saved: a signal ends the evaluation and the process, with
    128 + the signal's number, rather than being noted and ignored."""

    def recording_started(workdir):
        """The delivered network's evaluation, the recorded one, has made its video folder."""
        return any(workdir.glob("videos/*/eval"))

    # Thirty episodes recorded from the game's own frames take seconds: the signal lands in them.
    result = run_script(
        SCRIPT, *TINY, "--eval-episodes", "30", "--capture-video", "--checkpoint-freq", "0",
        interrupt_when=recording_started, interrupt_signals=(signum,),
    )  # fmt: skip
    assert result.returncode == code, result.describe()
    name = signal.Signals(signum).name
    assert f"{name}: the final evaluation was stopped at step 1200" in result.stderr
    assert "Traceback" not in result.stderr and "done:" not in result.stdout
    (checkpoint,) = result.checkpoints()
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 1200


def test_a_resumed_run_records_its_evaluation_into_a_folder_of_its_own(run_script):
    first = run_script(SCRIPT, *TINY, "--capture-video")
    assert first.returncode == 0, first.describe()
    (checkpoint,) = first.checkpoints()
    resumed = run_script(SCRIPT, "--resume", checkpoint, "--total-timesteps", "1600")
    assert resumed.returncode == 0, resumed.describe()
    assert "Overwriting" not in resumed.stderr, resumed.stderr
    videos = resumed.workdir / "videos" / checkpoint.parent.name
    assert len(list((videos / "eval").glob("*.mp4"))) == 2
    assert len(list((videos / "eval-step-1600").glob("*.mp4"))) == 2


def test_pixels_mode_trains_on_stacked_frames_and_records_video(run_script):
    result = run_script(
        SCRIPT, "--obs-type", "pixels", "--total-timesteps", "300", "--learning-starts", "100",
        "--buffer-size", "400", "--batch-size", "8", "--eval-episodes", "1",
        "--max-episode-steps", "100", "--log-interval", "100", "--capture-video",
    )  # fmt: skip
    assert result.returncode == 0, result.describe()
    assert result.values("losses/td_loss") and result.values("eval/episodic_score")
    (video,) = (result.workdir / "videos").rglob("*.mp4")
    frames = np.stack(list(iio.imiter(video)))
    # The agent's 84x84 grayscale frames, 4x larger (the game's own are 512x288, in colour).
    assert frames.shape[1:] == (336, 336, 3), frames.shape
    assert np.abs(frames.astype(int) - frames[..., :1]).max() <= 8  # grey, up to the codec
    (checkpoint,) = result.checkpoints()
    weights = torch.load(checkpoint, weights_only=True)["model"]
    assert weights["network.0.weight"].shape == (32, 4, 8, 8)  # the Nature CNN on 4 stacked frames

    # experiments/flappy_gif.py draws the game beside the network's frames, 3x larger.
    spec = importlib.util.spec_from_file_location("flappy_gif", ROOT / "experiments/flappy_gif.py")
    flappy_gif = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flappy_gif)
    gif = result.workdir / "agent.gif"
    assert flappy_gif.main([str(checkpoint), "--out", str(gif), "--seconds", "1"]) == 0
    frames = np.stack(list(iio.imiter(gif)))
    assert frames.shape[1:3] == (256, 144 + flappy_gif.GAP + 3 * dqn_flappy.FRAME_SIZE)
    assert len(frames) <= 15 and gif.stat().st_size < 1_000_000
    seen = frames[0, : 3 * dqn_flappy.FRAME_SIZE, -3 * dqn_flappy.FRAME_SIZE :, 0].astype(int)
    assert np.abs(seen - np.repeat(np.repeat(seen[::3, ::3], 3, 0), 3, 1)).max() <= 2  # upscaled


def test_pixels_are_the_screen_shrunk_to_the_network_size_without_render():
    """The fast path (the game's own surface, shrunk in pygame) gives the frame that render(),
    a crop, grayscale and cv2's area resize give, within a few grey levels of rounding."""
    args = dqn_flappy.Args(obs_type="pixels", action_repeat=1)  # frame by frame, as render()
    fast = dqn_flappy.make_env(args)
    slow = gym.make("FlappyBird-v0", render_mode="rgb_array", **dqn_flappy.env_kwargs(args))
    fast_obs, _ = fast.reset(seed=5)
    slow.reset(seed=5)
    rng = np.random.default_rng(0)
    for step in range(60):
        frame = slow.render()[: int(512 * 0.79)]
        gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        expected = cv2.resize(gray, (84, 84), interpolation=cv2.INTER_AREA).astype(int)
        difference = np.abs(fast_obs[-1].astype(int) - expected)
        assert difference.max() <= 8 and difference.mean() < 3, (step, difference.max())
        action = int(rng.random() < 0.1)
        fast_obs, _, terminated, _, _ = fast.step(action)
        slow.step(action)
        if terminated:
            break
    assert step > 10


def test_lidar_mode_and_other_discrete_envs_work(run_script):
    lidar = run_script(SCRIPT, *TINY, "--obs-type", "lidar", "--no-save-model")
    assert lidar.returncode == 0, lidar.describe()
    assert lidar.values("losses/td_loss") and lidar.values("eval/episodic_score")
    cartpole = run_script(SCRIPT, *TINY, "--env-id", "CartPole-v1", "--no-save-model")
    assert cartpole.returncode == 0, cartpole.describe()
    last = cartpole.stdout.strip().splitlines()[-1]
    assert "eval return " in last and "pipes" not in last  # CartPole has no score to report


def test_non_finite_loss_stops_with_a_saved_state(in_tmp, capsys):
    assert run_main(*TINY, "--learning-rate", "1e30", "--max-grad-norm", "1e30") == 1
    assert "loss became non-finite at step" in capsys.readouterr().err
    assert list(in_tmp.glob("runs/*/dqn_flappy_nan.pt"))


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
        (("--torch-threads", "0"), "must be positive"),
        (("--log-interval", "-1"), "must be >= 0"),
        (("--gamma", "1.5"), "[0, 1]"),
        (("--end-epsilon", "-0.1"), "[0, 1]"),
        (("--tau", "0"), "(0, 1]"),
        (("--learning-rate", "0"), "must be positive"),
        (("--resume", "missing.pt"), "does not exist"),
        (("--eval-checkpoint", "missing.pt"), "does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_line(in_tmp, capsys, args, message):
    assert run_main(*args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (in_tmp / "runs").exists()


class NoFrames(gym.Env):
    """A Discrete-action env that draws nothing: it has no rgb_array render mode."""

    metadata = {"render_modes": ["ansi"]}
    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)


def test_pixels_on_an_env_that_cannot_render_frames_exits_2_with_one_line(in_tmp, capsys):
    gym.register("NoFrames-v0", entry_point=NoFrames)
    try:
        assert run_main("--env-id", "NoFrames-v0", "--obs-type", "pixels") == 2
    finally:
        del gym.registry["NoFrames-v0"]
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["error: NoFrames-v0 cannot render rgb_array frames, which --obs-type pixels "
                     "needs"]  # fmt: skip
    assert not (in_tmp / "runs").exists()


def test_each_observation_type_has_its_defaults_and_help_says_which():
    for obs_type, mode in (("features", "vectors"), ("lidar", "vectors"), ("pixels", "pixels")):
        args = dqn_flappy.Args(obs_type=obs_type)
        assert {name: getattr(args, name) for name in dqn_flappy.MODE_DEFAULTS[mode]} == (
            dqn_flappy.MODE_DEFAULTS[mode]
        )
    assert dqn_flappy.MODE_DEFAULTS["pixels"] != dqn_flappy.MODE_DEFAULTS["vectors"]
    given = dqn_flappy.parse_args(["--obs-type", "pixels", "--batch-size", "64"])
    assert (
        given.batch_size == 64
        and given.learning_rate == dqn_flappy.MODE_DEFAULTS["pixels"]["learning_rate"]
    )
    source = (ROOT / SCRIPT).read_text()
    for name in dqn_flappy.MODE_DEFAULTS["pixels"]:
        docstring = re.search(rf"\n    {name}: .*\n    \"\"\"(.*)\"\"\"", source).group(1)
        assert "default" in docstring and "pixels" in docstring, (name, docstring)


def test_the_bf16_cnn_gives_the_q_values_of_the_fp32_one():
    torch.manual_seed(0)
    fp32 = dqn_flappy.QNetwork((4, 84, 84), 2)
    bf16 = dqn_flappy.QNetwork((4, 84, 84), 2, bf16=True)
    bf16.load_state_dict(fp32.state_dict())
    frames = torch.randint(0, 256, (64, 4, 84, 84), dtype=torch.uint8)
    with torch.no_grad():
        expected, got = fp32(frames), bf16(frames)
    assert got.dtype == torch.float32  # the Q head runs in fp32
    assert not torch.equal(got, expected)  # the trunk did run in bf16
    scale = expected.abs().max()
    assert (got - expected).abs().max() < 0.02 * scale, ((got - expected).abs().max(), scale)


def test_bad_checkpoints_exit_2_with_one_line(in_tmp, capsys):
    assert run_main(*TINY) == 0
    (checkpoint,) = in_tmp.glob("runs/*/dqn_flappy.pt")
    data = checkpoint.read_bytes()
    saved = torch.load(checkpoint, weights_only=True)
    (in_tmp / "truncated.pt").write_bytes(data[: len(data) // 2])
    (in_tmp / "text.pt").write_text("not a checkpoint")
    torch.save([1, 2, 3], in_tmp / "list.pt")
    torch.save({key: value for key, value in saved.items() if key != "kind"}, in_tmp / "unnamed.pt")
    torch.save({**saved, "kind": "ppo-discrete-mlp/1"}, in_tmp / "other.pt")
    torch.save({**saved, "model": {}}, in_tmp / "empty.pt")
    cartpole = {
        **saved,
        "env_id": "CartPole-v1",
        "args": {**saved["args"], "env_id": "CartPole-v1"},
    }
    torch.save(cartpole, in_tmp / "cartpole.pt")
    cases = {
        ("truncated.pt",): "not a readable checkpoint",
        ("text.pt",): "not a readable checkpoint",
        ("list.pt",): "not a checkpoint of this project",
        ("unnamed.pt",): "not a checkpoint of this project",
        ("other.pt",): "holds a ppo-discrete-mlp/1 checkpoint; this script trains dqn/3",
        ("empty.pt", "--no-cuda"): "does not match this network",
        ("cartpole.pt", "--env-id", "FlappyBird-v0"):
            "--env-id is 'FlappyBird-v0' but the checkpoint was trained with 'CartPole-v1'",
        (str(checkpoint), "--obs-type", "lidar"):
            "--obs-type is 'lidar' but the checkpoint was trained with 'features'",
        (str(checkpoint), "--hidden-size", "64"):
            "--hidden-size is 64 but the checkpoint was trained",
    }  # fmt: skip
    capsys.readouterr()
    for flag in ("--resume", "--eval-checkpoint"):
        for (name, *more), message in cases.items():
            assert run_main(flag, name, *more) == 2, (flag, name)
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1 and message in lines[0], (flag, name, lines)
    assert len(list(in_tmp.glob("runs/*"))) == 1  # no run folder for a refused checkpoint


# --- what a resumed run delivers ---------------------------------------------------------------


def train_with_periodic_evals(workdir) -> Path:
    """A tiny run whose checkpoint keeps a best network from its periodic evaluations."""
    assert run_main(*TINY, "--eval-freq", "400") == 0
    (checkpoint,) = workdir.glob("runs/*/dqn_flappy.pt")
    assert torch.load(checkpoint, weights_only=True)["best"]["model"] is not None
    return checkpoint


def delivered_and_last(summary: str) -> tuple[str, str, str]:
    """(what was delivered, its evaluation, the last network's evaluation) of a summary line."""
    evaluation = r"(eval return [^;]*)"
    match = re.search(rf"steps/s\); (.+?): {evaluation}; last network: {evaluation}", summary)
    return match.group(1), match.group(2), match.group(3)


def test_resume_with_eval_freq_0_delivers_the_last_network(in_tmp, capsys):
    checkpoint = train_with_periodic_evals(in_tmp)
    saved_best = torch.load(checkpoint, weights_only=True)["best"]
    capsys.readouterr()
    # Past the resumed run's refill of --learning-starts steps, so that the last network moves on.
    assert run_main("--resume", checkpoint, "--total-timesteps", "2400", "--eval-freq", "0") == 0
    captured = capsys.readouterr()
    delivered, delivered_eval, last_eval = delivered_and_last(captured.out.strip().splitlines()[-1])
    assert delivered == "last network" and delivered_eval == last_eval
    assert (
        f"note: --eval-freq 0 delivers the last network, not the best network of {checkpoint} "
        f"(step {saved_best['step']})" in captured.err.splitlines()
    )
    state = torch.load(checkpoint, weights_only=True)
    assert state["global_step"] == 2400 and state["best"]["model"] is None
    # The last network is not the saved best, so that delivering the wrong one would show.
    old_best = saved_best["model"]
    assert any(not torch.equal(tensor, old_best[name]) for name, tensor in state["model"].items())
    # --eval-checkpoint of what the resumed run saved evaluates the same last network.
    assert run_main("--eval-checkpoint", checkpoint) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("last network: ") and final_eval(line) == last_eval


def test_resume_keeps_the_best_only_when_scored_on_the_same_episodes(in_tmp, monkeypatch, capsys):
    checkpoint = train_with_periodic_evals(in_tmp)
    saved_best = torch.load(checkpoint, weights_only=True)["best"]
    copy = in_tmp / "copy.pt"
    copy.write_bytes(checkpoint.read_bytes())
    note = "was scored on other evaluation episodes"

    # The same episodes: the saved best stays the one to beat.
    (in_tmp / "same").mkdir()
    monkeypatch.chdir(in_tmp / "same")
    capsys.readouterr()
    assert run_main("--resume", copy, "--total-timesteps", "1600") == 0
    assert note not in capsys.readouterr().err
    (same_path,) = (in_tmp / "same").glob("runs/*/dqn_flappy.pt")
    kept_best = torch.load(same_path, weights_only=True)["best"]
    assert kept_best["mean_return"] >= saved_best["mean_return"]

    # Means over 3 episodes do not compare with one over 2: a note, and the best starts afresh.
    monkeypatch.chdir(in_tmp)
    assert run_main("--resume", checkpoint, "--total-timesteps", 1600, "--eval-episodes", 3) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if note in line]
    assert notes == [
        f"note: the best network of {checkpoint} (step {saved_best['step']}) {note} "
        "(episodes 2 then, 3 now); this run starts the best afresh"
    ]
    best = torch.load(checkpoint, weights_only=True)["best"]
    assert best["step"] == 1600 and best["scored_on"]["episodes"] == 3


def test_a_checkpoint_of_the_previous_kind_evaluates_but_does_not_resume(in_tmp, capsys):
    assert run_main(*TINY) == 0
    final = final_eval(capsys.readouterr().out.strip().splitlines()[-1])
    (checkpoint,) = in_tmp.glob("runs/*/dqn_flappy.pt")
    saved = torch.load(checkpoint, weights_only=True)
    # A dqn/2 checkpoint held the same networks; its best did not record what it was scored on.
    older_best = {key: value for key, value in saved["best"].items() if key != "scored_on"}
    older = in_tmp / "older.pt"
    torch.save({**saved, "kind": "dqn/2", "best": older_best}, older)

    assert run_main("--eval-checkpoint", older) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"best network (step {saved['best']['step']}): ")
    assert final_eval(line) == final and line.endswith(f"; checkpoint {older}")

    assert run_main("--resume", older) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {older} holds a dqn/2 checkpoint, an earlier kind that this version can evaluate "
        "(--eval-checkpoint) but not resume: its training state is saved differently"
    ]
    assert len(list(in_tmp.glob("runs/*"))) == 1  # the refused resume started no run


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


@pytest.mark.slow
def test_pixel_defaults_learn_to_outlive_the_random_policy(run_script):
    """Pixel defaults but one torch thread, seed 1, 20k agent steps (~4.5 min): the greedy network,
    which sees only the screen, outlives both the uniformly random policy and a bird that never
    flaps, on the final evaluation's ten episodes.

    Measured on this 2-core CPU (270 s alone, 75 agent steps/s, 604 MB resident; with the default
    two threads, 187 s alone and the same returns): eval return 3.90 ± 0.00, where the random
    policy scores -6.06 ± 1.88 (it flaps into the top of the screen) and never flapping scores 2.00
    (it falls to the ground). Passing pipes takes longer: greedy pipes first pass 1 at ~100k steps
    (see README).
    """
    # One thread: beside the other pytest worker, two threads per process on 2 cores only contend
    # (602 s in the suite with two). The timeout only catches a hang.
    steps, episodes = 20_000, 10
    result = run_script(
        SCRIPT, "--obs-type", "pixels", "--total-timesteps", str(steps), "--torch-threads", "1",
        "--eval-episodes", str(episodes), "--no-save-model", timeout=1800,
    )  # fmt: skip
    assert result.returncode == 0, result.describe()
    trained = np.array(result.values("eval/episodic_return"))
    assert len(trained) == episodes
    args = dqn_flappy.parse_args(["--obs-type", "pixels"])
    seed = args.seed + dqn_flappy.EVAL_SEED_OFFSET  # the final evaluation's seeds, seed 1
    random_policy, _ = dqn_flappy.evaluate(None, args, episodes, seed, torch.device("cpu"))
    never_flaps = []
    env = dqn_flappy.make_env(args)
    for episode in range(episodes):
        env.reset(seed=seed + episode)
        total, done = 0.0, False
        while not done:
            _, reward, terminated, truncated, _ = env.step(0)  # 0: do nothing
            total, done = total + reward, terminated or truncated
        never_flaps.append(total)
    env.close()
    assert trained.mean() >= random_policy.mean() + 5, (trained, random_policy)
    assert trained.mean() > np.mean(never_flaps), (trained, never_flaps)


def test_training_resume_and_evaluation_copy_device_tensors_to_the_host(
    tensors_as_if_on_a_gpu, in_tmp
):
    """On a GPU every tensor that reaches NumPy must go through .cpu(); the guard makes the CPU
    refuse the same conversions, so a forgotten copy fails here rather than on a GPU machine."""
    dqn_flappy.main(dqn_flappy.parse_args([*TINY, "--checkpoint-freq", "0"]))
    (checkpoint,) = (in_tmp / "runs").glob("*/dqn_flappy.pt")
    dqn_flappy.main(
        dqn_flappy.parse_args(["--resume", str(checkpoint), "--total-timesteps", "1600"])
    )
    dqn_flappy.main(dqn_flappy.parse_args(["--eval-checkpoint", str(checkpoint)]))


def one_action_network(like: dict, action: int) -> dict:
    """The weights of a network (shaped like `like`) that always picks `action`: a zero output
    layer with a bias on that action."""
    weights = {name: tensor.clone() for name, tensor in like.items()}
    (last,) = {name.rsplit(".", 1)[0] for name in weights if name.startswith("network.4.")}
    weights[f"{last}.weight"].zero_()
    weights[f"{last}.bias"].zero_()
    weights[f"{last}.bias"][action] = 1.0
    return weights


def test_eval_checkpoint_plays_the_delivered_network_and_the_folder_each_ones_own(
    in_tmp, capsys, monkeypatch
):
    """A checkpoint whose best network (always flap) differs from its last one (never flap): the
    file evaluates the best, as the run delivers it; the folder's curve plays each checkpoint's own
    network and marks the delivered one."""
    assert run_main(*TINY, "--checkpoint-freq", "1200") == 0
    (path,) = in_tmp.glob("runs/*/checkpoints/*.pt")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model"] = one_action_network(checkpoint["model"], 0)
    checkpoint["best"].update(model=one_action_network(checkpoint["model"], 1), step=800)
    torch.save(checkpoint, path)

    args, cpu = dqn_flappy.parse_args(["--eval-checkpoint", str(path)]), torch.device("cpu")
    seed = args.seed + dqn_flappy.EVAL_SEED_OFFSET
    figures = {}
    for name in ("model", "best"):
        q_network = dqn_flappy.build_q_network(args, cpu)
        q_network.load_state_dict(
            checkpoint[name] if name == "model" else checkpoint[name]["model"]
        )
        figures[name] = dqn_flappy.evaluate(q_network, args, args.eval_episodes, seed, cpu)
    assert figures["model"][0].mean() != figures["best"][0].mean()  # the test can tell them apart

    capsys.readouterr()
    assert run_main("--eval-checkpoint", path) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("best network (step 800): ")
    assert final_eval(line) == dqn_flappy.describe_eval(*figures["best"])

    from matplotlib.axes import Axes

    marks, axvline = [], Axes.axvline
    monkeypatch.setattr(Axes, "axvline", lambda self, x, **kw: marks.append((x, kw.get("label")))
                        or axvline(self, x, **kw))  # fmt: skip
    assert run_main("--eval-checkpoint", path.parent) == 0
    out = capsys.readouterr().out
    rows = [line.split(",") for line in (path.parent / "eval_curve.csv").read_text().splitlines()]
    assert [row[0] for row in rows[1:]] == ["-1", "1200"]
    assert float(rows[2][1]) == pytest.approx(figures["model"][0].mean())  # its own network
    assert (path.parent / "eval_curve.png").stat().st_size > 0 and "eval_curve.png" in out
    assert (800, "delivered: best network (step 800)") in marks
