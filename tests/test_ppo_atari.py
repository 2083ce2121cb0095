"""Tests of ppo_atari.py: pure parts against slow references, the envs, then the CLI end to end."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import time
from dataclasses import asdict

import numpy as np
import pytest
import torch
from conftest import ROOT, read_wandb_runs, run_script_in

sys.path.insert(0, str(ROOT))
import ppo_atari  # noqa: E402

SCRIPT = "ppo_atari.py"
# One iteration of 8 envs x 32 steps: Atari steps and CNN updates are slow on a shared CPU.
TINY = (
    "--total-timesteps", "256", "--num-steps", "32", "--eval-episodes", "1",
    "--log-interval", "256",
)  # fmt: skip


# --- GAE and the learning signals --------------------------------------------------------------


def reference_gae(rewards, values, terminated, ended, after_game_end, gamma, lam):
    """Slow, literal GAE for ONE environment's rollout.

    `ended[j]` ends the learning episode at step j (game over, truncation or lost life);
    `terminated[j]` removes its bootstrap. `after_game_end[t]` marks the autoreset step (the step
    after a game ended): not a transition, its advantage is NaN.
    A_t = sum_k (gamma * lam)^k * delta_{t+k}, summed until (and including) the step that ends the
    episode or the rollout, where
    delta_j = r_j + gamma * V(obs_{j+1}) * [not terminated_j] - V(obs_j).
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

    tensors = [torch.tensor(array) for array in (rewards, values, terminated, ended)]
    advantages, returns = ppo_atari.compute_gae(*tensors, gamma, lam)
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

    step = (rewards, terminated, truncated, lives, previous, autoreset)
    reward, learn_terminated, ended = ppo_atari.learning_signals(
        *step, clip_rewards=True, episodic_life=True
    )
    np.testing.assert_array_equal(reward, [1.0, -1.0, 0.0, 1.0])
    np.testing.assert_array_equal(learn_terminated, [True, False, False, True])
    np.testing.assert_array_equal(ended, [True, True, False, True])

    reward, learn_terminated, ended = ppo_atari.learning_signals(
        *step, clip_rewards=False, episodic_life=False
    )
    np.testing.assert_array_equal(reward, rewards)
    np.testing.assert_array_equal(learn_terminated, terminated)
    np.testing.assert_array_equal(ended, terminated | truncated)


def test_ppo_loss_matches_elementwise_reference():
    clip = 0.1
    ratios = torch.tensor([1.05, 1.5, 0.5, 1.05, 1.5, 0.5])
    advantages = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    zeros = torch.zeros(6)
    policy_loss, _, ratio = ppo_atari.ppo_loss(
        ratios.log(), zeros, advantages, zeros, zeros, zeros, clip, True
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
    # The /255 scaling lives inside the network: uint8 frames in, it sees the [0, 1] version.
    expected = agent.actor(agent.trunk(frames.float() / 255.0))
    np.testing.assert_allclose(
        logits.detach().numpy(), expected.detach().numpy(), rtol=1e-5, atol=1e-7
    )


def test_bf16_trunk_keeps_fp32_weights_and_heads_and_stays_close_to_fp32():
    torch.manual_seed(0)
    fp32 = ppo_atari.Agent(6).to(memory_format=torch.channels_last)
    bf16 = ppo_atari.Agent(6, bf16=True).to(memory_format=torch.channels_last)
    bf16.load_state_dict(fp32.state_dict())
    frames = torch.randint(0, 256, (16, 4, 84, 84), dtype=torch.uint8)
    (logits, value), (logits16, value16) = fp32(frames), bf16(frames)
    # The optimiser sees fp32 master weights; the log-probabilities come from fp32 heads.
    assert all(parameter.dtype == torch.float32 for parameter in bf16.parameters())
    assert logits16.dtype == value16.dtype == torch.float32
    # bf16 has 8 bits of mantissa: a relative error of a few 1e-3 through the trunk.
    np.testing.assert_allclose(logits16.detach(), logits.detach(), atol=2e-3)
    np.testing.assert_allclose(value16.detach(), value.detach(), rtol=0.05, atol=0.02)
    # And it trains: gradients reach every weight in fp32.
    _, logprob, _, value16 = bf16.get_action_and_value(frames, torch.zeros(16, dtype=torch.long))
    (logprob.sum() + value16.sum()).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in bf16.parameters())


