"""Tests of ppo_cartpole.py: pure parts against slow references, then the real CLI end to end."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import ROOT, read_scalars, read_wandb_runs, run_script_in

sys.path.insert(0, str(ROOT))
import ppo_cartpole  # noqa: E402

SCRIPT = "ppo_cartpole.py"
SHAPE = ("--num-envs", "4", "--num-steps", "64")
TINY = ("--total-timesteps", "1024", *SHAPE, "--eval-episodes", "2")


# --- GAE -------------------------------------------------------------------------------------


def reference_gae(rewards, values, terminated, truncated, gamma, lam):
    """Slow, literal GAE for ONE environment's rollout, episode by episode.

    `values[t]` is V(obs_t) for t = 0..T (obs_T follows the last step). With next-step autoreset,
    after a step that ends an episode the next row is the autoreset step (ignored action, reward 0,
    reset observation): it is not a transition, and its advantage is returned as NaN.
    A_t = sum_k (gamma * lam)^k * delta_{t+k}, summed until (and including) the step that ends the
    episode or the rollout, where
    delta_j = r_j + gamma * V(obs_{j+1}) * [not terminated_j] - V(obs_j).
    """
    steps = len(rewards)
    advantages = [float("nan")] * steps
    for t in range(steps):
        if t > 0 and (terminated[t - 1] or truncated[t - 1]):
            continue  # the autoreset step
        total, discount = 0.0, 1.0
        for j in range(t, steps):
            bootstrap = 0.0 if terminated[j] else gamma * values[j + 1]
            total += discount * (rewards[j] + bootstrap - values[j])
            if terminated[j] or truncated[j]:
                break
            discount *= gamma * lam
        advantages[t] = total
    return advantages


def test_compute_gae_matches_slow_reference_with_termination_truncation_and_autoreset():
    generator = np.random.default_rng(0)
    steps, envs, gamma, lam = 40, 5, 0.97, 0.9
    rewards = generator.normal(size=(steps, envs))
    values = generator.normal(size=(steps + 1, envs))
    terminated = generator.random((steps, envs)) < 0.08
    truncated = (generator.random((steps, envs)) < 0.08) & ~terminated
    # Make sure every kind of boundary occurs, including at the last step of the rollout.
    terminated[5, 0], truncated[9, 1], truncated[steps - 1, 2], terminated[steps - 1, 3] = (
        True,
        True,
        True,
        True,
    )
    ended = terminated | truncated
    # The step after an episode ends is the autoreset step: reward 0 as gymnasium returns it.
    rewards[1:][ended[:-1]] = 0.0

    advantages, returns = ppo_cartpole.compute_gae(
        torch.tensor(rewards),
        torch.tensor(values),
        torch.tensor(terminated),
        torch.tensor(ended),
        gamma,
        lam,
    )
    for env in range(envs):
        expected = reference_gae(
            rewards[:, env], values[:, env], terminated[:, env], truncated[:, env], gamma, lam
        )
        real_steps = ~np.isnan(expected)
        np.testing.assert_allclose(
            advantages[:, env].numpy()[real_steps], np.array(expected)[real_steps], rtol=1e-10
        )
    np.testing.assert_allclose(returns.numpy(), advantages.numpy() + values[:-1], rtol=1e-10)


def test_compute_gae_bootstraps_truncation_but_not_termination():
    # One env, three steps: a step, a truncated last step of an episode, and the autoreset step.
    rewards = torch.tensor([[1.0], [1.0], [0.0]])
    values = torch.tensor([[0.5], [0.6], [10.0], [0.3]])  # V(final obs of the episode) = 10
    ended = torch.tensor([[False], [True], [False]])
    gamma, lam = 0.9, 0.8

    truncated_adv, _ = ppo_cartpole.compute_gae(
        rewards, values, torch.zeros_like(ended), ended, gamma, lam
    )
    delta1 = 1.0 + gamma * 10.0 - 0.6  # truncation: bootstrap from V(final obs)
    delta0 = 1.0 + gamma * 0.6 - 0.5
    assert truncated_adv[1, 0].item() == pytest.approx(delta1)
    assert truncated_adv[0, 0].item() == pytest.approx(delta0 + gamma * lam * delta1)

    terminated_adv, _ = ppo_cartpole.compute_gae(rewards, values, ended, ended, gamma, lam)
    assert terminated_adv[1, 0].item() == pytest.approx(1.0 - 0.6)  # termination: no bootstrap
    assert terminated_adv[0, 0].item() == pytest.approx(delta0 + gamma * lam * (1.0 - 0.6))


# --- PPO loss --------------------------------------------------------------------------------


def test_ppo_loss_matches_elementwise_reference_and_clips_gradients():
    clip = 0.2
    old_logprobs = torch.zeros(6)
    # ratios: inside the range, above 1+eps, below 1-eps; for positive and negative advantages
    ratios = torch.tensor([1.1, 1.5, 0.5, 1.1, 1.5, 0.5])
    advantages = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    new_logprobs = ratios.log().requires_grad_()
    new_values = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], requires_grad=True)
    old_values = torch.tensor([0.5, 0.5, 0.5, 3.5, 3.9, 5.0])
    returns = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])

    policy_loss, value_loss, ratio = ppo_cartpole.ppo_loss(
        new_logprobs,
        old_logprobs,
        advantages,
        new_values,
        old_values,
        returns,
        clip,
        clip_vloss=True,
    )
    expected_terms = []
    for r, a in zip(ratios.tolist(), advantages.tolist(), strict=True):
        expected_terms.append(-min(r * a, min(max(r, 1 - clip), 1 + clip) * a))
    assert policy_loss.item() == pytest.approx(sum(expected_terms) / 6)
    np.testing.assert_allclose(ratio.detach().numpy(), ratios.numpy(), rtol=1e-6)

    expected_value_terms = []
    for v, v_old, g in zip(new_values.tolist(), old_values.tolist(), returns.tolist(), strict=True):
        v_clipped = v_old + min(max(v - v_old, -clip), clip)
        expected_value_terms.append(0.5 * max((v - g) ** 2, (v_clipped - g) ** 2))
    assert value_loss.item() == pytest.approx(sum(expected_value_terms) / 6)

    # Clipped terms carry no gradient: A > 0 with r > 1+eps, and A < 0 with r < 1-eps.
    policy_loss.backward()
    gradient = new_logprobs.grad
    assert gradient[1].item() == 0.0 and gradient[5].item() == 0.0
    # Unclipped and pessimistic terms keep theirs: d(-r A)/d(log r) / 6 = -r A / 6.
    for i in (0, 2, 3, 4):
        assert gradient[i].item() == pytest.approx(-ratios[i].item() * advantages[i].item() / 6)


def test_unclipped_value_loss_is_half_mean_squared_error():
    new_values, returns = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0])
    _, value_loss, _ = ppo_cartpole.ppo_loss(
        torch.zeros(2),
        torch.zeros(2),
        torch.zeros(2),
        new_values,
        torch.zeros(2),
        returns,
        0.2,
        clip_vloss=False,
    )
    assert value_loss.item() == pytest.approx(0.5)


def test_linear_schedule_starts_at_the_rate_and_ends_one_step_above_zero():
    assert ppo_cartpole.linear_schedule(1.0, 1, 4) == 1.0
    assert ppo_cartpole.linear_schedule(1.0, 4, 4) == pytest.approx(0.25)


def test_network_initialisation_gives_near_uniform_policy():
    agent = ppo_cartpole.Agent(4, 2)
    logits = agent.actor(torch.randn(256, 4))
    assert logits.abs().max().item() < 0.1  # the 0.01-gain policy head
    weight = agent.critic[0].weight.detach()
    np.testing.assert_allclose(
        (weight.T @ weight).numpy(), 2.0 * np.eye(4), atol=1e-5
    )  # orthogonal, gain sqrt 2


def test_update_skips_empty_minibatches_and_an_empty_batch():
    """Defect 5: dropping autoreset steps can leave fewer samples than minibatches."""
    torch.manual_seed(0)
    agent = ppo_cartpole.Agent(4, 2)
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3)
    args = ppo_cartpole.Args(num_minibatches=4, update_epochs=2)
    three = (torch.randn(3, 4), torch.tensor([0, 1, 0]), *torch.randn(4, 3))
    stats = ppo_cartpole.update(agent, optimizer, args, *three)
    assert stats.pop("finite") is True
    assert all(np.isfinite(value) for key, value in stats.items() if key != "explained_variance"), (
        stats
    )
    empty = (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), *torch.zeros(4, 0))
    assert ppo_cartpole.update(agent, optimizer, args, *empty) == {"finite": True}


# --- the CLI ---------------------------------------------------------------------------------

FIGURES = re.compile(r"eval return (\S+) ± (\S+) over (\d+) episodes")


def eval_figures(output: str) -> tuple[str, str, str]:
    """(mean, std, episodes) of the one `eval return X ± Y over N episodes` sentence."""
    (figures,) = FIGURES.findall(output)
    return figures


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """For tests that call main in this process: run in tmp_path (a regression cannot write runs/
    into the checkout) and put back what main changes process-wide (signal handlers, threads)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SDL_NO_SIGNAL_HANDLERS", "1")
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    yield tmp_path
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
    torch.set_num_threads(threads)


