"""Tests of actor_critic.py: its pure parts against slow references, and its real command line."""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, read_scalars, read_wandb_runs, run_script_in

sys.path.insert(0, str(ROOT))
import actor_critic  # noqa: E402

SCRIPT = "actor_critic.py"
TINY = ("--total-timesteps", "512", "--eval-episodes", "2", "--checkpoint-freq", "0",
        "--log-interval", "64")  # fmt: skip
EVAL_SENTENCE = re.compile(r"eval return -?\d+\.\d\d ± \d+\.\d\d over \d+ episodes")


# ---------------------------------------------------------------------------------------------
# Fixtures: in-process runs (the GPU guard, tensors_as_if_on_a_gpu, is in conftest.py)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def in_tmp_path(tmp_path, monkeypatch):
    """For tests that call the script in-process: run in `tmp_path`, so a regression cannot write
    runs/ or videos/ into the checkout, and give back the SIGINT/SIGTERM handlers (and the SDL
    hint) that the script's stop flag installs, so Ctrl-C still stops pytest afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SDL_NO_SIGNAL_HANDLERS", "1")
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield tmp_path
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


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
                expected_return = expected[t][env] + VALUES[t][env]
                assert advantages[t, env].item() == pytest.approx(expected[t][env], abs=1e-5)
                assert returns[t, env].item() == pytest.approx(expected_return, abs=1e-5), (t, env)


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
    policy_loss, value_loss, entropy = actor_critic.a2c_loss(
        logits, actions, advantages, values, returns
    )

    probs = [[0.25, 0.75], [math.exp(2) / (1 + math.exp(2)), 1 / (1 + math.exp(2))], [0.5, 0.5]]
    chosen = [probs[0][1], probs[1][0], probs[2][1]]
    expected_policy = (
        -sum(a * math.log(p) for a, p in zip([2.0, -1.0, 0.5], chosen, strict=True)) / 3
    )
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
        torch.tensor(rewards),
        torch.tensor(values),
        torch.tensor(terminated),
        torch.tensor(ended),
        gamma,
        lam,
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
    # One trunk, two heads.
    assert sum(p.numel() for p in agent.parameters()) == trunk + actor + critic


def test_linear_schedule():
    assert actor_critic.linear_schedule(1e-3, 1, 10) == pytest.approx(1e-3)
    assert actor_critic.linear_schedule(1e-3, 10, 10) == pytest.approx(1e-4)


def test_policy_samples_follow_the_softmax_of_the_logits():
    agent = actor_critic.Agent(4, 3, 8)
    with torch.no_grad():
        agent.actor.weight.zero_()
        agent.actor.bias.copy_(torch.tensor([0.0, 1.0, 2.0]))
    torch.manual_seed(0)
    actions, values = agent.get_action_and_value(torch.zeros(20_000, 4))
    assert actions.shape == values.shape == (20_000,)
    frequencies = torch.bincount(actions, minlength=3).float() / 20_000
    torch.testing.assert_close(
        frequencies, torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0), atol=0.015, rtol=0
    )


def test_update_takes_one_clipped_step_and_refuses_a_non_finite_loss():
    torch.manual_seed(0)
    agent = actor_critic.Agent(4, 2, 16)
    optimizer = torch.optim.SGD(agent.parameters(), lr=1.0)
    args = actor_critic.Args(max_grad_norm=0.1, norm_adv=True)
    obs, actions = torch.randn(6, 4), torch.tensor([0, 1, 1, 0, 1, 0])
    advantages, returns = torch.randn(6), torch.randn(6) * 10
    before = [p.detach().clone() for p in agent.parameters()]
    stats = actor_critic.update(agent, optimizer, args, obs, actions, advantages, returns)
    assert stats["finite"] and all(
        math.isfinite(stats[key]) for key in ("policy_loss", "value_loss", "entropy")
    )
    # One SGD step of lr 1 moves the weights by the clipped gradient: global norm max_grad_norm.
    step = torch.cat(
        [(p.detach() - b).flatten() for p, b in zip(agent.parameters(), before, strict=True)]
    )
    assert step.norm().item() == pytest.approx(0.1, rel=1e-4)

    after = [p.detach().clone() for p in agent.parameters()]
    advantages[0] = float("nan")
    stats = actor_critic.update(agent, optimizer, args, obs, actions, advantages, returns)
    assert stats == {"finite": False}
    assert all(torch.equal(p, a) for p, a in zip(agent.parameters(), after, strict=True))


# ---------------------------------------------------------------------------------------------
# Device mix-ups, without a GPU (defect 1 of issue 11)
# ---------------------------------------------------------------------------------------------


def test_the_device_guard_refuses_what_a_gpu_refuses(tensors_as_if_on_a_gpu):
    tensor, array = torch.arange(3.0), np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(TypeError, match="Tensor.cpu"):
        tensor.numpy()
    with pytest.raises(TypeError, match="Tensor.cpu"):
        np.asarray(tensor)
    with pytest.raises(TypeError, match="Tensor.cpu"):
        array[0] = tensor
    with pytest.raises(TypeError, match="Tensor.cpu"):
        torch.nn.Linear(2, 2).to("cpu").weight.detach().numpy()  # Module.to moves to "the device"
    np.testing.assert_array_equal(tensor.cpu().numpy(), [0, 1, 2])
    np.testing.assert_array_equal(np.asarray(tensor.to("cpu")[1:]), [1, 2])
    array[1] = tensor.to(device=torch.device("cpu"))
    np.testing.assert_array_equal(array, [[0, 0, 0], [0, 1, 2]])
    assert tensor.sum().item() == 3.0  # scalar reads work on a GPU too
    with pytest.raises(TypeError, match="Tensor.cpu"):
        tensor.numpy()  # the copy is on the host, not the original


def test_training_and_evaluation_copy_device_tensors_to_the_host(
    tensors_as_if_on_a_gpu, in_tmp_path
):
    """With --cuda on a GPU machine the bootstrap value, a device tensor, was written into the
    NumPy rollout storage without .cpu(): TypeError in the first rollout."""
    actor_critic.main(actor_critic.parse_args([*TINY, "--num-envs", "2", "--num-steps", "4"]))
    (checkpoint,) = in_tmp_path.glob("runs/*/actor_critic.pt")
    actor_critic.main(actor_critic.parse_args(["--eval-checkpoint", str(checkpoint)]))
    actor_critic.main(
        actor_critic.parse_args(["--resume", str(checkpoint), "--total-timesteps", "1024"])
    )
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 1024


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


def test_smoke_run_tracks_records_video_and_its_checkpoint_reproduces_the_evaluation(run_script):
    result = run_script(SCRIPT, *TINY, "--track", "--capture-video", "--seed", "3")
    assert result.returncode == 0, result.describe()
    for key in SCALAR_KEYS:
        assert result.values(key), f"{key} not logged\n{result.describe()}"
    assert all(math.isfinite(v) for v in result.values("losses/value_loss"))
    # --log-interval counts environment steps.
    assert result.steps("losses/value_loss") == list(range(64, 513, 64))
    assert "done: 512 steps in" in result.stdout, result.describe()
    assert "over 2 episodes; checkpoint" in result.stdout
    (run_dir,) = result.run_dirs
    checkpoint = run_dir / "actor_critic.pt"
    state = torch.load(checkpoint, weights_only=True)
    assert state["kind"] == "a2c-discrete-mlp/3" and state["env_id"] == "CartPole-v1"
    assert state["global_step"] == 512 and state["args"]["seed"] == 3
    # Exactly one video per evaluation episode (no trailing one-frame video from an extra reset).
    assert len(list((result.workdir / "videos" / run_dir.name / "eval").glob("*.mp4"))) == 2
    (wandb_run,) = read_wandb_runs(result.workdir)
    assert wandb_run.group == "actor_critic" and wandb_run.name == run_dir.name
    assert wandb_run.config["seed"] == 3 and wandb_run.config["env_id"] == "CartPole-v1"
    assert wandb_run.config["total_timesteps"] == 512

    # --eval-checkpoint alone takes the run's settings (seed 3, 2 episodes, video) and evaluates
    # with the seed of the end-of-training evaluation: the same figures.
    evaluation = run_script(SCRIPT, "--eval-checkpoint", str(checkpoint))
    assert evaluation.returncode == 0, evaluation.describe()
    assert evaluation.stdout.startswith("eval return "), evaluation.describe()
    assert f"over 2 episodes ({checkpoint})" in evaluation.stdout
    assert EVAL_SENTENCE.findall(evaluation.stdout) == EVAL_SENTENCE.findall(result.stdout)
    videos = result.workdir / "videos" / run_dir.name
    assert len(list((videos / "eval-checkpoint").glob("*.mp4"))) == 2


def leaning_policy() -> dict:
    """Weights whose greedy policy pushes the cart towards the pole's lean: episodes of tens of
    steps whose lengths depend on the initial state, so evaluation figures depend on the seed."""
    agent = actor_critic.Agent(4, 2)
    with torch.no_grad():
        for layer in (agent.trunk[0], agent.trunk[2], agent.actor):
            layer.weight.zero_()
            layer.bias.zero_()
        agent.trunk[0].weight[0, 2] = 10.0  # the pole angle
        agent.trunk[2].weight[0, 0] = 3.0
        agent.actor.weight[:, 0] = torch.tensor([-1.0, 1.0])
    return agent.state_dict()


def test_eval_checkpoint_prints_the_figures_of_the_final_evaluation(in_tmp_path, capsys):
    args = {
        **actor_critic.asdict(actor_critic.Args()),
        "seed": 3,
        "eval_episodes": 3,
        "total_timesteps": 512,
    }
    checkpoint = write_checkpoint(
        in_tmp_path / "c.pt", model=leaning_policy(), args=args, global_step=512
    )
    # Resuming at the checkpoint's own budget trains nothing: the final evaluation of these weights.
    actor_critic.main(actor_critic.parse_args(["--resume", checkpoint, "--no-save-model"]))
    final = EVAL_SENTENCE.findall(capsys.readouterr().out)
    actor_critic.main(actor_critic.parse_args(["--eval-checkpoint", checkpoint]))
    assert EVAL_SENTENCE.findall(capsys.readouterr().out) == final
    # Both play the evaluation seed (seed + EVAL_SEED_OFFSET), and the test can tell: with the
    # training seed itself the figures differ.
    agent = actor_critic.Agent(4, 2)
    agent.load_state_dict(leaning_policy())
    cpu = torch.device("cpu")
    evaluation_seed = 3 + actor_critic.EVAL_SEED_OFFSET
    assert final == [
        actor_critic.eval_summary(
            actor_critic.evaluate(agent, "CartPole-v1", 3, evaluation_seed, cpu)
        )
    ]
    training_seed = actor_critic.evaluate(agent, "CartPole-v1", 3, 3, cpu)
    assert actor_critic.eval_summary(training_seed) != final[0]


def test_training_stops_at_the_first_check_the_greedy_policy_passes(in_tmp_path, capsys):
    """A threshold every greedy episode reaches (CartPole episodes last at least ~8 steps) stops
    the run at its first check; --no-stop-when-solved trains the full budget."""
    budget = ("--total-timesteps", "2048", "--eval-episodes", "2", "--solved-check-freq", "256")
    actor_critic.main(actor_critic.parse_args([*budget, "--solved-return", "5"]))
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("done: 256 steps") and "solved at step 256;" in summary, summary
    (checkpoint,) = in_tmp_path.glob("runs/*/actor_critic.pt")
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 256
    # The check's lowest return is logged, so the moment the run was solved is in its events.
    (check,) = read_scalars(checkpoint.parent)["charts/solved_check_min_return"]
    assert check[0] == 256 and check[1] >= 5
    for stop in (["--solved-return", "1000"], ["--solved-return", "5", "--no-stop-when-solved"]):
        actor_critic.main(actor_critic.parse_args([*budget, *stop, "--no-save-model"]))
        summary = capsys.readouterr().out.strip().splitlines()[-1]
        assert summary.startswith("done: 2048 steps") and "solved" not in summary, summary


def test_rmsprop_nstep_returns_and_any_discrete_env_through_the_sync_vector_env(run_script):
    result = run_script(
        SCRIPT, *TINY, "--env-id", "Acrobot-v1", "--optimizer", "rmsprop", "--gae-lambda", "1.0",
        "--norm-adv",
    )  # fmt: skip
    assert result.returncode == 0, result.describe()
    assert len(result.values("eval/episodic_return")) == 2
    (checkpoint,) = result.checkpoints()
    state = torch.load(checkpoint, weights_only=True)
    assert state["env_id"] == "Acrobot-v1"
    # torch.optim.RMSprop with the A2C paper's smoothing, a running square average per parameter.
    (group,) = state["optimizer"]["param_groups"]
    assert group["alpha"] == 0.99 and group["eps"] == 1e-5
    assert not group["centered"] and group["momentum"] == 0
    assert len(state["optimizer"]["state"]) == 8
    assert all("square_avg" in moments for moments in state["optimizer"]["state"].values())


def test_same_seed_gives_identical_logged_numbers(tmp_path):
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


def test_sigterm_saves_and_resume_alone_continues_the_run_exactly(
    run_script, tmp_path, monkeypatch, capsys
):
    # 640 iterations of 4 envs x 8 steps, the full budget (it may be solved before); the stop comes
    # after the first 640.
    total = 20480
    interrupted = run_script(
        SCRIPT,
        "--seed", "9", "--num-envs", "4", "--total-timesteps", str(total),
        "--checkpoint-freq", "640", "--eval-episodes", "1", "--track", "--wandb-group", "g",
        "--no-stop-when-solved",
        interrupt_when=lambda workdir: any(workdir.glob("runs/*/actor_critic.pt")),
        interrupt_signals=(signal.SIGTERM,),
    )  # fmt: skip
    assert interrupted.returncode == 143, interrupted.describe()
    assert "SIGTERM: stopping after this iteration" in interrupted.stderr
    (run_dir,) = interrupted.run_dirs
    checkpoint = run_dir / "actor_critic.pt"
    where = checkpoint.relative_to(interrupted.workdir)
    saved = torch.load(checkpoint, weights_only=True)
    saved_step = saved["global_step"]
    assert f"interrupted at step {saved_step}; checkpoint {where}" in interrupted.stderr
    assert f"(continue with --resume {where})" in interrupted.stderr
    assert 0 < saved_step < total
    # Every periodic checkpoint is kept, named by its step.
    kept = sorted(run_dir.glob("checkpoints/actor_critic_*.pt"))
    assert [path.name for path in kept] == [
        f"actor_critic_{step:012d}.pt" for step in range(640, saved_step + 1, 640)
    ]
    assert torch.load(kept[0], weights_only=True)["global_step"] == 640

    # In-process, elsewhere: an explicit conflicting flag is refused; an explicit safe one is
    # accepted, and resuming to the saved step itself (no training) saves the restored state.
    exact = tmp_path / "exact"
    exact.mkdir()
    shutil.copy(checkpoint, exact / "saved.pt")
    monkeypatch.chdir(exact)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        code, lines = run_in_process(capsys, "--resume", "saved.pt", "--num-envs", "2")
        assert code == 2 and lines == [
            "error: --num-envs is 2 but the checkpoint was trained with 4; "
            "leave the flag out to keep the checkpoint's setting"
        ]
        actor_critic.main(
            actor_critic.parse_args(
                ["--resume", "saved.pt", "--total-timesteps", str(saved_step), "--no-track"]
            )
        )
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert f"done: {saved_step} steps" in capsys.readouterr().out
    restored = torch.load(exact / "runs" / run_dir.name / "actor_critic.pt", weights_only=True)
    assert restored["global_step"] == saved_step
    assert restored["model"].keys() == saved["model"].keys()
    for name, tensor in saved["model"].items():
        assert torch.equal(restored["model"][name], tensor), name
    # The learning rate of the last iteration, and Adam's moments and step counts.
    iterations, last_lr = saved_step // 32, restored["optimizer"]["param_groups"][0]["lr"]
    assert last_lr == saved["optimizer"]["param_groups"][0]["lr"] > 0
    assert last_lr == actor_critic.linear_schedule(3e-3, iterations, total // 32)
    assert len(saved["optimizer"]["state"]) == 8
    for index, moments in saved["optimizer"]["state"].items():
        assert float(moments["step"]) == iterations  # one update per iteration of 32 steps
        for key in "step", "exp_avg", "exp_avg_sq":
            assert torch.equal(restored["optimizer"]["state"][index][key], moments[key]), key

    # `--resume PATH` alone continues with the checkpoint's settings (seed 9, 4 envs, W&B group).
    resumed = run_script(SCRIPT, "--resume", str(checkpoint))
    assert resumed.returncode == 0, resumed.describe()
    assert f"done: {total} steps" in resumed.stdout, resumed.describe()
    assert len(resumed.run_dirs) == 1, "a resumed run must continue in the same run folder"
    final = torch.load(checkpoint, weights_only=True)
    assert final["global_step"] == total
    assert final["args"]["seed"] == 9 and final["args"]["num_envs"] == 4
    # Both processes wrote to the same TensorBoard run, the second up to the full budget.
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 2
    assert resumed.steps("losses/value_loss")[-1] == total
    first, second = read_wandb_runs(resumed.workdir)
    assert first.run_id == second.run_id, "a resumed run continues the same W&B run"
    assert first.group == second.group == "g"
    assert second.config["seed"] == 9 and second.config["num_envs"] == 4


def test_a_second_signal_aborts_without_saving(run_script):
    # One long rollout (one env, 20k steps): both signals arrive before it ends.
    result = run_script(
        SCRIPT, "--num-envs", "1", "--num-steps", "20000", "--total-timesteps", "20000",
        "--checkpoint-freq", "0",
        interrupt_when=lambda workdir: any(workdir.glob("runs/*/events.out.tfevents.*")),
        interrupt_signals=(signal.SIGINT, signal.SIGINT),
    )  # fmt: skip
    assert result.returncode == 130, result.describe()
    aborted = "SIGINT again: aborted; nothing was saved since the last checkpoint"
    assert aborted in result.stderr.splitlines(), result.describe()
    assert "Traceback" not in result.stderr and "interrupted at step" not in result.stderr
    assert not result.checkpoints(), "an aborted run saves nothing"


def test_a_stop_signal_ends_the_iteration_with_its_exit_code_and_a_second_one_aborts(
    in_tmp_path, monkeypatch
):
    def exit_now(code: int):  # the abort's os._exit, as an exception this process survives
        raise SystemExit(code)

    monkeypatch.setattr(actor_critic.os, "_exit", exit_now)
    for signum, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        run = actor_critic.Run(actor_critic.Args(save_model=False), total_steps=64)
        assert not run.end_iteration(64, 0, {}, dict)
        os.kill(os.getpid(), signum)
        assert run.end_iteration(128, 64, {}, dict), "the loop is asked to stop"
        with pytest.raises(SystemExit) as exit_info:
            run.finish({}, 128, final_evaluation=None)
        assert exit_info.value.code == code
        with pytest.raises(SystemExit) as exit_info:
            os.kill(os.getpid(), signal.SIGINT)
        assert exit_info.value.code == 130


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_the_final_evaluation_ends_it_with_the_signal_status(
    run_script, signum, code
):
    """After training the checkpoint is saved: a signal ends the evaluation and the process, with
    128 + the signal's number, rather than being noted and ignored."""

    def training_ended(workdir):
        return any(workdir.glob("runs/*/actor_critic.pt"))

    # Thirty recorded episodes take seconds: the signal lands while they play.
    result = run_script(
        SCRIPT, *TINY[:2], "--eval-episodes", "30", "--capture-video", "--checkpoint-freq", "0",
        interrupt_when=training_ended, interrupt_signals=(signum,),
    )  # fmt: skip
    assert result.returncode == code, result.describe()
    name = signal.Signals(signum).name
    assert f"{name}: the final evaluation was stopped at step 512" in result.stderr
    assert "Traceback" not in result.stderr and "done:" not in result.stdout
    (checkpoint,) = result.checkpoints()
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 512