def test_bf16_is_used_only_where_the_hardware_has_it(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(ppo_atari, "native_bf16", lambda device: False)
    assert not ppo_atari.build_agent("ALE/Pong-v5", cpu, bf16=True).bf16
    monkeypatch.setattr(ppo_atari, "native_bf16", lambda device: True)
    assert ppo_atari.build_agent("ALE/Pong-v5", cpu, bf16=True).bf16
    assert not ppo_atari.build_agent("ALE/Pong-v5", cpu, bf16=False).bf16


def tiny_rollout(size: int, seed: int = 0):
    """A small random rollout for `update`: uint8 frames, actions, old log-probs, targets."""
    generator = torch.Generator().manual_seed(seed)
    obs = torch.randint(0, 256, (size, 4, 84, 84), dtype=torch.uint8, generator=generator)
    actions = torch.randint(0, 4, (size,), generator=generator)
    logprobs = torch.full((size,), -np.log(4.0))
    advantages = torch.randn(size, generator=generator)
    returns = torch.randn(size, generator=generator)
    return obs, actions, logprobs, advantages, returns, torch.zeros(size)


@pytest.mark.parametrize("kept", [[0, 3, 5], [2], []])
def test_update_never_averages_an_empty_minibatch(kept):
    # Defect 5: dropping the autoreset steps can leave fewer real transitions than minibatches
    # (here 4); an empty minibatch's mean loss is NaN and the run used to stop as "non-finite".
    # One transition alone must also not be normalised (its standard deviation is NaN).
    torch.manual_seed(0)
    agent = ppo_atari.Agent(4)
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3, eps=1e-5)
    args = ppo_atari.Args(num_envs=2, num_steps=4, num_minibatches=4, update_epochs=2)
    before = [parameter.detach().clone() for parameter in agent.parameters()]
    keep = torch.tensor(kept, dtype=torch.long)
    stats = ppo_atari.update(agent, optimizer, args, keep, *tiny_rollout(8))
    assert stats["finite"], stats
    assert all(np.isfinite(value) for value in stats.values()), stats
    changed = any(not torch.equal(a, b) for a, b in zip(before, agent.parameters(), strict=True))
    assert changed == bool(kept)  # nothing to learn from when every step was an autoreset step
    if kept:
        # Two epochs of min(4, len(kept)) non-empty minibatches: Adam took that many steps.
        (state, *_) = optimizer.state_dict()["state"].values()
        assert int(state["step"]) == 2 * min(4, len(kept))


def test_sigint_and_sigterm_ask_to_stop_and_a_second_signal_aborts(monkeypatch):
    # The signal handling of every rank's Run (here a RankRun's, which opens no log).
    monkeypatch.setenv("SDL_NO_SIGNAL_HANDLERS", "1")

    def exit_now(code: int):  # the abort's os._exit, as an exception this process survives
        raise SystemExit(code)

    monkeypatch.setattr(ppo_atari.os, "_exit", exit_now)
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            run = ppo_atari.RankRun(ppo_atari.Args(), 256, ranks=None)
            assert run.signum is None
            os.kill(os.getpid(), signum)
            assert run.signum == signum
            with pytest.raises(SystemExit) as exit_info:
                os.kill(os.getpid(), signal.SIGINT)
            assert exit_info.value.code == 130
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


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
        lost_life_game_goes_on |= bool(
            np.any((infos["lives"] < lives) & (infos["lives"] > 0) & ~terminated)
        )
        lives = infos["lives"]
        # Right after a reset the stack is padded with black frames; later it holds 4 real ones.
        distinct_frames |= obs[0, 0].any() and not all(
            np.array_equal(obs[0, 0], obs[0, k]) for k in range(1, 4)
        )
    envs.close()
    assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8
    assert np.max(rewards) >= 50, "rewards look clipped"
    # A lost life must not end the env's episode (that would cut the logged returns short).
    assert lost_life_game_goes_on, "no life was lost without the episode ending"
    assert distinct_frames, "the frame stack never held distinct frames"


def test_both_backends_start_an_episode_from_the_same_observation():
    # One preprocessing for training, evaluation and video: the gymnasium backend pads the frame
    # stack with black frames at reset, as the native env does. The no-op starts draw their counts
    # from different generators, so only games whose screen does not change before the serve
    # (Pong) give identical frames; Breakout's ball differs by a few pixels (the native env
    # presses FIRE for one frame at reset, the gymnasium wrappers for one 4-frame step).
    for env_id, max_differing in (("ALE/Pong-v5", 0.0), ("ALE/Breakout-v5", 0.01)):
        native, wrapped = (
            ppo_atari.make_envs(env_id, 3, None, backend) for backend in ("ale", "gymnasium")
        )
        (native_obs, _), (wrapped_obs, _) = native.reset(seed=5), wrapped.reset(seed=5)
        native.close(), wrapped.close()
        assert not native_obs[:, :3].any() and not wrapped_obs[:, :3].any(), env_id
        assert native_obs[:, 3].any() and wrapped_obs[:, 3].any(), env_id
        assert (native_obs[:, 3] != wrapped_obs[:, 3]).mean() <= max_differing, env_id