def main_in_process(*argv: str) -> None:
    """The script's real command line (parse_args, then main), in this process."""
    ppo_cartpole.main(ppo_cartpole.parse_args(list(map(str, argv))))


def run_in_process(capsys, *argv: str) -> tuple[int, list[str]]:
    """Run main on `argv`, which must exit; return (exit code, stderr lines).

    Bad input must be rejected before any heavy work, so these cases run in-process: the same
    code path as the command line without paying an interpreter start per case.
    """
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main_in_process(*argv)
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


# --- Greedy evaluation and the stop once solved -----------------------------------------------


def slow_greedy_returns(agent, env_id: str, episodes: int, seed: int) -> list[float]:
    """One env at a time: episode i, a fresh env reset with seed + i, played greedily to its end."""
    returns = []
    for episode in range(episodes):
        env = gym.make(env_id)
        obs, _ = env.reset(seed=seed + episode)
        total, done = 0.0, False
        while not done:
            with torch.no_grad():
                action = agent.actor(torch.as_tensor(obs, dtype=torch.float32)).argmax().item()
            obs, reward, terminated, truncated, _ = env.step(action)
            total, done = total + float(reward), terminated or truncated
        returns.append(total)
        env.close()
    return returns


@pytest.fixture
def uneven_agent():
    """A small untrained network whose greedy episodes differ in length (105-151 steps)."""
    torch.manual_seed(0)
    return ppo_cartpole.Agent(4, 2, hidden_size=8)