def test_a_resumed_run_records_its_evaluation_into_a_folder_of_its_own(run_script):
    first = run_script(SCRIPT, *TINY, "--capture-video")
    assert first.returncode == 0, first.describe()
    (checkpoint,) = first.checkpoints()
    resumed = run_script(SCRIPT, "--resume", checkpoint, "--total-timesteps", "1024")
    assert resumed.returncode == 0, resumed.describe()
    assert "Overwriting" not in resumed.stderr, resumed.stderr
    videos = resumed.workdir / "videos" / checkpoint.parent.name
    assert len(list((videos / "eval").glob("*.mp4"))) == 2
    assert len(list((videos / "eval-step-1024").glob("*.mp4"))) == 2


def test_a_checkpoint_of_the_previous_kind_evaluates_but_does_not_resume(in_tmp_path, capsys):
    """a2c-discrete-mlp/2 held the same network with a hand-written Adam's state."""
    actor_critic.main(actor_critic.parse_args(list(TINY)))
    (checkpoint,) = in_tmp_path.glob("runs/*/actor_critic.pt")
    figures = EVAL_SENTENCE.findall(capsys.readouterr().out)
    state = torch.load(checkpoint, weights_only=True)
    old = in_tmp_path / "old.pt"
    old_adam = {"lr": 0.0, "steps": [8] * 8, "exp_avg": [], "exp_avg_sq": []}
    torch.save({**state, "kind": "a2c-discrete-mlp/2", "iteration": 8, "optimizer": old_adam}, old)
    actor_critic.main(actor_critic.parse_args(["--eval-checkpoint", str(old)]))
    assert EVAL_SENTENCE.findall(capsys.readouterr().out) == figures
    code, lines = run_in_process(capsys, "--resume", str(old))
    assert code == 2 and len(lines) == 1, lines
    assert "holds a a2c-discrete-mlp/2 checkpoint" in lines[0]
    assert "can evaluate (--eval-checkpoint) but not resume" in lines[0]