def test_video_is_made_of_the_observations_the_policy_sees(monkeypatch, tmp_path):
    # --capture-video records the evaluation env itself (not a second, differently preprocessed
    # pipeline): the frames written are the newest frame of each observation of env 0's game, and
    # recording changes nothing about the games played.
    written = {}
    monkeypatch.setattr(
        ppo_atari, "write_video", lambda path, frames: written.update(path=path, frames=frames)
    )
    device = torch.device("cpu")
    envs = ppo_atari.make_envs("ALE/Breakout-v5", 2, None)
    with_video = ppo_atari.evaluate(None, envs, 7, device, video_path=tmp_path / "v.mp4")
    seen = []

    class Spy:  # the same envs, remembering env 0's observations
        def __init__(self, envs):
            self.envs, self.num_envs = envs, envs.num_envs
            self.single_action_space = envs.single_action_space

        def reset(self, **kwargs):
            obs, info = self.envs.reset(**kwargs)
            seen.append(obs[0, -1])
            return obs, info

        def step(self, action):
            result = self.envs.step(action)
            seen.append(result[0][0, -1])
            return result

        def close(self):
            self.envs.close()

    without_video = ppo_atari.evaluate(
        None, Spy(ppo_atari.make_envs("ALE/Breakout-v5", 2, None)), 7, device
    )
    np.testing.assert_array_equal(with_video, without_video)
    assert written["path"] == tmp_path / "v.mp4"
    frames = written["frames"]
    assert 10 < len(frames) <= len(seen)
    np.testing.assert_array_equal(np.stack(frames), np.stack(seen[: len(frames)]))