def test_evaluate_plays_one_seeded_episode_per_env_like_envs_played_one_by_one(uneven_agent):
    returns = ppo_cartpole.evaluate(uneven_agent, "CartPole-v1", 5, 3, torch.device("cpu"))
    expected = slow_greedy_returns(uneven_agent, "CartPole-v1", 5, 3)
    assert len(set(expected)) > 1, "the reference episodes should differ to test anything"
    assert returns.tolist() == expected


def test_evaluate_gives_up_at_the_first_episode_that_ends_short(uneven_agent):
    full = slow_greedy_returns(uneven_agent, "CartPole-v1", 5, 3)
    threshold = sorted(full)[1]  # more than the shortest episode, less than the others
    returns = ppo_cartpole.evaluate(
        uneven_agent, "CartPole-v1", 5, 3, torch.device("cpu"), give_up_below=threshold
    )
    shortest = int(np.argmin(full))
    assert returns[shortest] == full[shortest] < threshold
    # The others stopped when the shortest ended: each has exactly that many steps (+1 per step).
    assert all(returns[i] == full[shortest] for i in range(5) if i != shortest)


def test_training_stops_at_the_first_check_the_greedy_policy_passes(in_tmp, capsys):
    """A threshold every greedy episode reaches (CartPole episodes last at least ~8 steps) stops
    the run at its first check; --no-stop-when-solved trains the full budget."""
    budget = (
        "--total-timesteps",
        "4096",
        *SHAPE,
        "--eval-episodes",
        "2",
        "--solved-check-freq",
        "512",
    )
    main_in_process(*budget, "--solved-return", "5")
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("done: 512 steps") and "solved at step 512;" in summary, summary
    (checkpoint,) = in_tmp.glob("runs/*/ppo_cartpole.pt")
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 512
    # An unreachable threshold, and the flag that turns the stop off, both train the full budget.
    for stop in (("--solved-return", "1000"), ("--solved-return", "5", "--no-stop-when-solved")):
        main_in_process(*budget, *stop, "--no-save-model")
        summary = capsys.readouterr().out.strip().splitlines()[-1]
        assert summary.startswith("done: 4096 steps") and "solved" not in summary, summary


def test_smoke_run_logs_every_key_saves_a_checkpoint_and_tracks_with_wandb(run_script):
    result = run_script(SCRIPT, *TINY, "--track")
    assert result.returncode == 0, result.describe()
    for key in (
        "charts/episodic_return", "charts/episodic_length", "charts/learning_rate", "charts/SPS",
        "losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/approx_kl",
        "losses/old_approx_kl", "losses/clipfrac", "losses/explained_variance", "losses/ratio_mean",
        "losses/ratio_max", "eval/episodic_return",
    ):  # fmt: skip
        assert key in result.scalars, f"{key} not logged"
    # Episodes of CartPole give +1 per step: the logged return is the length, always >= 8 or so.
    assert all(
        r == length
        for r, length in zip(
            result.values("charts/episodic_return"),
            result.values("charts/episodic_length"),
            strict=True,
        )
    )
    assert result.steps("charts/SPS")[-1] == 1024
    assert result.steps("charts/solved_check_min_return") == [1024]  # one check, at its frequency
    assert len(result.values("eval/episodic_return")) == 2
    (checkpoint,) = result.checkpoints()
    state = torch.load(checkpoint, weights_only=True)
    assert state["kind"] == "ppo-discrete-mlp/3" and "script" not in state
    assert state["env_id"] == "CartPole-v1" and state["global_step"] == 1024
    assert result.stdout.strip().splitlines()[-1].startswith("done: 1024 steps")
    # W&B: grouped by the experiment name, with the args as config.
    (wandb_run,) = read_wandb_runs(result.workdir)
    assert wandb_run.name == checkpoint.parent.name and wandb_run.group == "ppo_cartpole"
    assert wandb_run.config["seed"] == 1 and wandb_run.config["env_id"] == "CartPole-v1"
    assert wandb_run.config["num_envs"] == 4 and wandb_run.config["num_steps"] == 64