# A batch of one transition has no variance to explain: torch warns, and NaN is logged.
@pytest.mark.filterwarnings("ignore:var\\(\\)")
def test_a_rollout_of_autoreset_steps_alone_is_skipped(in_tmp_path, capsys):
    """One env, one step per rollout: the rollout after each episode's end is only the autoreset
    step, an empty batch that has no mean loss (NaN): there is nothing to learn from it."""
    actor_critic.main(actor_critic.parse_args([
        "--num-envs", "1", "--num-steps", "1", "--total-timesteps", "200", "--eval-episodes", "1",
        "--no-save-model", "--log-interval", "1",
    ]))  # fmt: skip
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("done: 200 steps")
    assert len(read_scalars(in_tmp_path / "runs")["charts/learning_rate"]) == 200


def test_a_folder_of_kept_checkpoints_draws_the_evaluation_curve(in_tmp_path, capsys):
    """--eval-checkpoint runs/<run>/checkpoints alone (the run's settings: seed 3, 2 episodes):
    the curve's figures are those of each file, and the random policy's, on the same seeds."""
    training = ("--seed", "3", "--total-timesteps", "768", "--eval-episodes", "2")
    actor_critic.main(actor_critic.parse_args([*training, "--checkpoint-freq", "256"]))
    (folder,) = in_tmp_path.glob("runs/*/checkpoints")
    kept = sorted(folder.glob("*.pt"))
    assert len(kept) == 3
    actor_critic.main(actor_critic.parse_args(["--eval-checkpoint", str(folder)]))
    rows = (folder / "eval_curve.csv").read_text().splitlines()
    assert rows[0].startswith("step,mean,std,min,max,episodes")
    steps = [int(row.split(",")[0]) for row in rows[1:]]
    assert steps == [-1, 256, 512, 768]  # the random policy first, then the checkpoints in order
    assert (folder / "eval_curve.png").stat().st_size > 0
    seed, cpu = 3 + actor_critic.EVAL_SEED_OFFSET, torch.device("cpu")
    random_returns = actor_critic.evaluate(None, "CartPole-v1", 2, seed, cpu)
    figures = (
        random_returns.mean(),
        random_returns.std(),
        random_returns.min(),
        random_returns.max(),
    )
    assert rows[1] == ",".join(map(str, [-1, *figures, 2]))
    capsys.readouterr()
    for path, row in zip(kept, rows[2:], strict=True):
        actor_critic.main(actor_critic.parse_args(["--eval-checkpoint", str(path)]))
        mean, std = map(float, row.split(",")[1:3])
        expected = f"eval return {mean:.2f} ± {std:.2f} over 2 episodes ({path})"
        assert capsys.readouterr().out.strip() == expected

    # Bad input: one line and exit 2, before anything is played.
    (in_tmp_path / "empty").mkdir()
    other = in_tmp_path / "other"
    other.mkdir()
    write_checkpoint(other / "ppo.pt", kind="ppo-discrete-mlp/3")
    refusals = {
        "empty": "holds no checkpoints (*.pt)",
        "other": "holds a ppo-discrete-mlp/3 checkpoint; this script trains a2c-discrete-mlp/3",
    }
    for bad, message in refusals.items():
        code, lines = run_in_process(capsys, "--eval-checkpoint", str(in_tmp_path / bad))
        assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not list(other.glob("eval_curve.*"))