# --- the CLI ------------------------------------------------------------------------------------


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """For tests that call the script in-process: work in a temporary folder (so runs/ can never
    land in the checkout) and give back the signal handlers the script installs."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SDL_NO_SIGNAL_HANDLERS", "1")
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield tmp_path
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def eval_figures(output: str) -> tuple[str, str, str]:
    """(mean, std, episodes) of the `eval return X ± Y over N episodes` sentence in `output`."""
    (figures,) = re.findall(r"eval return (\S+) ± (\S+) over (\d+) episodes", output)
    return figures


def run_main(*argv: str) -> None:
    ppo_atari.main(ppo_atari.parse_args(list(argv)))


def test_pong_smoke_run_is_deterministic_logs_every_key_and_tracks(tmp_path):
    first = run_script_in(tmp_path / "a", SCRIPT, "--env-id", "ALE/Pong-v5", *TINY, "--track")
    second = run_script_in(
        tmp_path / "b", SCRIPT, "--env-id", "ALE/Pong-v5", *TINY, "--no-save-model", "--track",
        "--wandb-group", "g",
    )  # fmt: skip
    assert first.returncode == 0 and second.returncode == 0, first.describe() + second.describe()
    for key in (
        "charts/learning_rate", "charts/SPS", "losses/policy_loss", "losses/value_loss",
        "losses/entropy", "losses/approx_kl", "losses/old_approx_kl", "losses/clipfrac",
        "losses/explained_variance", "losses/ratio_mean", "losses/ratio_max",
        "eval/episodic_return",
    ):  # fmt: skip
        assert key in first.scalars, f"{key} not logged"
    for key in ("losses/policy_loss", "losses/value_loss", "losses/entropy"):
        assert first.scalars[key] == second.scalars[key], key
    assert first.scalars["eval/episodic_return"] == second.scalars["eval/episodic_return"]
    # A Pong game lasts until one side scores 21: the evaluation return is in [-21, 21].
    (eval_return,) = first.values("eval/episodic_return")
    assert -21 <= eval_return <= 21
    assert first.steps("charts/SPS") == [256]
    (checkpoint,) = first.checkpoints()
    state = torch.load(checkpoint, weights_only=True)
    assert (state["kind"], state["env_id"]) == ("ppo-atari-cnn/1", "ALE/Pong-v5")
    assert state["global_step"] == 256
    assert "script" not in state
    assert first.stdout.strip().splitlines()[-1].startswith("done: 256 steps")
    # W&B: grouped by experiment name unless --wandb-group says otherwise; the config is the args.
    (tracked,) = read_wandb_runs(first.workdir)
    (grouped,) = read_wandb_runs(second.workdir)
    assert (tracked.group, grouped.group) == ("ppo_atari", "g")
    assert tracked.name == state["run_name"]
    assert tracked.config["env_id"] == "ALE/Pong-v5" and tracked.config["seed"] == 1
    assert tracked.config["num_steps"] == 32 and grouped.config["wandb_group"] == "g"


def test_logged_returns_are_the_true_unclipped_scores(run_script):
    result = run_script(
        SCRIPT, "--env-id", "AsterixNoFrameskip-v4", "--num-envs", "4", "--num-steps", "128",
        "--total-timesteps", "1024", "--update-epochs", "1", "--eval-episodes", "1",
        "--no-save-model",
    )  # fmt: skip
    assert result.returncode == 0, result.describe()
    returns = result.values("charts/episodic_return")
    assert returns, "no episode finished"
    # Asterix scores 50 per item; clipped rewards would sum to small integers instead.
    assert max(returns) >= 50 and all(r % 50 == 0 for r in returns), returns


def test_resume_alone_restores_the_state_refuses_changes_and_eval_checkpoint_repeats_the_final_eval(
    in_tmp, capsys
):
    # Non-default settings (seed 9, 2 envs): `--resume PATH` alone must take them from the file.
    run_main(
        "--env-id", "BreakoutNoFrameskip-v4", "--seed", "9", "--num-envs", "2", "--num-steps", "32",
        "--total-timesteps", "128", "--checkpoint-freq", "64", "--log-interval", "64",
        "--eval-episodes", "3", "--no-cuda", "--torch-threads", "1",
    )  # fmt: skip
    trained = capsys.readouterr().out
    assert "done: 128 steps" in trained
    (run_dir,) = (in_tmp / "runs").iterdir()
    final = run_dir / "ppo_atari.pt"
    # Every periodic checkpoint is kept, named by its step.
    kept = sorted(path.name for path in (run_dir / "checkpoints").iterdir())
    assert kept == ["ppo_atari_000000000064.pt", "ppo_atari_000000000128.pt"]

    # Defect 3: --eval-checkpoint alone plays the games of the final evaluation: same figures.
    run_main("--eval-checkpoint", str(final))
    evaluated = capsys.readouterr().out
    assert eval_figures(evaluated) == eval_figures(trained)
    assert eval_figures(trained)[2] == "3"

    # Resumed with its own step as the budget, nothing trains: the state written back at the end
    # is the one restored, so it must equal the saved one exactly (weights, Adam, lr schedule).
    step64 = in_tmp / "step64.pt"
    shutil.copy(run_dir / "checkpoints" / kept[0], step64)
    final.unlink()
    # Flags that may change on a resume:
    run_main("--resume", str(step64), "--total-timesteps", "64", "--eval-episodes", "1")
    saved, restored = torch.load(step64, weights_only=True), torch.load(final, weights_only=True)
    for key in ("kind", "env_id", "run_name", "global_step", "iteration"):
        assert restored[key] == saved[key], key
    assert (saved["global_step"], saved["iteration"]) == (64, 1)
    assert restored["model"].keys() == saved["model"].keys()
    for name, tensor in saved["model"].items():
        assert torch.equal(restored["model"][name], tensor), name
    assert restored["optimizer"]["param_groups"] == saved["optimizer"]["param_groups"]  # incl. lr
    assert restored["optimizer"]["state"].keys() == saved["optimizer"]["state"].keys()
    for index, state in saved["optimizer"]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(restored["optimizer"]["state"][index][name], tensor), (index, name)
    changed = {"total_timesteps": 64, "eval_episodes": 1, "resume": str(step64)}
    assert restored["args"] == {**saved["args"], **changed}

    # Defect 9: `--resume PATH` alone continues with the checkpoint's settings to its budget.
    capsys.readouterr()
    run_main("--resume", str(step64))
    assert "done: 128 steps" in capsys.readouterr().out
    state = torch.load(final, weights_only=True)
    assert (state["global_step"], state["iteration"]) == (128, 2)
    assert (state["args"]["seed"], state["args"]["num_envs"], state["args"]["env_id"]) == (
        9, 2, "BreakoutNoFrameskip-v4",
    )  # fmt: skip

    # Defect 2: a setting given against the checkpoint's is refused with one line, before any work.
    for argv, message in (
        (
            ("--resume", str(step64), "--num-envs", "4"),
            "--num-envs is 4 but the checkpoint was trained with 2",
        ),
        (
            ("--resume", str(step64), "--seed", "1"),
            "--seed is 1 but the checkpoint was trained with 9",
        ),
        (("--eval-checkpoint", str(final), "--env-id", "ALE/Pong-v5"), "--env-id is 'ALE/Pong-v5'"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            run_main(*argv)
        assert exit_info.value.code == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_breakout_sigterm_saves_resumes_the_same_wandb_run_and_eval_checkpoint_records_video(
    run_script,
):
    def checkpointed(workdir):
        return any(workdir.glob("runs/*/checkpoints/*.pt"))

    # The budget is far beyond the point of the signal (after the first periodic checkpoint).
    interrupted = run_script(
        SCRIPT, "--env-id", "BreakoutNoFrameskip-v4", "--total-timesteps", "100000",
        "--num-steps", "32", "--checkpoint-freq", "256", "--track",
        interrupt_when=checkpointed, interrupt_signals=(signal.SIGTERM,),
    )  # fmt: skip
    assert interrupted.returncode == 143, interrupted.describe()
    assert "interrupted at step" in interrupted.stderr and "Traceback" not in interrupted.stderr
    (run_dir,) = interrupted.run_dirs
    checkpoint = run_dir / "ppo_atari.pt"
    step = torch.load(checkpoint, weights_only=True)["global_step"]
    assert 0 < step < 100000 and step % 256 == 0

    resumed = run_script(
        SCRIPT, "--resume", str(checkpoint), "--total-timesteps", str(step + 256),
        "--eval-episodes", "1", "--capture-video", "--track", "--log-interval", "256",
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.describe()
    assert resumed.run_dirs == [run_dir]  # same run folder, same file
    state = torch.load(checkpoint, weights_only=True)
    assert state["global_step"] == step + 256 and state["iteration"] == step // 256 + 1
    assert resumed.steps("charts/SPS")[-1] == step + 256
    first, second = read_wandb_runs(resumed.workdir)
    assert first.run_id == second.run_id and first.name == second.name == run_dir.name

    # The resumed run's final evaluation recorded its game into a folder named by its step;
    # --eval-checkpoint (with the saved settings) plays and records the same game again.
    evaluated = run_script(SCRIPT, "--eval-checkpoint", str(checkpoint), "--capture-video")
    assert evaluated.returncode == 0, evaluated.describe()
    line = evaluated.stdout.strip().splitlines()[-1]
    assert line.startswith("eval return ") and "over 1 episodes" in line
    assert eval_figures(line) == eval_figures(resumed.stdout)
    videos = evaluated.workdir / "videos" / run_dir.name
    resumed_eval = f"eval-step-{step + 256}"
    assert sorted(path.name for path in videos.iterdir()) == ["eval-checkpoint", resumed_eval]
    assert len(list((videos / resumed_eval).rglob("*.mp4"))) == 1
    assert len(list((videos / "eval-checkpoint").rglob("*.mp4"))) == 1


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_the_final_evaluation_ends_it_with_the_signal_status(
    run_script, signum, code
):
    """After training the checkpoint is saved: a signal ends the evaluation and the process, with
    128 + the signal's number, rather than being noted and ignored."""

    saved_at = []

    def evaluation_under_way(workdir):  # half a second after the final save: the games are on
        if not saved_at and any(workdir.glob("runs/*/ppo_atari.pt")):
            saved_at.append(time.monotonic())
        return bool(saved_at) and time.monotonic() - saved_at[0] > 0.5

    # Four games of Pong at random level last seconds: the signal lands while they play.
    result = run_script(
        SCRIPT, "--env-id", "ALE/Pong-v5", "--total-timesteps", "256", "--num-steps", "32",
        "--eval-episodes", "4", "--checkpoint-freq", "0",
        interrupt_when=evaluation_under_way, interrupt_signals=(signum,),
    )  # fmt: skip
    assert result.returncode == code, result.describe()
    name = signal.Signals(signum).name
    assert f"{name}: the final evaluation was stopped at step 256" in result.stderr
    assert "Traceback" not in result.stderr and "done:" not in result.stdout
    (checkpoint,) = result.checkpoints()
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 256