def test_same_seed_gives_identical_logged_numbers(tmp_path):
    first = run_script_in(tmp_path / "a", SCRIPT, *TINY, "--no-save-model")
    second = run_script_in(tmp_path / "b", SCRIPT, *TINY, "--no-save-model")
    assert first.returncode == 0 and second.returncode == 0, first.describe() + second.describe()
    for key in (
        "charts/episodic_return",
        "losses/policy_loss",
        "losses/value_loss",
        "eval/episodic_return",
    ):
        assert first.scalars[key] == second.scalars[key], key
    third = run_script_in(tmp_path / "c", SCRIPT, *TINY, "--no-save-model", "--seed", "2")
    assert third.scalars["losses/policy_loss"] != first.scalars["losses/policy_loss"]


def test_checkpoint_alone_evaluates_and_resumes_with_its_own_settings(
    run_script, tmp_path, monkeypatch, capsys
):
    """Defects 3 and 9: train with non-default settings, then give only the checkpoint's path."""
    trained = run_script(
        SCRIPT, "--seed", "9", "--total-timesteps", "512", "--num-envs", "2", "--num-steps", "64",
        "--hidden-size", "32", "--eval-episodes", "3",
    )  # fmt: skip
    assert trained.returncode == 0, trained.describe()
    (checkpoint,) = trained.checkpoints()
    final_figures = eval_figures(trained.stdout)
    assert final_figures[2] == "3"

    # The same figures as the end of training: the same network, weights and evaluation seed.
    evaluated = run_script(SCRIPT, "--eval-checkpoint", checkpoint, "--capture-video")
    assert evaluated.returncode == 0, evaluated.describe()
    assert eval_figures(evaluated.stdout) == final_figures
    assert len(list((evaluated.workdir / "videos").rglob("*.mp4"))) == 3

    # A renamed copy of the script still loads the checkpoint: it is identified by its kind.
    renamed = tmp_path / "elsewhere" / "other_name.py"
    renamed.parent.mkdir()
    shutil.copy(ROOT / SCRIPT, renamed)
    evaluated_by_copy = run_script(renamed, "--eval-checkpoint", checkpoint)
    assert evaluated_by_copy.returncode == 0, evaluated_by_copy.describe()
    assert eval_figures(evaluated_by_copy.stdout) == final_figures

    # --resume PATH with only safe flags continues the run: seed 9, 2 envs, 32 hidden units.
    resumed = run_script(
        SCRIPT, "--resume", checkpoint, "--total-timesteps", "1024", "--track", "--wandb-group", "g"
    )
    assert resumed.returncode == 0, resumed.describe()
    assert resumed.checkpoints() == [checkpoint]  # same run folder, same file
    state = torch.load(checkpoint, weights_only=True)
    assert state["global_step"] == 1024
    assert (state["args"]["seed"], state["args"]["num_envs"], state["args"]["hidden_size"]) == (
        9,
        2,
        32,
    )
    # Logged every 256 steps (two iterations of 128): 256 and 512 first, 768 and 1024 resumed.
    assert resumed.steps("charts/SPS") == [256, 512, 768, 1024]
    (wandb_run,) = read_wandb_runs(resumed.workdir)
    assert (
        wandb_run.group == "g"
        and wandb_run.config["seed"] == 9
        and wandb_run.config["num_envs"] == 2
    )

    # An explicit flag against the checkpoint's setting is refused in one line.
    monkeypatch.chdir(tmp_path)
    refused = {
        ("--resume", "--num-envs", "4"): "--num-envs is 4 but the checkpoint was trained with 2",
        ("--resume", "--seed", "1"): "--seed is 1 but the checkpoint was trained with 9",
        (
            "--eval-checkpoint",
            "--hidden-size",
            "64",
        ): "--hidden-size is 64 but the checkpoint was trained with 32",
        (
            "--eval-checkpoint",
            "--env-id",
            "Acrobot-v1",
        ): "--env-id is 'Acrobot-v1' but the checkpoint",
    }
    for (flag, *argv), message in refused.items():
        code, lines = run_in_process(capsys, flag, checkpoint, *argv)
        assert (
            code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
        ), lines


