"""Tests of ppo_cartpole.py: pure parts against slow references, then the real CLI end to end."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import tyro
from conftest import ROOT

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
    episode or the rollout, where delta_j = r_j + gamma * V(obs_{j+1}) * [not terminated_j] - V(obs_j).
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

    truncated_adv, _ = ppo_cartpole.compute_gae(rewards, values, torch.zeros_like(ended), ended, gamma, lam)
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


# --- the CLI ---------------------------------------------------------------------------------


def test_smoke_run_logs_every_key_and_saves_a_checkpoint(run_script):
    result = run_script(SCRIPT, *TINY)
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
    assert len(result.values("eval/episodic_return")) == 2
    (checkpoint,) = result.checkpoints()
    state = torch.load(checkpoint, weights_only=True)
    assert (
        state["script"] == "ppo_cartpole"
        and state["env_id"] == "CartPole-v1"
        and state["global_step"] == 1024
    )
    assert result.stdout.strip().splitlines()[-1].startswith("done: 1024 steps")


def test_same_seed_gives_identical_logged_numbers(tmp_path):
    from conftest import run_script_in

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


def test_eval_checkpoint_evaluates_the_saved_policy(run_script):
    trained = run_script(SCRIPT, *TINY)
    assert trained.returncode == 0, trained.describe()
    (checkpoint,) = trained.checkpoints()
    evaluated = run_script(
        SCRIPT, "--eval-checkpoint", str(checkpoint), "--eval-episodes", "3", "--capture-video"
    )
    assert evaluated.returncode == 0, evaluated.describe()
    line = evaluated.stdout.strip().splitlines()[-1]
    assert line.startswith("eval: return ") and "over 3 episodes" in line
    assert len(list((evaluated.workdir / "videos").rglob("*.mp4"))) == 3


def test_resume_continues_to_the_same_final_step(run_script):
    first = run_script(SCRIPT, *TINY)
    assert first.returncode == 0, first.describe()
    (checkpoint,) = first.checkpoints()
    changed = run_script(
        SCRIPT,
        "--total-timesteps",
        "2048",
        "--num-envs",
        "4",
        "--num-steps",
        "32",
        "--resume",
        str(checkpoint),
    )
    assert (
        changed.returncode == 2
        and "--num-steps is 32 but the checkpoint was trained with 64" in changed.stderr
    )

    resumed = run_script(SCRIPT, "--total-timesteps", "2048", *SHAPE, "--resume", str(checkpoint))
    assert resumed.returncode == 0, resumed.describe()
    assert resumed.checkpoints() == [checkpoint]  # same run folder, same file
    state = torch.load(checkpoint, weights_only=True)
    assert state["global_step"] == 2048 and state["iteration"] == 8
    sps_steps = resumed.steps("charts/SPS")
    assert sps_steps == list(range(256, 2049, 256))  # 1..4 from the first run, 5..8 resumed


def test_ctrl_c_saves_a_checkpoint_that_resumes_to_the_full_budget(run_script):
    budget = ("--total-timesteps", "16384", *SHAPE, "--checkpoint-freq", "1024", "--eval-episodes", "1")

    def first_checkpoint_written(workdir):
        return any(workdir.glob("runs/*/ppo_cartpole.pt"))

    interrupted = run_script(SCRIPT, *budget, interrupt_when=first_checkpoint_written)
    assert interrupted.returncode == 130, interrupted.describe()
    assert "interrupted at step" in interrupted.stderr and "Traceback" not in interrupted.stderr
    (checkpoint,) = interrupted.checkpoints()
    step = torch.load(checkpoint, weights_only=True)["global_step"]
    assert 0 < step < 16384, "the run finished before Ctrl-C: make the budget larger"

    resumed = run_script(SCRIPT, *budget, "--resume", str(checkpoint))
    assert resumed.returncode == 0, resumed.describe()
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 16384


def test_track_writes_an_offline_wandb_run(run_script):
    result = run_script(SCRIPT, *TINY, "--track", "--no-save-model")
    assert result.returncode == 0, result.describe()
    assert list((result.workdir / "wandb").glob("offline-run-*")), "no offline W&B run"


def test_any_discrete_env_works_through_the_sync_vector_env(run_script):
    result = run_script(SCRIPT, "--env-id", "Acrobot-v1", *TINY, "--no-save-model")
    assert result.returncode == 0, result.describe()
    assert result.values("eval/episodic_return")


def test_non_finite_loss_stops_with_a_saved_state(run_script):
    result = run_script(SCRIPT, *TINY, "--learning-rate", "1e30", "--no-anneal-lr", "--max-grad-norm", "1e30")
    assert result.returncode == 1, result.describe()
    assert "loss became non-finite at step" in result.stderr
    assert result.checkpoints("*_nan.pt")


def run_in_process(capsys, *argv: str) -> tuple[int, list[str]]:
    """Parse `argv` with the script's real tyro parser and run main; return (exit code, stderr lines).

    Bad input must be rejected before any heavy work, so these cases run in-process: the same
    code path as the command line without paying an interpreter start per case.
    """
    with pytest.raises(SystemExit) as exit_info:
        ppo_cartpole.main(tyro.cli(ppo_cartpole.Args, args=list(argv)))
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


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
        (("--gamma", "1.5"), "[0, 1]"),
        (("--gae-lambda", "-0.1"), "[0, 1]"),
        (("--learning-rate", "0"), "must be positive"),
        (("--eval-episodes", "0"), "must be positive"),
        (("--resume", "missing.pt"), "does not exist"),
        (("--eval-checkpoint", "missing.pt"), "does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, args, message):
    code, lines = run_in_process(capsys, *args)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_bad_input_through_the_real_command_line(run_script):
    result = run_script(SCRIPT, "--env-id", "Pendulum-v1")
    assert result.returncode == 2, result.describe()
    assert result.stderr.strip() == "error: Pendulum-v1 has a Box action space; this script needs Discrete"


@pytest.mark.parametrize("flag", ["--resume", "--eval-checkpoint"])
def test_bad_checkpoints_exit_2_with_one_line(capsys, tmp_path, flag):
    def saved(name, **overrides):
        state = {
            "script": "ppo_cartpole", "env_id": "CartPole-v1", "run_name": "x", "args": {},
            "model": ppo_cartpole.Agent(4, 2).state_dict(), **overrides,
        }  # fmt: skip
        torch.save(state, tmp_path / name)
        return name

    data = (tmp_path / saved("whole.pt")).read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    cases = {
        "truncated.pt": "not a readable checkpoint",
        "text.pt": "not a readable checkpoint",
        "list.pt": "not a checkpoint of this project",
        saved("other.pt", script="dqn_flappy"): "saved by dqn_flappy.py",
        saved("acrobot.pt", env_id="Acrobot-v1"): "pass --env-id Acrobot-v1",
    }
    for name, message in cases.items():
        code, lines = run_in_process(capsys, flag, str(tmp_path / name))
        assert code == 2, name
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (name, lines)


# --- learning --------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_args_solve_cartpole(run_script):
    """Default args, seed 1, the default budget: the greedy policy must average >= 475 of 500."""
    result = run_script(SCRIPT, "--eval-episodes", "20", "--no-save-model")
    assert result.returncode == 0, result.describe()
    eval_returns = result.values("eval/episodic_return")
    assert len(eval_returns) == 20
    assert np.mean(eval_returns) >= 475, eval_returns