def test_a_resumed_run_records_its_evaluation_into_a_folder_of_its_own(in_tmp, capsys):
    run_main("--env-id", "BreakoutNoFrameskip-v4", *TINY, "--capture-video", "--torch-threads", "1")
    (checkpoint,) = in_tmp.glob("runs/*/ppo_atari.pt")
    run_main("--resume", str(checkpoint), "--total-timesteps", "512")
    assert "Overwriting" not in capsys.readouterr().err
    videos = in_tmp / "videos" / checkpoint.parent.name
    assert sorted(path.name for path in videos.iterdir()) == ["eval", "eval-step-512"]
    assert len(list((videos / "eval").glob("*.mp4"))) == 1
    assert len(list((videos / "eval-step-512").glob("*.mp4"))) == 1


def test_non_finite_loss_stops_with_a_saved_state(in_tmp, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(
            "--env-id", "ALE/Breakout-v5", *TINY, "--learning-rate", "1e30", "--no-anneal-lr",
            "--max-grad-norm", "1e30", "--update-epochs", "2", "--no-cuda", "--torch-threads", "1",
        )  # fmt: skip
    assert exit_info.value.code == 1
    assert "loss became non-finite at step 256" in capsys.readouterr().err
    assert list(in_tmp.glob("runs/*/ppo_atari_nan.pt"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_minibatches": 7}, "does not divide"),
        ({"total_timesteps": 0}, "must be positive"),
        ({"num_envs": -1}, "must be positive"),
        ({"gamma": 1.5}, "[0, 1]"),
        ({"repeat_action_probability": 1.5}, "[0, 1]"),
        ({"learning_rate": 0.0}, "must be positive"),
        ({"log_interval": -1}, "must be >= 0"),
        ({"resume": "a.pt", "eval_checkpoint": "b.pt"}, "not both"),
    ],
)
def test_bad_args_fail_with_one_line(in_tmp, capsys, overrides, message):
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


def test_checkpoints_of_another_kind_or_game_are_refused(in_tmp, capsys):
    args = asdict(ppo_atari.Args(env_id="ALE/Breakout-v5"))
    base = {"kind": "ppo-atari-cnn/1", "env_id": "ALE/Breakout-v5", "run_name": "x", "args": args}
    torch.save({**base, "kind": "ppo-discrete-mlp/1"}, in_tmp / "other.pt")
    torch.save({"script": "ppo_atari", "env_id": "ALE/Pong-v5", "args": {}}, in_tmp / "old.pt")
    torch.save(base, in_tmp / "breakout.pt")
    (in_tmp / "text.pt").write_text("not a checkpoint")
    cases = {
        ("--resume", "other.pt"): (
            "holds a ppo-discrete-mlp/1 checkpoint; this script trains ppo-atari-cnn/1"
        ),
        ("--eval-checkpoint", "old.pt"): "is not a checkpoint of this project",
        ("--resume", "text.pt"): "not a readable checkpoint",
        (
            "--resume",
            "breakout.pt",
            "--env-id",
            "ALE/Pong-v5",
        ): "--env-id is 'ALE/Pong-v5' but the checkpoint",
        ("--eval-checkpoint", "breakout.pt", "--env-id", "ALE/Pong-v5"): (
            "--env-id is 'ALE/Pong-v5'"
        ),
    }
    for argv, message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            run_main(*argv)
        assert exit_info.value.code == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)