def test_resume_of_a_folder_continues_from_its_newest_checkpoint_and_says_which(in_tmp, capsys):
    main_in_process(*TINY, "--checkpoint-freq", "256", "--total-timesteps", "768")
    (folder,) = in_tmp.glob("runs/*/checkpoints")
    newest = max(folder.glob("*.pt"))  # named by step
    assert torch.load(newest, weights_only=True)["global_step"] == 768
    capsys.readouterr()
    main_in_process("--resume", folder, "--total-timesteps", "1024")
    err = capsys.readouterr().err
    assert f"note: resuming from {newest}, the newest checkpoint in {folder}" in err, err
    (checkpoint,) = in_tmp.glob("runs/*/ppo_cartpole.pt")
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 1024
    # A folder with no checkpoint in it is refused in one line.
    (in_tmp / "empty").mkdir()
    code, lines = run_in_process(capsys, "--resume", in_tmp / "empty")
    assert code == 2 and lines == [
        f"error: {in_tmp / 'empty'} holds no checkpoints (*.pt) to resume from"
    ], lines


def test_resume_restores_weights_optimizer_and_schedule_exactly(in_tmp, capsys):
    main_in_process(*TINY)
    (checkpoint,) = in_tmp.glob("runs/*/ppo_cartpole.pt")
    saved = in_tmp / "saved.pt"
    shutil.copy(checkpoint, saved)

    # A budget equal to the saved step: nothing is trained, and the final checkpoint (written to the
    # run's own file) holds the state as restored.
    main_in_process("--resume", saved, "--total-timesteps", "1024")
    before = torch.load(saved, weights_only=True)
    after = torch.load(checkpoint, weights_only=True)
    assert after["global_step"] == before["global_step"] == 1024
    assert after["model"].keys() == before["model"].keys()
    for name, tensor in before["model"].items():
        assert torch.equal(after["model"][name], tensor), name
    # The learning rate of the last iteration, and Adam's moments and step counts.
    after_lr, before_lr = (state["optimizer"]["param_groups"][0]["lr"] for state in (after, before))
    assert (
        after_lr
        == before_lr
        == ppo_cartpole.linear_schedule(ppo_cartpole.Args().learning_rate, 4, 4)
        > 0
    )
    assert len(before["optimizer"]["state"]) == 12
    for index, moments in before["optimizer"]["state"].items():
        assert float(moments["step"]) == 40  # 4 updates x 10 epochs
        for key in "step", "exp_avg", "exp_avg_sq":
            assert torch.equal(after["optimizer"]["state"][index][key], moments[key]), (key, index)

    # And on to the end of a longer budget, at the step an uninterrupted run ends.
    main_in_process("--resume", saved, "--total-timesteps", "2048")
    state = torch.load(checkpoint, weights_only=True)
    assert state["global_step"] == 2048
    assert read_scalars(in_tmp / "runs")["charts/SPS"][-1][0] == 2048


def test_log_interval_counts_environment_steps_and_torch_threads_are_set(in_tmp):
    main_in_process(*TINY, "--no-save-model", "--log-interval", "512", "--torch-threads", "2")
    scalars = read_scalars(in_tmp / "runs")
    assert [step for step, _ in scalars["losses/policy_loss"]] == [512, 1024]
    assert [step for step, _ in scalars["charts/SPS"]] == [512, 1024]
    assert torch.get_num_threads() == 2


def test_tiny_rollouts_with_more_minibatches_than_samples_train(in_tmp, capsys):
    """Defect 5: one env, 4 steps, 4 minibatches of one; the autoreset steps leave one empty."""
    main_in_process(
        "--num-envs", "1", "--num-steps", "4", "--num-minibatches", "4", "--total-timesteps", "200",
        "--eval-episodes", "1", "--no-save-model",
    )  # fmt: skip
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("done: 200 steps")
    assert not list(in_tmp.rglob("*_nan.pt"))


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_stop_signal_saves_a_checkpoint_that_resumes(run_script, signum, code):
    """Ctrl-C, and SIGTERM as job schedulers, `timeout` and `docker stop` send it (defect 8)."""
    budget = (
        "--total-timesteps",
        "400000",
        *SHAPE,
        "--checkpoint-freq",
        "1024",
        "--eval-episodes",
        "1",
    )

    def first_checkpoint_written(workdir):
        return any(workdir.glob("runs/*/ppo_cartpole.pt"))

    interrupted = run_script(
        SCRIPT, *budget, interrupt_when=first_checkpoint_written, interrupt_signals=(signum,)
    )
    assert interrupted.returncode == code, interrupted.describe()
    assert "interrupted at step" in interrupted.stderr and "Traceback" not in interrupted.stderr
    checkpoint = next(path for path in interrupted.checkpoints() if path.name == "ppo_cartpole.pt")
    step = torch.load(checkpoint, weights_only=True)["global_step"]
    assert 0 < step < 400_000
    # The periodic checkpoints are also kept, each named by its step; the interrupted state is not.
    kept = checkpoint.parent / "checkpoints" / "ppo_cartpole_000000001024.pt"
    assert torch.load(kept, weights_only=True)["global_step"] == 1024
    kept_steps = [int(path.stem.rsplit("_", 1)[1]) for path in kept.parent.glob("*.pt")]
    assert all(kept_step % 1024 == 0 for kept_step in kept_steps), kept_steps

    resumed = run_script(SCRIPT, "--resume", checkpoint, "--total-timesteps", str(step + 512))
    assert resumed.returncode == 0, resumed.describe()
    assert torch.load(checkpoint, weights_only=True)["global_step"] == step + 512
    # A run that ends its budget keeps its trained agent with the others.
    final = kept.parent / f"ppo_cartpole_{step + 512:012d}.pt"
    assert torch.load(final, weights_only=True)["global_step"] == step + 512