def test_non_finite_loss_stops_with_the_state_saved(run_script):
    result = run_script(
        SCRIPT, *TINY, "--learning-rate", "1e30", "--no-anneal-lr", "--max-grad-norm", "1e30"
    )
    assert result.returncode == 1, result.describe()
    assert "error: loss became non-finite at step" in result.stderr
    assert result.checkpoints("*_nan.pt"), result.describe()


def run_in_process(capsys, *argv: str) -> tuple[int, list[str]]:
    """Parse `argv` with the script's real parser and run main; return (exit code, stderr lines).

    Bad input must be rejected before any heavy work, so these cases run in-process: the same
    code path as the command line without paying an interpreter start per case.
    """
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        actor_critic.main(actor_critic.parse_args(list(argv)))
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def write_checkpoint(path, **overrides) -> str:
    """A minimal checkpoint of this script (for the bad-input cases)."""
    agent = actor_critic.Agent(4, 2)
    state = {
        "kind": "a2c-discrete-mlp/3", "env_id": "CartPole-v1", "run_name": "x",
        "args": actor_critic.asdict(actor_critic.Args()), "global_step": 0,
        "model": agent.state_dict(), "optimizer": torch.optim.Adam(agent.parameters()).state_dict(),
        **overrides,
    }  # fmt: skip
    torch.save(state, path)
    return str(path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--env-id", "CartPole-v9"),
            "unknown environment id 'CartPole-v9'; did you mean CartPole-v1",
        ),
        (("--env-id", "NoSuchEnv-v0"), "unknown environment id"),
        (
            ("--env-id", "Pendulum-v1"),
            "Pendulum-v1 has a Box action space; this script needs Discrete",
        ),
        (("--total-timesteps", "0"), "--total-timesteps must be positive, got 0"),
        (("--num-envs", "-2"), "--num-envs must be positive, got -2"),
        (("--num-steps", "0"), "--num-steps must be positive, got 0"),
        (("--eval-episodes", "0"), "--eval-episodes must be positive, got 0"),
        (("--torch-threads", "0"), "--torch-threads must be positive, got 0"),
        (("--solved-check-freq", "0"), "--solved-check-freq must be positive, got 0"),
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
        (
            ("--resume", "a.pt", "--eval-checkpoint", "a.pt"),
            "give either --resume or --eval-checkpoint",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, in_tmp_path, args, message):
    write_checkpoint(in_tmp_path / "a.pt")
    code, lines = run_in_process(capsys, *args)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (in_tmp_path / "runs").exists()