# --- evaluation curve over a run's checkpoints ----------------------------------------------------


def test_evaluate_checkpoint_folder_plays_in_step_order_and_writes_table_csv_and_png(
    tmp_path, capsys
):
    # Step order is the checkpoints' own global_step, not the order of the file names.
    steps = {"b.pt": 300, "a.pt": 1000, "c.pt": 20}
    for name in steps:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a checkpoint: ignored")
    played = []

    def load(path):
        return {"global_step": steps[os.path.basename(path)], "env_id": "ALE/Pong-v5"}

    def play(checkpoint, path):
        played.append(None if checkpoint is None else checkpoint["global_step"])
        step = -1 if checkpoint is None else checkpoint["global_step"]
        return {"return": np.array([step / 10, step / 10 + 2.0])}

    results = ppo_atari.evaluate_checkpoint_folder(str(tmp_path), load, play, ".pt", "agent steps")
    assert played == [20, 300, 1000, None]  # the random policy last, on the same seeds
    assert [step for step, _ in results] == [20, 300, 1000, -1]
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["step", "mean", "±", "std", "min", "max"]
    assert out[1].split() == ["random", "0.90", "±", "1.00", "-0.10", "1.90"]
    assert out[2].split() == ["20", "3.00", "±", "1.00", "2.00", "4.00"]
    assert [line.split()[0] for line in out[3:5]] == ["300", "1000"]
    csv = (tmp_path / "eval_curve.csv").read_text().splitlines()
    assert csv[0] == "step,mean,std,min,max,episodes"
    rows = [[float(value) for value in line.split(",")] for line in csv[1:]]
    np.testing.assert_allclose(rows[0], [-1, 0.9, 1.0, -0.1, 1.9, 2])
    np.testing.assert_allclose(rows[1], [20, 3.0, 1.0, 2.0, 4.0, 2])
    assert [row[0] for row in rows] == [-1, 20, 300, 1000]
    assert (tmp_path / "eval_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def png_height(path) -> int:
    """The height in pixels of a PNG file (from its IHDR chunk)."""
    return int.from_bytes(path.read_bytes()[20:24], "big")


def test_evaluate_checkpoint_folder_reports_every_metric_that_play_returns(tmp_path, capsys):
    # Any script's checkpoints: here .npz files (a .pt among them is not one), two extra metrics.
    steps = {"x_000000000500.npz": 500, "x_000000000250.npz": 250, "other.pt": 9}
    for name in steps:
        (tmp_path / name).write_bytes(b"")
    calls = []

    def load(path):
        return {"global_step": np.array(steps[os.path.basename(path)]), "env_id": np.str_("Env-v0")}

    def play(checkpoint, path):
        calls.append(path)
        step = -100 if checkpoint is None else int(checkpoint["global_step"])
        return {
            "return": np.array([step, step + 2.0]),
            "tracking RMSE (m)": np.array([1 / step, 3 / step]),
            "pipes": np.array([step // 50, step // 50]),
        }

    folder = str(tmp_path)
    results = ppo_atari.evaluate_checkpoint_folder(folder, load, play, ".npz", "environment steps")
    assert calls == [str(tmp_path / "x_000000000250.npz"), str(tmp_path / "x_000000000500.npz"), ""]
    assert [step for step, _ in results] == [250, 500, -1]
    assert list(results[0][1]) == ["return", "tracking RMSE (m)", "pipes"]
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == [
        "step", "mean", "±", "std", "min", "max", "tracking", "RMSE", "(m)", "±", "std",
        "pipes", "±", "std",
    ]  # fmt: skip
    row = table[2].split()
    assert row[:1] + row[6:] == ["250", "0.008", "±", "0.004", "5", "±", "0"], table
    csv = (tmp_path / "eval_curve.csv").read_text().splitlines()
    extra_columns = "tracking_rmse_m_mean,tracking_rmse_m_std,pipes_mean,pipes_std"
    assert csv[0] == "step,mean,std,min,max,episodes," + extra_columns
    rows = np.array([[float(value) for value in line.split(",")] for line in csv[1:]])
    for row, (step, played) in zip(rows, [results[-1], *results[:-1]], strict=True):
        returns, rmse, pipes = played.values()
        expected = [step, returns.mean(), returns.std(), returns.min(), returns.max(), 2]
        expected += [rmse.mean(), rmse.std(), pipes.mean(), pipes.std()]
        np.testing.assert_allclose(row, expected)
    assert rows[:, 0].tolist() == [-1, 250, 500]
    # One panel per extra metric under the return's: taller than the figure of the return alone.
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "x_000000000250.npz").write_bytes(b"")
    ppo_atari.evaluate_checkpoint_folder(
        str(alone), load, lambda checkpoint, path: {"return": np.zeros(2)}, ".npz", "steps"
    )
    assert png_height(tmp_path / "eval_curve.png") > png_height(alone / "eval_curve.png")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "holds no checkpoints"),
        (
            {"a.pt": "ALE/Pong-v5", "b.pt": "ALE/Breakout-v5"},
            "mixes checkpoints of ALE/Breakout-v5, ALE/Pong-v5",
        ),
    ],
)
def test_evaluate_checkpoint_folder_refuses_an_empty_or_mixed_folder(
    tmp_path, capsys, files, message
):
    for name in files:
        (tmp_path / name).write_bytes(b"")

    def play(checkpoint, path):
        raise AssertionError("nothing may be played before the folder is checked")

    def load(path):
        return {"global_step": 1, "env_id": files[os.path.basename(path)]}

    with pytest.raises(SystemExit) as exit_info:
        ppo_atari.evaluate_checkpoint_folder(str(tmp_path), load, play, ".pt", "agent steps")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_folder_of_another_scripts_or_games_checkpoints_is_refused_through_the_cli(in_tmp, capsys):
    folder = in_tmp / "checkpoints"
    folder.mkdir()
    torch.save(
        {"kind": "ppo-discrete-mlp/1", "env_id": "CartPole-v1", "args": {}},
        folder / "x_000000000064.pt",
    )
    pong = asdict(ppo_atari.Args(env_id="ALE/Pong-v5"))
    base = {"kind": "ppo-atari-cnn/1", "run_name": "x", "global_step": 64}
    for argv, message in (
        (("--eval-checkpoint", str(folder)), "holds a ppo-discrete-mlp/1 checkpoint"),
        (("--eval-checkpoint", str(in_tmp / "empty")), "holds no checkpoints"),
    ):
        (in_tmp / "empty").mkdir(exist_ok=True)
        with pytest.raises(SystemExit) as exit_info:
            ppo_atari.main(ppo_atari.parse_args(list(argv)))
        assert exit_info.value.code == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
    # A folder of Pong checkpoints evaluated as Breakout: the game is the checkpoints' own.
    for path in folder.iterdir():
        path.unlink()
    torch.save({**base, "env_id": "ALE/Pong-v5", "args": pong}, folder / "p_000000000064.pt")
    with pytest.raises(SystemExit) as exit_info:
        ppo_atari.main(
            ppo_atari.parse_args(["--eval-checkpoint", str(folder), "--env-id", "ALE/Breakout-v5"])
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--env-id is 'ALE/Breakout-v5' but the checkpoint" in err[0], err


def test_three_periodic_checkpoints_then_the_folder_evaluation_draws_the_curve(in_tmp, capsys):
    """--eval-checkpoint FOLDER: every kept checkpoint in step order, each with the figures that
    --eval-checkpoint gives it alone, and the random policy on the same games."""
    run_main(
        "--env-id", "BreakoutNoFrameskip-v4", "--num-envs", "2", "--num-steps", "32",
        "--total-timesteps", "192", "--checkpoint-freq", "64", "--log-interval", "64",
        "--eval-episodes", "2", "--torch-threads", "1",
    )  # fmt: skip
    trained = capsys.readouterr().out
    (folder,) = in_tmp.glob("runs/*/checkpoints")
    kept = sorted(folder.iterdir())
    assert [path.name for path in kept] == [f"ppo_atari_{step:012d}.pt" for step in (64, 128, 192)]
    alone = []
    for path in kept:
        run_main("--eval-checkpoint", str(path))
        alone.append(eval_figures(capsys.readouterr().out))
    # The last kept checkpoint is the trained agent: the same games as the run's end.
    assert alone[-1] == eval_figures(trained)

    run_main("--eval-checkpoint", str(folder))
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if " ± " in line]
    assert rows[0] == ["step", "mean", "±", "std", "min", "max"]
    assert [row[0] for row in rows[1:]] == ["random", "64", "128", "192"]
    csv = [line.split(",") for line in (folder / "eval_curve.csv").read_text().splitlines()]
    assert csv[0] == ["step", "mean", "std", "min", "max", "episodes"]
    assert [row[0] for row in csv[1:]] == ["-1", "64", "128", "192"]
    for row, (mean, std, episodes) in zip(csv[2:], alone, strict=True):
        assert (f"{float(row[1]):.2f}", f"{float(row[2]):.2f}", row[5]) == (mean, std, episodes)
    assert (folder / "eval_curve.png").stat().st_size > 10_000


