"""Tests of ppo_atari.py: pure parts against slow references, the envs, then the real CLI end to end."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, run_script_in

sys.path.insert(0, str(ROOT))
import ppo_atari  # noqa: E402

SCRIPT = "ppo_atari.py"
# One iteration of 8 envs x 32 steps: Atari steps and CNN updates are slow on a shared CPU.
TINY = ("--total-timesteps", "256", "--num-steps", "32", "--eval-episodes", "1")


# --- GAE and the learning signals --------------------------------------------------------------


def reference_gae(rewards, values, terminated, ended, after_game_end, gamma, lam):
    """Slow, literal GAE for ONE environment's rollout.

    `ended[j]` ends the learning episode at step j (game over, truncation or lost life);
    `terminated[j]` removes its bootstrap. `after_game_end[t]` marks the autoreset step (the step
    after a game ended): not a transition, its advantage is NaN.
    A_t = sum_k (gamma * lam)^k * delta_{t+k}, summed until (and including) the step that ends the
    episode or the rollout, where delta_j = r_j + gamma * V(obs_{j+1}) * [not terminated_j] - V(obs_j).
    """
    steps = len(rewards)
    advantages = [float("nan")] * steps
    for t in range(steps):
        if after_game_end[t]:
            continue
        total, discount = 0.0, 1.0
        for j in range(t, steps):
            bootstrap = 0.0 if terminated[j] else gamma * values[j + 1]
            total += discount * (rewards[j] + bootstrap - values[j])
            if ended[j]:
                break
            discount *= gamma * lam
        advantages[t] = total
    return advantages


def test_compute_gae_matches_slow_reference_with_lives_truncation_and_autoreset():
    generator = np.random.default_rng(0)
    steps, envs, gamma, lam = 40, 5, 0.99, 0.95
    rewards = np.sign(generator.normal(size=(steps, envs)))
    values = generator.normal(size=(steps + 1, envs))
    game_over = generator.random((steps, envs)) < 0.05
    truncated = (generator.random((steps, envs)) < 0.05) & ~game_over
    # A lost life ends the learning episode (no bootstrap) but the game, and the rollout, go on.
    life_lost = (generator.random((steps, envs)) < 0.1) & ~game_over & ~truncated
    game_over[5, 0], truncated[9, 1], truncated[steps - 1, 2], life_lost[steps - 1, 3] = (
        True,
        True,
        True,
        True,
    )
    after_game_end = np.zeros_like(game_over)
    after_game_end[1:] = (game_over | truncated)[:-1]
    rewards[after_game_end] = 0.0
    life_lost &= ~after_game_end
    terminated = game_over | life_lost
    ended = terminated | truncated

    advantages, returns = ppo_atari.compute_gae(
        torch.tensor(rewards), torch.tensor(values), torch.tensor(terminated), torch.tensor(ended), gamma, lam
    )
    for env in range(envs):
        expected = np.array(
            reference_gae(
                rewards[:, env],
                values[:, env],
                terminated[:, env],
                ended[:, env],
                after_game_end[:, env],
                gamma,
                lam,
            )
        )
        real = ~np.isnan(expected)
        np.testing.assert_allclose(advantages[:, env].numpy()[real], expected[real], rtol=1e-10)
    np.testing.assert_allclose(returns.numpy(), advantages.numpy() + values[:-1], rtol=1e-10)


def test_learning_signals_clip_rewards_and_end_learning_episodes_on_lost_lives():
    rewards = np.array([50.0, -3.0, 0.0, 7.0])
    terminated = np.array([False, False, False, True])
    truncated = np.array([False, True, False, False])
    lives = np.array([2, 3, 5, 0])
    previous = np.array([3, 3, 0, 1])  # env 0 lost a life; env 2 was just reset (autoreset step)
    autoreset = np.array([False, False, True, False])

    reward, learn_terminated, ended = ppo_atari.learning_signals(
        rewards, terminated, truncated, lives, previous, autoreset, clip_rewards=True, episodic_life=True
    )
    np.testing.assert_array_equal(reward, [1.0, -1.0, 0.0, 1.0])
    np.testing.assert_array_equal(learn_terminated, [True, False, False, True])
    np.testing.assert_array_equal(ended, [True, True, False, True])

    reward, learn_terminated, ended = ppo_atari.learning_signals(
        rewards, terminated, truncated, lives, previous, autoreset, clip_rewards=False, episodic_life=False
    )
    np.testing.assert_array_equal(reward, rewards)
    np.testing.assert_array_equal(learn_terminated, terminated)
    np.testing.assert_array_equal(ended, terminated | truncated)


def test_ppo_loss_matches_elementwise_reference():
    clip = 0.1
    ratios = torch.tensor([1.05, 1.5, 0.5, 1.05, 1.5, 0.5])
    advantages = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    policy_loss, _, ratio = ppo_atari.ppo_loss(
        ratios.log(), torch.zeros(6), advantages, torch.zeros(6), torch.zeros(6), torch.zeros(6), clip, True
    )
    expected = [
        -min(r * a, min(max(r, 1 - clip), 1 + clip) * a)
        for r, a in zip(ratios.tolist(), advantages.tolist(), strict=True)
    ]
    assert policy_loss.item() == pytest.approx(sum(expected) / 6)
    np.testing.assert_allclose(ratio.numpy(), ratios.numpy(), rtol=1e-6)


def test_network_takes_uint8_frames_and_starts_near_uniform():
    agent = ppo_atari.Agent(6)
    frames = torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8)
    logits, value = agent(frames)
    assert logits.shape == (5, 6) and value.shape == (5,)
    assert logits.abs().max().item() < 0.1  # the 0.01-gain policy head
    # The /255 scaling lives inside the network: uint8 frames in, the [0, 1] version is what it sees.
    expected = agent.actor(agent.trunk(frames.float() / 255.0))
    np.testing.assert_allclose(logits.detach().numpy(), expected.detach().numpy(), rtol=1e-5, atol=1e-7)


# --- ids and environments ------------------------------------------------------------------------


def test_both_id_styles_map_to_the_game_with_their_own_sticky_actions():
    assert ppo_atari.atari_game("ALE/Pong-v5") == ("pong", 0.25)
    assert ppo_atari.atari_game("PongNoFrameskip-v4") == ("pong", 0.0)
    assert ppo_atari.atari_game("ALE/SpaceInvaders-v5") == ("space_invaders", 0.25)
    assert ppo_atari.atari_game("SpaceInvadersNoFrameskip-v4") == ("space_invaders", 0.0)


@pytest.mark.parametrize(
    ("env_id", "message"),
    [
        ("CartPole-v1", "is not an Atari game"),
        ("ALE/Pongg-v5", "did you mean ALE/Pong-v5"),
        ("BreakoutNoFrameskp-v4", "did you mean BreakoutNoFrameskip-v4"),
        ("Pong-v4", "use ALE/Pong-v5 or PongNoFrameskip-v4"),
        ("ALE/NoSuchGame-v5", "unknown environment id"),
    ],
)
def test_bad_env_ids_fail_with_a_helpful_line(capsys, env_id, message):
    with pytest.raises(SystemExit) as exit_info:
        ppo_atari.atari_game(env_id)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.mark.parametrize("backend", ["ale", "gymnasium"])
def test_preprocessing_gives_stacked_uint8_frames_and_true_rewards(backend):
    # Asterix scores 50 and more per item: a clipped reward could never exceed 1.
    envs = ppo_atari.make_envs("ALE/Asterix-v5", 2, None, backend)
    obs, infos = envs.reset(seed=3)
    assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8
    assert infos["lives"].shape == (2,)
    generator = np.random.default_rng(0)
    rewards, lives, lost_life_game_goes_on, distinct_frames = [], infos["lives"], False, False
    for _ in range(200):
        obs, reward, terminated, truncated, infos = envs.step(
            generator.integers(0, envs.single_action_space.n, 2)
        )
        rewards.append(reward)
        lost_life_game_goes_on |= bool(np.any((infos["lives"] < lives) & (infos["lives"] > 0) & ~terminated))
        lives = infos["lives"]
        # Right after a reset the stack repeats the first frame; later it holds 4 different ones.
        distinct_frames |= not all(np.array_equal(obs[0, 0], obs[0, k]) for k in range(1, 4))
    envs.close()
    assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8
    assert np.max(rewards) >= 50, "rewards look clipped"
    # A lost life must not end the env's episode (that would cut the logged returns short).
    assert lost_life_game_goes_on, "no life was lost without the episode ending"
    assert distinct_frames, "the frame stack never held distinct frames"


# --- the CLI ------------------------------------------------------------------------------------


def test_pong_smoke_run_is_deterministic_logs_every_key_and_tracks(tmp_path):
    first = run_script_in(tmp_path / "a", SCRIPT, "--env-id", "ALE/Pong-v5", *TINY, "--track")
    second = run_script_in(tmp_path / "b", SCRIPT, "--env-id", "ALE/Pong-v5", *TINY, "--no-save-model")
    assert first.returncode == 0 and second.returncode == 0, first.describe() + second.describe()
    for key in (
        "charts/learning_rate", "charts/SPS", "losses/policy_loss", "losses/value_loss",
        "losses/entropy", "losses/approx_kl", "losses/old_approx_kl", "losses/clipfrac",
        "losses/explained_variance", "losses/ratio_mean", "losses/ratio_max", "eval/episodic_return",
    ):  # fmt: skip
        assert key in first.scalars, f"{key} not logged"
    for key in ("losses/policy_loss", "losses/value_loss", "losses/entropy", "eval/episodic_return"):
        assert first.scalars[key] == second.scalars[key], key
    # A Pong game lasts until one side scores 21: the evaluation return is in [-21, 21].
    (eval_return,) = first.values("eval/episodic_return")
    assert -21 <= eval_return <= 21
    assert first.steps("charts/SPS") == [256]
    assert list((first.workdir / "wandb").glob("offline-run-*")), "no offline W&B run"
    (checkpoint,) = first.checkpoints()
    state = torch.load(checkpoint, weights_only=True)
    assert (state["script"], state["env_id"], state["global_step"]) == ("ppo_atari", "ALE/Pong-v5", 256)
    assert first.stdout.strip().splitlines()[-1].startswith("done: 256 steps")


def test_logged_returns_are_the_true_unclipped_scores(run_script):
    result = run_script(
        SCRIPT, "--env-id", "AsterixNoFrameskip-v4", "--num-envs", "4", "--num-steps", "128",
        "--total-timesteps", "1024", "--update-epochs", "1", "--eval-episodes", "1", "--no-save-model",
    )  # fmt: skip
    assert result.returncode == 0, result.describe()
    returns = result.values("charts/episodic_return")
    assert returns, "no episode finished"
    # Asterix scores 50 per item; clipped rewards would sum to small integers instead.
    assert max(returns) >= 50 and all(r % 50 == 0 for r in returns), returns


def test_breakout_ctrl_c_resume_and_eval_checkpoint_with_video(run_script):
    def training_has_logged(workdir):
        return any(f.stat().st_size > 2000 for f in workdir.glob("runs/*/events.out.tfevents.*"))

    interrupted = run_script(
        SCRIPT, "--env-id", "BreakoutNoFrameskip-v4", "--total-timesteps", "100000", "--num-steps", "32",
        interrupt_when=training_has_logged,
    )  # fmt: skip
    assert interrupted.returncode == 130, interrupted.describe()
    assert "interrupted at step" in interrupted.stderr and "Traceback" not in interrupted.stderr
    (checkpoint,) = interrupted.checkpoints()
    step = torch.load(checkpoint, weights_only=True)["global_step"]
    assert 0 < step < 100000 and step % 256 == 0

    resumed = run_script(
        SCRIPT, "--env-id", "BreakoutNoFrameskip-v4", "--total-timesteps", str(step + 256),
        "--num-steps", "32", "--eval-episodes", "1", "--resume", str(checkpoint),
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.describe()
    assert resumed.checkpoints() == [checkpoint]  # same run folder, same file
    state = torch.load(checkpoint, weights_only=True)
    assert state["global_step"] == step + 256 and state["iteration"] == step // 256 + 1
    assert resumed.steps("charts/SPS")[-1] == step + 256

    evaluated = run_script(
        SCRIPT, "--env-id", "BreakoutNoFrameskip-v4", "--eval-checkpoint", str(checkpoint),
        "--eval-episodes", "2", "--capture-video",
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.describe()
    line = evaluated.stdout.strip().splitlines()[-1]
    assert line.startswith("eval: return ") and "over 2 episodes" in line
    assert len(list((evaluated.workdir / "videos").rglob("*.mp4"))) == 2


def test_non_finite_loss_stops_with_a_saved_state(run_script):
    result = run_script(
        SCRIPT, "--env-id", "ALE/Breakout-v5", *TINY, "--learning-rate", "1e30", "--no-anneal-lr",
        "--max-grad-norm", "1e30", "--update-epochs", "2",
    )  # fmt: skip
    assert result.returncode == 1, result.describe()
    assert "loss became non-finite at step" in result.stderr
    assert result.checkpoints("*_nan.pt")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_minibatches": 7}, "does not divide"),
        ({"total_timesteps": 0}, "must be positive"),
        ({"num_envs": -1}, "must be positive"),
        ({"gamma": 1.5}, "[0, 1]"),
        ({"repeat_action_probability": 1.5}, "[0, 1]"),
        ({"learning_rate": 0.0}, "must be positive"),
        ({"resume": "a.pt", "eval_checkpoint": "b.pt"}, "not both"),
    ],
)
def test_bad_args_fail_with_one_line(capsys, overrides, message):
    with pytest.raises(SystemExit) as exit_info:
        ppo_atari.validate(ppo_atari.Args(**overrides))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--env-id", "CartPole-v1"), "is not an Atari game"),
        (("--env-id", "ALE/Pongg-v5", "--num-envs", "2"), "did you mean ALE/Pong-v5"),
        (("--eval-checkpoint", "missing.pt"), "does not exist"),
    ],
)
def test_bad_input_through_the_cli_exits_2_with_one_line(run_script, args, message):
    result = run_script(SCRIPT, *args)
    assert result.returncode == 2, result.describe()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_checkpoints_of_another_script_or_game_are_refused(run_script, tmp_path, capsys):
    base = {"script": "ppo_atari", "env_id": "ALE/Pong-v5", "run_name": "x", "args": {}}
    torch.save({**base, "script": "ppo_cartpole"}, tmp_path / "other.pt")
    torch.save({**base, "env_id": "ALE/Breakout-v5"}, tmp_path / "breakout.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    cases = {
        "other.pt": "saved by ppo_cartpole.py",
        "breakout.pt": "pass --env-id ALE/Breakout-v5",
        "text.pt": "not a readable checkpoint",
    }
    for name, message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            ppo_atari.load_checkpoint(str(tmp_path / name), "ALE/Pong-v5")
        assert exit_info.value.code == 2, name
        assert message in capsys.readouterr().err, name
    result = run_script(SCRIPT, "--resume", str(tmp_path / "breakout.pt"))
    assert result.returncode == 2 and cases["breakout.pt"] in result.stderr, result.describe()