def test_bad_input_through_the_real_command_line(run_script):
    result = run_script(SCRIPT, "--env-id", "CartPol-v1")
    assert result.returncode == 2, result.describe()
    assert result.stderr.strip().startswith(
        "error: unknown environment id 'CartPol-v1'; did you mean CartPole-v1"
    )
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (result.workdir / "runs").exists()


@pytest.mark.parametrize("flag", ["--resume", "--eval-checkpoint"])
def test_bad_checkpoints_exit_2_with_one_line(capsys, in_tmp_path, flag):
    whole = write_checkpoint(in_tmp_path / "whole.pt")
    data = (in_tmp_path / "whole.pt").read_bytes()
    (in_tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (in_tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save(torch.zeros(3), in_tmp_path / "tensor.pt")
    old_format = {"script": "actor_critic", "env_id": "CartPole-v1", "args": {}}
    torch.save(old_format, in_tmp_path / "old.pt")
    acrobot_args = {**actor_critic.asdict(actor_critic.Args()), "env_id": "Acrobot-v1"}
    cases = {
        ("truncated.pt",): "it may be truncated",
        ("text.pt",): "not a readable checkpoint",
        ("tensor.pt",): "not a checkpoint of this project",
        ("old.pt",): "not a checkpoint of this project",
        (write_checkpoint(in_tmp_path / "other.pt", kind="ppo-discrete-mlp/1"),): (
            "holds a ppo-discrete-mlp/1 checkpoint; this script trains a2c-discrete-mlp/3"
        ),
        (
            write_checkpoint(in_tmp_path / "acrobot.pt", args=acrobot_args),
            "--env-id",
            "CartPole-v1",
        ): ("--env-id is 'CartPole-v1' but the checkpoint was trained with 'Acrobot-v1'"),
        (
            whole,
            "--hidden-size",
            "32",
        ): "--hidden-size is 32 but the checkpoint was trained with 64",
    }
    for (name, *extra), message in cases.items():
        code, lines = run_in_process(capsys, flag, str(in_tmp_path / name), *extra)
        assert code == 2, name
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (
            name,
            lines,
        )


# --- learning --------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_args_solve_cartpole(run_script):
    """Default args, seed 1: the greedy policy averages >= 475 of 500, and stops early to do so."""
    result = run_script(SCRIPT, "--eval-episodes", "20", "--no-save-model")
    assert result.returncode == 0, result.describe()
    eval_returns = result.values("eval/episodic_return")
    assert len(eval_returns) == 20
    assert np.mean(eval_returns) >= 475, eval_returns
    # It stopped once the greedy policy was solved, before the budget.
    solved_at = int(re.search(r"solved at step (\d+);", result.stdout).group(1))
    assert solved_at < actor_critic.Args().total_timesteps