# --- learning --------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_args_learn_road_runner_well_beyond_the_random_policy(run_script):
    """Pong needs ~0.5M steps before it moves; RoadRunner rewards running left from the first
    minutes. Default settings, seed 1, 20,480 agent steps (~3 min on a busy 2-core CPU): measured
    eval return 630 ± 548 over 10 episodes (checkpoints at 5k/10k/15k steps: 10, 80, 350), where
    the uniformly random policy scores 0 ± 0 on the same evaluation seeds."""
    env_id, episodes = "RoadRunnerNoFrameskip-v4", 10
    result = run_script(
        SCRIPT, "--env-id", env_id, "--total-timesteps", "20480", "--eval-episodes", str(episodes),
        "--no-save-model",
    )  # fmt: skip
    assert result.returncode == 0, result.describe()
    trained = np.array(result.values("eval/episodic_return"))
    assert len(trained) == episodes
    envs = ppo_atari.make_envs(env_id, episodes, None)
    seed = 1 + ppo_atari.EVAL_SEED_OFFSET  # the evaluation seed rule of the script, seed 1
    random_policy = ppo_atari.evaluate(None, envs, seed, torch.device("cpu"))
    assert trained.mean() >= random_policy.mean() + 200, (trained, random_policy)


def test_training_returns_reads_the_episodes_a_run_logged(tmp_path):
    """The checkpoint curve draws the training episodes from the run's own TensorBoard log."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    for step, value in ((1024, -21.0), (2048, -20.0), (3072, -19.0)):
        writer.add_scalar("charts/episodic_return", value, step)
        writer.add_scalar("charts/SPS", 400, step)
    writer.close()
    steps, returns = ppo_atari.training_returns(tmp_path)
    assert steps.tolist() == [1024, 2048, 3072] and returns.tolist() == [-21.0, -20.0, -19.0]
    (tmp_path / "empty").mkdir()
    assert len(ppo_atari.training_returns(tmp_path / "empty")[1]) == 0


def test_training_and_a_recorded_evaluation_copy_device_tensors_to_the_host(
    tensors_as_if_on_a_gpu, in_tmp
):
    """On a GPU every tensor that reaches NumPy must go through .cpu(); the guard makes the CPU
    refuse the same conversions, so a forgotten copy fails here rather than on a GPU machine."""
    run_main("--env-id", "ALE/Breakout-v5", *TINY, "--checkpoint-freq", "0", "--torch-threads", "1")
    (checkpoint,) = in_tmp.glob("runs/*/ppo_atari.pt")
    run_main("--eval-checkpoint", str(checkpoint), "--capture-video")
    assert list(in_tmp.glob("videos/**/*.mp4"))