def test_a_second_signal_aborts_at_once(run_script):
    # Iterations of 16k steps: the second signal, 0.2 s after the first, arrives mid-iteration.
    def run_started(workdir):
        return any(workdir.glob("runs/*/events.out.tfevents.*"))

    result = run_script(
        SCRIPT, "--total-timesteps", "400000", "--num-envs", "4", "--num-steps", "4096",
        interrupt_when=run_started, interrupt_signals=(signal.SIGINT, signal.SIGINT),
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

    def evaluation_started(workdir):  # its first video is written: the evaluation is under way
        return any(workdir.glob("videos/*/eval/*.mp4"))

    # Thirty recorded episodes take seconds: the signal lands while they play.
    result = run_script(
        SCRIPT, *TINY[:-2], "--eval-episodes", "30", "--capture-video", "--checkpoint-freq", "0",
        interrupt_when=evaluation_started, interrupt_signals=(signum,),
    )  # fmt: skip
    assert result.returncode == code, result.describe()
    name = signal.Signals(signum).name
    assert f"{name}: the final evaluation was stopped at step 1024" in result.stderr
    assert "Traceback" not in result.stderr and "done:" not in result.stdout
    (checkpoint,) = result.checkpoints()
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 1024


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_whose_interrupt_was_swallowed_still_ends_the_run(in_tmp, capsys, signum, code):
    """Python drops an exception raised inside a garbage collector's callback (JAX registers one):
    the evaluation then returns as if no signal had come, and finish must still exit 128 + n."""
    run = ppo_cartpole.Run(ppo_cartpole.Args(save_model=False), total_steps=64)

    def final_evaluation(video_folder):
        with contextlib.suppress(KeyboardInterrupt):  # lost, as inside a gc callback
            os.kill(os.getpid(), signum)
        return {"eval/episodic_return": np.zeros(2)}, "evaluated"

    with pytest.raises(SystemExit) as exit_info:
        run.finish({}, 64, final_evaluation)
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    name = signal.Signals(signum).name
    assert f"{name}: the final evaluation was stopped at step 64" in err, err


def test_a_resumed_run_records_its_evaluation_into_a_folder_of_its_own(run_script):
    first = run_script(SCRIPT, *TINY, "--capture-video")
    assert first.returncode == 0, first.describe()
    (checkpoint,) = first.checkpoints()
    resumed = run_script(SCRIPT, "--resume", checkpoint, "--total-timesteps", "2048")
    assert resumed.returncode == 0, resumed.describe()
    assert "Overwriting" not in resumed.stderr, resumed.stderr
    videos = resumed.workdir / "videos" / checkpoint.parent.name
    assert len(list((videos / "eval").glob("*.mp4"))) == 2
    assert len(list((videos / "eval-step-2048").glob("*.mp4"))) == 2


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
    path = tmp_path / "run" / "agent.pt"
    ppo_cartpole.save_checkpoint(path, {"step": 1})
    once = [("fsync", "agent.pt.tmp"), ("replace", "agent.pt"), ("fsync", "run")]
    assert events == [("fsync", tmp_path.name), *once]
    events.clear()
    ppo_cartpole.save_checkpoint(path, {"step": 1})  # into the folder that is there now
    assert events == once
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in path.parent.iterdir()] == ["agent.pt"]


