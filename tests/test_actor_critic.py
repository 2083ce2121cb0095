"""Tests of actor_critic.py: its pure parts against slow references, and its real command line."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
import tyro
from conftest import ROOT

sys.path.insert(0, str(ROOT))
import actor_critic  # noqa: E402

SCRIPT = "actor_critic.py"
TINY = ("--total-timesteps", "512", "--eval-episodes", "2", "--checkpoint-freq", "0")


# ---------------------------------------------------------------------------------------------
# Pure parts against slow, obviously-correct references
# ---------------------------------------------------------------------------------------------


def slow_gae(rewards, values, terminated, ended, gamma, lam):
    """Per env and step: sum of (gamma * lam)^k * delta_{t+k} until the episode or rollout ends.

    delta_t = r_t + gamma * V(next obs) * (not terminated) - V(obs); a truncated step still
    bootstraps from the value of the observation that follows it (the final observation).
    """
    num_steps, num_envs = len(rewards), len(rewards[0])
    advantages = [[0.0] * num_envs for _ in range(num_steps)]
    for env in range(num_envs):
        for t in range(num_steps):
            total, weight = 0.0, 1.0
            for k in range(t, num_steps):
                bootstrap = 0.0 if terminated[k][env] else gamma * values[k + 1][env]
                total += weight * (rewards[k][env] + bootstrap - values[k][env])
                if ended[k][env]:
                    break
                weight *= gamma * lam
            advantages[t][env] = total
    return advantages


def slow_nstep_returns(rewards, values, terminated, ended, gamma):
    """The classic A2C target: discounted rewards to the episode's or the rollout's end, plus the
    discounted value of the observation where it stopped (0 after a termination)."""
    num_steps, num_envs = len(rewards), len(rewards[0])
    returns = [[0.0] * num_envs for _ in range(num_steps)]
    for env in range(num_envs):
        for t in range(num_steps):
            total, discount, k = 0.0, 1.0, t
            while True:
                total += discount * rewards[k][env]
                discount *= gamma
                if terminated[k][env]:
                    break
                if ended[k][env] or k == num_steps - 1:
                    total += discount * values[k + 1][env]
                    break
                k += 1
            returns[t][env] = total
    return returns


# A rollout of 7 steps over 3 envs with every kind of step next-step autoreset produces:
# env 0 terminates at step 2, so step 3 is its autoreset step (reward 0, reset observation);
# env 1 is truncated at step 4 (bootstraps from V(final obs) = values[5]), autoreset at step 5;
# env 2 never ends inside the rollout (bootstraps from values[7] at the end).
REWARDS = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.5], [1.0, 1.0, 1.0], [0.0, 1.0, 2.0],
           [1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, -1.0]]  # fmt: skip
TERMINATED = [[0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]]
ENDED = [[0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 0]]
VALUES = [[0.5, 2.0, 1.0], [0.7, 2.5, -1.0], [0.2, 3.0, 0.0], [9.0, 3.5, 1.5],
          [1.1, 4.0, 2.0], [1.3, 7.0, 0.3], [1.5, 0.1, 0.9], [1.7, 0.2, 4.0]]  # fmt: skip


def rollout_tensors():
    return (
        torch.tensor(REWARDS),
        torch.tensor(VALUES),
        torch.tensor(TERMINATED, dtype=torch.bool),
        torch.tensor(ENDED, dtype=torch.bool),
    )


# Step 3 of env 0 and step 5 of env 1 are autoreset steps: the script drops them from the update,
# so their (meaningless) advantages are not compared.
VALID = [[t != 3, t != 5, True] for t in range(7)]


@pytest.mark.parametrize(("gamma", "lam"), [(0.99, 0.95), (0.9, 0.0), (0.98, 0.8), (1.0, 1.0)])
def test_compute_gae_matches_slow_reference(gamma, lam):
    rewards, values, terminated, ended = rollout_tensors()
    advantages, returns = actor_critic.compute_gae(rewards, values, terminated, ended, gamma, lam)
    expected = slow_gae(REWARDS, VALUES, TERMINATED, ENDED, gamma, lam)
    for t in range(7):
        for env in range(3):
            if VALID[t][env]:
                assert advantages[t, env].item() == pytest.approx(expected[t][env], abs=1e-5), (
                    t,
                    env,
                )
                assert returns[t, env].item() == pytest.approx(expected[t][env] + VALUES[t][env], abs=1e-5)


@pytest.mark.parametrize("gamma", [0.99, 0.9])
def test_lambda_one_gives_nstep_returns(gamma):
    rewards, values, terminated, ended = rollout_tensors()
    _, returns = actor_critic.compute_gae(rewards, values, terminated, ended, gamma, 1.0)
    expected = slow_nstep_returns(REWARDS, VALUES, TERMINATED, ENDED, gamma)
    for t in range(7):
        for env in range(3):
            if VALID[t][env]:
                assert returns[t, env].item() == pytest.approx(expected[t][env], abs=1e-5), (t, env)


def test_episode_boundaries_and_bootstrapping_by_hand():
    rewards, values, terminated, ended = rollout_tensors()
    advantages, returns = actor_critic.compute_gae(rewards, values, terminated, ended, 0.9, 1.0)
    # Termination: no bootstrap, and the autoreset step's huge V = 9.0 must not leak back.
    assert returns[2, 0].item() == pytest.approx(1.0)
    # Truncation: bootstrap from V(final obs) = values[5][1] = 7.0, not from the reset state.
    assert returns[4, 1].item() == pytest.approx(1.0 + 0.9 * 7.0)
    # Rollout end: bootstrap from the value after the last step.
    assert returns[6, 2].item() == pytest.approx(-1.0 + 0.9 * 4.0)


def test_a2c_loss_matches_hand_computation():
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, 0.0], [0.0, 0.0]])
    actions = torch.tensor([1, 0, 1])
    advantages = torch.tensor([2.0, -1.0, 0.5])
    values = torch.tensor([1.0, 0.0, 3.0])
    returns = torch.tensor([2.0, -2.0, 3.0])
    policy_loss, value_loss, entropy = actor_critic.a2c_loss(logits, actions, advantages, values, returns)

    probs = [[0.25, 0.75], [math.exp(2) / (1 + math.exp(2)), 1 / (1 + math.exp(2))], [0.5, 0.5]]
    chosen = [probs[0][1], probs[1][0], probs[2][1]]
    expected_policy = -sum(a * math.log(p) for a, p in zip([2.0, -1.0, 0.5], chosen, strict=True)) / 3
    expected_value = 0.5 * (1.0 + 4.0 + 0.0) / 3
    expected_entropy = -sum(p * math.log(p) for row in probs for p in row) / 3
    assert policy_loss.item() == pytest.approx(expected_policy, rel=1e-5)
    assert value_loss.item() == pytest.approx(expected_value, rel=1e-5)
    assert entropy.item() == pytest.approx(expected_entropy, rel=1e-5)


def test_policy_loss_gradient_does_not_reach_the_critic():
    agent = actor_critic.Agent(4, 2, 16)
    obs = torch.randn(5, 4)
    logits, values = agent(obs)
    advantages = torch.randn(5)
    policy_loss, _, _ = actor_critic.a2c_loss(
        logits, torch.tensor([0, 1, 0, 1, 1]), advantages, values, values.detach()
    )
    policy_loss.backward()
    assert agent.critic.weight.grad is None or agent.critic.weight.grad.abs().sum() == 0
    assert agent.actor.weight.grad.abs().sum() > 0
    # The trunk is shared: the policy loss shapes it too.
    assert agent.trunk[0].weight.grad.abs().sum() > 0


def test_compute_gae_matches_slow_reference_on_a_random_rollout():
    generator = np.random.default_rng(0)
    steps, envs, gamma, lam = 40, 5, 0.97, 0.9
    rewards = generator.normal(size=(steps, envs))
    values = generator.normal(size=(steps + 1, envs))
    terminated = generator.random((steps, envs)) < 0.08
    truncated = (generator.random((steps, envs)) < 0.08) & ~terminated
    terminated[steps - 1, 0], truncated[steps - 1, 1] = True, True  # boundaries at the rollout end
    ended = terminated | truncated
    rewards[1:][ended[:-1]] = 0.0  # the autoreset step's reward, as gymnasium returns it
    advantages, returns = actor_critic.compute_gae(
        torch.tensor(rewards), torch.tensor(values), torch.tensor(terminated), torch.tensor(ended), gamma, lam
    )
    expected = np.array(
        slow_gae(rewards.tolist(), values.tolist(), terminated.tolist(), ended.tolist(), gamma, lam)
    )
    real_steps = np.ones((steps, envs), dtype=bool)
    real_steps[1:] = ~ended[:-1]
    np.testing.assert_allclose(advantages.numpy()[real_steps], expected[real_steps], rtol=1e-10)
    np.testing.assert_allclose(returns.numpy(), advantages.numpy() + values[:-1], rtol=1e-10)


def test_network_initialisation_gives_near_uniform_policy_from_a_shared_trunk():
    agent = actor_critic.Agent(4, 2)
    logits, values = agent(torch.randn(256, 4))
    assert logits.shape == (256, 2) and values.shape == (256,)
    assert logits.abs().max().item() < 0.1  # the 0.01-gain policy head
    weight = agent.trunk[0].weight.detach()
    # orthogonal, gain sqrt 2
    np.testing.assert_allclose((weight.T @ weight).numpy(), 2.0 * np.eye(4), atol=1e-5)
    trunk, actor, critic = (4 * 64 + 64) + (64 * 64 + 64), 64 * 2 + 2, 64 + 1
    assert sum(p.numel() for p in agent.parameters()) == trunk + actor + critic  # one trunk, two heads


def test_linear_schedule():
    assert actor_critic.linear_schedule(1e-3, 1, 10) == pytest.approx(1e-3)
    assert actor_critic.linear_schedule(1e-3, 10, 10) == pytest.approx(1e-4)


# ---------------------------------------------------------------------------------------------
# The real command line
# ---------------------------------------------------------------------------------------------

SCALAR_KEYS = (
    "charts/episodic_return",
    "charts/episodic_length",
    "charts/learning_rate",
    "charts/SPS",
    "losses/policy_loss",
    "losses/value_loss",
    "losses/entropy",
    "losses/explained_variance",
    "eval/episodic_return",
)


def test_smoke_run_tracks_records_video_and_evaluates_its_checkpoint(run_script):
    result = run_script(SCRIPT, *TINY, "--track", "--capture-video", "--seed", "3")
    assert result.returncode == 0, result.describe()
    for key in SCALAR_KEYS:
        assert result.values(key), f"{key} not logged\n{result.describe()}"
    assert all(math.isfinite(v) for v in result.values("losses/value_loss"))
    assert "done: 512 steps in" in result.stdout, result.describe()
    assert "over 2 episodes; checkpoint" in result.stdout
    (checkpoint,) = result.checkpoints()
    assert checkpoint.name == "actor_critic.pt"
    assert list((result.workdir / "videos").rglob("*.mp4")), "no evaluation video recorded"
    assert list((result.workdir / "wandb").glob("offline-run-*")), "no offline W&B run"

    state = torch.load(checkpoint, weights_only=True)
    assert state["script"] == "actor_critic" and state["env_id"] == "CartPole-v1"
    assert state["global_step"] == 512 and state["args"]["seed"] == 3

    evaluation = run_script(SCRIPT, "--eval-checkpoint", str(checkpoint), "--eval-episodes", "3")
    assert evaluation.returncode == 0, evaluation.describe()
    assert evaluation.stdout.startswith("eval: return "), evaluation.describe()
    assert f"over 3 episodes ({checkpoint})" in evaluation.stdout


def test_rmsprop_nstep_returns_and_any_discrete_env_through_the_sync_vector_env(run_script):
    result = run_script(
        SCRIPT, *TINY, "--env-id", "Acrobot-v1", "--optimizer", "rmsprop", "--gae-lambda", "1.0", "--norm-adv"
    )
    assert result.returncode == 0, result.describe()
    assert len(result.values("eval/episodic_return")) == 2
    state = torch.load(result.checkpoints()[0], weights_only=True)
    assert state["env_id"] == "Acrobot-v1"
    assert "square_avg" in next(iter(state["optimizer"]["state"].values()))  # RMSprop's state


def test_same_seed_gives_identical_logged_numbers(run_script, tmp_path):
    from conftest import run_script_in

    args = (*TINY, "--seed", "7", "--no-save-model")
    first = run_script_in(tmp_path / "a", SCRIPT, *args)
    second = run_script_in(tmp_path / "b", SCRIPT, *args)
    assert first.returncode == 0 and second.returncode == 0, first.describe() + second.describe()
    for key in (
        "charts/episodic_return",
        "losses/policy_loss",
        "losses/value_loss",
        "eval/episodic_return",
    ):
        assert first.scalars[key] == second.scalars[key], key
    other = run_script_in(tmp_path / "c", SCRIPT, *TINY, "--seed", "8", "--no-save-model")
    assert other.scalars["losses/value_loss"] != first.scalars["losses/value_loss"]


def test_interrupt_saves_and_resume_reaches_the_same_final_step(run_script):
    total = "20480"  # 320 iterations of 8 envs x 8 steps
    interrupted = run_script(
        SCRIPT,
        "--total-timesteps", total, "--checkpoint-freq", "1000", "--eval-episodes", "1",
        interrupt_when=lambda workdir: any(workdir.glob("runs/*/actor_critic.pt")),
    )  # fmt: skip
    assert interrupted.returncode == 130, interrupted.describe()
    (checkpoint,) = interrupted.checkpoints()
    assert f"checkpoint saved to {checkpoint.relative_to(interrupted.workdir)}" in interrupted.stderr
    assert "--resume" in interrupted.stderr
    saved_step = torch.load(checkpoint, weights_only=True)["global_step"]
    assert 0 < saved_step < int(total)

    changed = run_script(SCRIPT, "--total-timesteps", total, "--num-steps", "3", "--resume", str(checkpoint))
    assert changed.returncode == 2, changed.describe()
    assert "--num-steps is 3 but the checkpoint was trained with" in changed.stderr

    resumed = run_script(
        SCRIPT, "--total-timesteps", total, "--eval-episodes", "1", "--resume", str(checkpoint)
    )
    assert resumed.returncode == 0, resumed.describe()
    assert f"done: {total} steps" in resumed.stdout, resumed.describe()
    assert len(resumed.run_dirs) == 1, "a resumed run must continue in the same run folder"
    state = torch.load(checkpoint, weights_only=True)
    assert state["global_step"] == int(total)
    # Both processes wrote to the same TensorBoard run, the second up to the full budget.
    assert len(list(resumed.run_dirs[0].glob("events.out.tfevents.*"))) == 2
    assert resumed.steps("losses/value_loss")[-1] == int(total)


def test_non_finite_loss_stops_with_the_state_saved(run_script):
    result = run_script(SCRIPT, *TINY, "--learning-rate", "1e30", "--no-anneal-lr", "--max-grad-norm", "1e30")
    assert result.returncode == 1, result.describe()
    assert "error: loss became non-finite at step" in result.stderr
    assert result.checkpoints("*_nan.pt"), result.describe()


def run_in_process(capsys, *argv: str) -> tuple[int, list[str]]:
    """Parse `argv` with the script's real tyro parser and run main; return (exit code, stderr lines).

    Bad input must be rejected before any heavy work, so these cases run in-process: the same
    code path as the command line without paying an interpreter start per case.
    """
    with pytest.raises(SystemExit) as exit_info:
        actor_critic.main(tyro.cli(actor_critic.Args, args=list(argv)))
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--env-id", "CartPole-v9"), "unknown environment id 'CartPole-v9'; did you mean CartPole-v1"),
        (("--env-id", "NoSuchEnv-v0"), "unknown environment id"),
        (("--env-id", "Pendulum-v1"), "Pendulum-v1 has a Box action space; this script needs Discrete"),
        (("--total-timesteps", "0"), "--total-timesteps must be positive, got 0"),
        (("--num-envs", "-2"), "--num-envs must be positive, got -2"),
        (("--num-steps", "0"), "--num-steps must be positive, got 0"),
        (("--eval-episodes", "0"), "--eval-episodes must be positive, got 0"),
        (("--gamma", "1.5"), "--gamma must be in [0, 1], got 1.5"),
        (("--gae-lambda", "-0.1"), "--gae-lambda must be in [0, 1], got -0.1"),
        (("--learning-rate", "0"), "--learning-rate must be positive, got 0.0"),
        (("--max-grad-norm", "-1"), "--max-grad-norm must be positive, got -1.0"),
        (("--ent-coef", "-1"), "--ent-coef must be >= 0, got -1.0"),
        (("--vf-coef", "-0.5"), "--vf-coef must be >= 0, got -0.5"),
        (("--checkpoint-freq", "-5"), "--checkpoint-freq must be >= 0, got -5"),
        (("--log-interval", "0"), "--log-interval must be positive, got 0"),
        (("--resume", "missing.pt"), "checkpoint missing.pt does not exist"),
        (("--eval-checkpoint", "missing.pt"), "checkpoint missing.pt does not exist"),
        (("--resume", "a.pt", "--eval-checkpoint", "a.pt"), "give either --resume or --eval-checkpoint"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, args, message):
    code, lines = run_in_process(capsys, *args)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_bad_input_through_the_real_command_line(run_script):
    result = run_script(SCRIPT, "--env-id", "CartPol-v1")
    assert result.returncode == 2, result.describe()
    assert result.stderr.strip().startswith(
        "error: unknown environment id 'CartPol-v1'; did you mean CartPole-v1"
    )
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (result.workdir / "runs").exists()


@pytest.mark.parametrize("flag", ["--resume", "--eval-checkpoint"])
def test_bad_checkpoints_exit_2_with_one_line(capsys, tmp_path, flag):
    def saved(name, **overrides):
        state = {
            "script": "actor_critic", "env_id": "CartPole-v1", "run_name": "x", "args": {},
            "model": actor_critic.Agent(4, 2).state_dict(), **overrides,
        }  # fmt: skip
        torch.save(state, tmp_path / name)
        return name

    data = (tmp_path / saved("whole.pt")).read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    cases = {
        "truncated.pt": "it may be truncated",
        "text.pt": "not a readable checkpoint",
        "tensor.pt": "not a checkpoint of this project",
        saved("other.pt", script="ppo_cartpole"): "saved by ppo_cartpole.py, not actor_critic.py",
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