def test_on_windows_a_run_saves_its_checkpoints_and_installs_its_stop_signals(in_tmp, monkeypatch):
    """Windows cannot open a folder as a file (os.open raises PermissionError), so its entries
    cannot be synced: the run saves all the same, and Ctrl-C / SIGTERM still stop it cleanly."""
    real_open = os.open

    def windows_open(path, flags, *args, **kwargs):
        if os.path.isdir(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", windows_open)
    main_in_process(*TINY, "--checkpoint-freq", "512")
    (checkpoint,) = in_tmp.glob("runs/*/ppo_cartpole.pt")
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 1024
    assert len(list(in_tmp.glob("runs/*/checkpoints/*.pt"))) == 2
    for signum in (signal.SIGINT, signal.SIGTERM):
        assert signal.getsignal(signum).__func__ is ppo_cartpole.Run._on_signal


def test_a_checkpoint_of_the_previous_kind_evaluates_but_does_not_resume(in_tmp, capsys):
    """ppo-discrete-mlp/2 held the same network with a hand-written Adam's state."""
    main_in_process(*TINY)
    (checkpoint,) = in_tmp.glob("runs/*/ppo_cartpole.pt")
    figures = eval_figures(capsys.readouterr().out)
    state = torch.load(checkpoint, weights_only=True)
    old = in_tmp / "old.pt"
    torch.save({**state, "kind": "ppo-discrete-mlp/2", "optimizer": {"lr": 0.0}}, old)
    main_in_process("--eval-checkpoint", old)
    assert eval_figures(capsys.readouterr().out) == figures
    code, lines = run_in_process(capsys, "--resume", old)
    assert code == 2 and len(lines) == 1, lines
    assert (
        "holds a ppo-discrete-mlp/2 checkpoint" in lines[0]
        and "can evaluate (--eval-checkpoint) but not resume" in lines[0]
    )


def test_a_folder_of_kept_checkpoints_evaluates_into_a_curve(in_tmp, capsys):
    """--eval-checkpoint FOLDER: every kept checkpoint in step order, each with the figures that
    --eval-checkpoint gives it alone, and the random policy on the same episodes."""
    main_in_process(*TINY[2:], "--total-timesteps", "768", "--checkpoint-freq", "256")
    capsys.readouterr()
    (folder,) = in_tmp.glob("runs/*/checkpoints")
    kept = sorted(folder.glob("*.pt"))
    assert len(kept) == 3
    alone = []
    for path in kept:
        main_in_process("--eval-checkpoint", path)
        alone.append(eval_figures(capsys.readouterr().out))
    main_in_process("--eval-checkpoint", folder)
    rows = [line.split(",") for line in (folder / "eval_curve.csv").read_text().splitlines()]
    assert rows[0] == ["step", "mean", "std", "min", "max", "episodes"]
    assert [row[0] for row in rows[1:]] == ["-1", "256", "512", "768"]
    for row, (mean, std, episodes) in zip(rows[2:], alone, strict=True):
        assert (f"{float(row[1]):.2f}", f"{float(row[2]):.2f}", row[5]) == (mean, std, episodes)
    assert (folder / "eval_curve.png").stat().st_size > 0
    # The random policy plays the same episodes, with random actions: not one fixed action.
    random_returns = ppo_cartpole.evaluate(None, "CartPole-v1", 20, 3, torch.device("cpu"))
    one_action = ppo_cartpole.evaluate(
        ppo_cartpole.Agent(4, 2), "CartPole-v1", 20, 3, torch.device("cpu")
    )
    assert random_returns.std() > 0 and not np.array_equal(random_returns, one_action)

    # Bad input: an empty folder, and a folder of another script's checkpoints.
    (in_tmp / "empty").mkdir()
    code, lines = run_in_process(capsys, "--eval-checkpoint", in_tmp / "empty")
    assert code == 2 and len(lines) == 1 and "holds no checkpoints" in lines[0], lines
    (in_tmp / "other").mkdir()
    torch.save({"kind": "dqn/3", "args": {}}, in_tmp / "other" / "x.pt")
    code, lines = run_in_process(capsys, "--eval-checkpoint", in_tmp / "other")
    assert code == 2 and len(lines) == 1 and "holds a dqn/3 checkpoint" in lines[0], lines


def test_any_discrete_env_works_through_the_sync_vector_env(in_tmp):
    main_in_process("--env-id", "Acrobot-v1", *TINY, "--no-save-model")
    assert len(read_scalars(in_tmp / "runs")["eval/episodic_return"]) == 2


def test_non_finite_loss_stops_with_a_saved_state(in_tmp, capsys):
    code, lines = run_in_process(
        capsys, *TINY, "--learning-rate", "1e30", "--no-anneal-lr", "--max-grad-norm", "1e30"
    )
    assert code == 1 and "loss became non-finite at step" in lines[-1], lines
    assert list(in_tmp.glob("runs/*/ppo_cartpole_nan.pt"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--env-id", "Pendulum-v1"), "needs Discrete"),
        (("--env-id", "NoSuchEnv-v0"), "unknown environment id"),
        (("--env-id", "CartPol-v1"), "did you mean CartPole-v1"),
        (("--env-id", "Taxi-v4"), "needs a 1-D Box"),
        (("--num-minibatches", "7"), "does not divide"),
        (("--total-timesteps", "0"), "must be positive"),
        (("--num-envs", "-1"), "must be positive"),
        (("--torch-threads", "0"), "must be positive"),
        (("--log-interval", "-1"), "must be >= 0"),
        (("--gamma", "1.5"), "[0, 1]"),
        (("--gae-lambda", "-0.1"), "[0, 1]"),
        (("--learning-rate", "0"), "must be positive"),
        (("--eval-episodes", "0"), "must be positive"),
        (("--solved-check-freq", "0"), "must be positive"),
        (("--resume", "missing.pt"), "does not exist"),
        (("--eval-checkpoint", "missing.pt"), "does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_line(in_tmp, capsys, args, message):
    code, lines = run_in_process(capsys, *args)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (in_tmp / "runs").exists()


def test_bad_input_through_the_real_command_line(run_script):
    result = run_script(SCRIPT, "--env-id", "Pendulum-v1")
    assert result.returncode == 2, result.describe()
    assert (
        result.stderr.strip()
        == "error: Pendulum-v1 has a Box action space; this script needs Discrete"
    )


@pytest.mark.parametrize("flag", ["--resume", "--eval-checkpoint"])
def test_bad_checkpoints_exit_2_with_one_line(in_tmp, capsys, flag):
    def saved(name, **overrides):
        state = {
            "kind": "ppo-discrete-mlp/3", "env_id": "CartPole-v1", "run_name": "x",
            "args": {"env_id": "CartPole-v1"}, "model": ppo_cartpole.Agent(4, 2).state_dict(),
            **overrides,
        }  # fmt: skip
        torch.save({key: value for key, value in state.items() if value is not None}, in_tmp / name)
        return name

    data = (in_tmp / saved("whole.pt")).read_bytes()
    (in_tmp / "truncated.pt").write_bytes(data[: len(data) // 2])
    (in_tmp / "text.pt").write_text("not a checkpoint")
    torch.save([1, 2, 3], in_tmp / "list.pt")
    cases = {
        ("truncated.pt",): "not a readable checkpoint",
        ("text.pt",): "not a readable checkpoint",
        ("list.pt",): "not a checkpoint of this project",
        (saved("old.pt", kind=None, script="ppo_cartpole"),): "not a checkpoint of this project",
        (
            saved("other.pt", kind="dqn/1"),
        ): "holds a dqn/1 checkpoint; this script trains ppo-discrete-mlp/3",
        (saved("acrobot.pt", args={"env_id": "Acrobot-v1"}), "--env-id", "CartPole-v1"): (
            "--env-id is 'CartPole-v1' but the checkpoint was trained with 'Acrobot-v1'"
        ),
    }
    for (name, *argv), message in cases.items():
        code, lines = run_in_process(capsys, flag, str(in_tmp / name), *argv)
        assert code == 2, name
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (
            name,
            lines,
        )
    assert not (in_tmp / "runs").exists()


# --- learning --------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_args_solve_cartpole(run_script):
    """Default args, seed 1: the greedy policy must average >= 475 of 500, and stop early for it."""
    result = run_script(SCRIPT, "--eval-episodes", "20", "--no-save-model")
    assert result.returncode == 0, result.describe()
    eval_returns = result.values("eval/episodic_return")
    assert len(eval_returns) == 20
    assert np.mean(eval_returns) >= 475, eval_returns
    # It stopped once the greedy policy was solved, well before the budget.
    solved_at = int(re.search(r"solved at step (\d+);", result.stdout).group(1))
    assert solved_at < ppo_cartpole.Args().total_timesteps // 2


def test_training_resume_and_evaluation_copy_device_tensors_to_the_host(
    tensors_as_if_on_a_gpu, in_tmp
):
    """On a GPU every tensor that reaches NumPy must go through .cpu(); the guard makes the CPU
    refuse the same conversions, so a forgotten copy fails here rather than on a GPU machine."""
    ppo_cartpole.main(
        ppo_cartpole.parse_args([*TINY, "--checkpoint-freq", "512", "--capture-video"])
    )
    (checkpoint,) = (in_tmp / "runs").glob("*/ppo_cartpole.pt")
    ppo_cartpole.main(
        ppo_cartpole.parse_args(["--resume", str(checkpoint), "--total-timesteps", "2048"])
    )
    ppo_cartpole.main(ppo_cartpole.parse_args(["--eval-checkpoint", str(checkpoint)]))
