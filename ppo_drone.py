"""Proximal Policy Optimisation (Gaussian policy, GAE) flying a quadrotor along a figure-eight.

Trains a continuous-action PPO agent on crazyflow's `DroneFigureEightTrajectory-v0`: a JAX
simulation of the Crazyflie that steps a thousand drones in one call. The policy commands roll,
pitch and collective thrust (attitude control, rescaled to [-1, 1] by crazyflow's NormalizeActions)
and is rewarded for staying close to a reference point that moves along the figure-eight
x = sin t, z = 1 + 0.5 sin 2t; it sees its position, attitude, velocities and the position errors to
the next ten reference points. The implementation is the well-known PPO recipe for continuous
control: separate tanh actor and critic MLPs with orthogonal initialisation, a state-independent
log-std, running observation normalisation, GAE, advantage normalisation, clipped policy and value
losses, entropy bonus, global gradient clipping, learning-rate decay and an optional target-KL stop.
The defaults reproduce a course setting: 1024 drones, control at 50 Hz, γ 0.9, 16-step rollouts,
15 epochs of 16 minibatches, an attitude penalty in the training reward, the yaw command held at 0.

Run:
    python ppo_drone.py                      # train, evaluate, save runs/<run>/ppo_drone.pt
    python ppo_drone.py --eval-checkpoint runs/<run>/ppo_drone.pt --capture-video  # mp4 + plot
    tensorboard --logdir runs

Expect: with the defaults and seed 1 the deterministic policy flies the whole 10 s figure-eight
without a crash after 1M environment steps: evaluation return 479.8 ± 1.0 (of at most 500) over 64
drones (--eval-episodes 64), mean distance to the moving reference point 0.021 m. On a shared
2-core CPU that took 295 s (about 3,800 steps/s in training, 2.3 CPU-minutes); the PPO update,
not the simulator, takes most of it. Training crashes on a plateau for ~500k steps, then switches
to clean flight within a few iterations. `--capture-video` writes flight.mp4 (MuJoCo offscreen,
MUJOCO_GL=egl when headless) and flight.png (the flown path against the figure-eight).
"""

from __future__ import annotations

import contextlib
import difflib
import io
import math
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# crazyflow must be imported before anything that imports scipy. MuJoCo's MJX prints a notice
# about its optional `warp` backend at import; it is irrelevant here and would only be noise.
with contextlib.redirect_stdout(io.StringIO()):
    import crazyflow  # noqa: F401  (registers the Drone*-v0 environments)
import gymnasium as gym
import jax
import jax.numpy as jnp
import mujoco
import numpy as np
import torch
import torch.nn as nn
import tyro
from crazyflow.envs import NormalizeActions
from gymnasium.vector import VectorEnv, VectorWrapper
from gymnasium.vector.utils import batch_space
from gymnasium.wrappers.vector import JaxToTorch
from jax.scipy.spatial.transform import Rotation
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

SCRIPT = Path(__file__).stem


@dataclass
class Args:
    exp_name: str = SCRIPT
    """name of this experiment (part of the run name and of the checkpoint file name)"""
    seed: int = 1
    """seed of random, NumPy, torch and the simulation's JAX random key"""
    torch_deterministic: bool = True
    """make cuDNN deterministic (cudnn.deterministic=True, cudnn.benchmark=False)"""
    cuda: bool = True
    """use a GPU when one is present, for both the simulation (JAX) and the networks (torch)"""
    track: bool = False
    """log the run to Weights & Biases (works offline with WANDB_MODE=offline)"""
    wandb_project_name: str = "rl-scripts"
    """the W&B project"""
    wandb_entity: str | None = None
    """the W&B entity (team or user); None uses your default"""
    capture_video: bool = False
    """render one evaluation flight to mp4 and plot its path (PNG) under videos/<run_name>/"""
    save_model: bool = True
    """save the checkpoint runs/<run_name>/<exp_name>.pt (at the end, periodically, on Ctrl-C)"""
    checkpoint_freq: int = 200_000
    """also save a checkpoint every this many environment steps (0 disables periodic saves)"""
    resume: str | None = None
    """path of a checkpoint to continue training from"""
    eval_checkpoint: str | None = None
    """path of a checkpoint to evaluate for --eval-episodes episodes, then exit"""
    eval_episodes: int = 10
    """episodes of the final deterministic evaluation (and of --eval-checkpoint)"""

    env_id: str = "DroneFigureEightTrajectory-v0"
    """a crazyflow environment (DroneFigureEightTrajectory-v0, DroneReachPos-v0, ...)"""
    total_timesteps: int = 1_000_000
    """environment steps to train for (summed over the drones)"""
    env_freq: int = 50
    """control frequency of the environment in Hz (crazyflow's default is 500; the simulation
    itself always runs at 500 Hz)"""
    max_episode_time: float = 10.0
    """episode length in seconds before truncation (an evaluation setting for --eval-checkpoint)"""
    num_envs: int = 1024
    """number of drones simulated in parallel for training"""
    n_eval_envs: int = 64
    """number of drones simulated in parallel for evaluation (each flies its first episode)"""
    attitude_coef: float = 0.08
    """training reward -= this x |(roll, pitch, yaw)| (rad): discourages aggressive attitudes"""
    zero_yaw: bool = True
    """hold the yaw command at 0: the figure-eight does not need yaw, and exploring it only adds
    noise"""
    learning_rate: float = 1.5e-3
    """AdamW learning rate"""
    anneal_lr: bool = True
    """decay the learning rate linearly over training to --lr-final-fraction of its start"""
    lr_final_fraction: float = 0.2
    """fraction of --learning-rate reached at the end of training when --anneal-lr is on"""
    num_steps: int = 16
    """steps per environment in each rollout"""
    gamma: float = 0.9
    """discount factor (at 50 Hz an effective horizon of about 0.2 s of flight)"""
    gae_lambda: float = 0.95
    """lambda of generalised advantage estimation"""
    num_minibatches: int = 16
    """minibatches per epoch (must divide num_envs * num_steps)"""
    update_epochs: int = 15
    """epochs of optimisation over each rollout"""
    norm_adv: bool = True
    """normalise advantages per minibatch"""
    clip_coef: float = 0.25
    """surrogate clipping coefficient epsilon"""
    clip_vloss: bool = True
    """clip the value loss around the old value estimates, as the policy loss is clipped"""
    ent_coef: float = 0.01
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 5.0
    """global gradient-norm clipping threshold"""
    target_kl: float | None = None
    """stop the epochs of an update early once the approximate KL exceeds this (None: never)"""
    hidden_size: int = 64
    """width of the two hidden layers of the actor and of the critic"""

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    @property
    def num_iterations(self) -> int:
        return max(1, self.total_timesteps // self.batch_size)


def fail(message: str) -> None:
    """Report bad input as one line on stderr and exit with status 2 (no traceback)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def validate(args: Args) -> None:
    """Check every knob before any heavy work, so a typo costs a second, not a run."""
    for name in (
        "total_timesteps", "num_envs", "n_eval_envs", "num_steps", "num_minibatches",
        "update_epochs", "env_freq", "eval_episodes",
    ):  # fmt: skip
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.checkpoint_freq < 0:
        fail(f"--checkpoint-freq must be >= 0, got {args.checkpoint_freq}")
    if args.batch_size % args.num_minibatches:
        fail(
            f"--num-minibatches {args.num_minibatches} does not divide the batch of "
            f"{args.batch_size} (= num_envs {args.num_envs} x num_steps {args.num_steps})"
        )
    for name in ("gamma", "gae_lambda", "lr_final_fraction"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            fail(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    for name in ("learning_rate", "clip_coef", "max_grad_norm", "hidden_size", "max_episode_time"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.attitude_coef < 0:
        fail(f"--attitude-coef must be >= 0, got {args.attitude_coef}")
    if SIM_FREQ % args.env_freq:
        fail(f"--env-freq {args.env_freq} must divide the simulation's {SIM_FREQ} Hz")
    if args.target_kl is not None and args.target_kl <= 0:
        fail(f"--target-kl must be positive (or omitted), got {args.target_kl}")
    if args.resume and args.eval_checkpoint:
        fail("give either --resume or --eval-checkpoint, not both")
    check_env(args.env_id)


# crazyflow simulates at 500 Hz and runs SIM_FREQ / env_freq physics steps per env step.
SIM_FREQ = 500


def crazyflow_env_ids() -> list[str]:
    return sorted(
        env_id
        for env_id, spec in gym.registry.items()
        if getattr(spec.vector_entry_point, "__module__", "").startswith("crazyflow")
    )


def check_env(env_id: str) -> None:
    """Fail with suggestions for an unknown id, and with an explanation for a non-crazyflow env.

    This script drives crazyflow's JAX vector environments directly (one simulation of all drones,
    JAX arrays handed to torch), so any other environment is refused up front.
    """
    if env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, list(gym.registry), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        fail(f"unknown environment id {env_id!r}{hint}")
    if env_id not in crazyflow_env_ids():
        fail(
            f"{env_id} is not a crazyflow environment; this script needs one of crazyflow's JAX "
            f"vector envs ({', '.join(crazyflow_env_ids())})"
        )


@jax.jit
def flatten_observation(obs: dict[str, jax.Array]) -> jax.Array:
    """Concatenate the dict's entries per drone, in gymnasium's (sorted) key order."""
    return jnp.concatenate([obs[key].reshape(obs[key].shape[0], -1) for key in sorted(obs)], axis=-1)


@jax.jit
def attitude_norm(quat: jax.Array) -> jax.Array:
    """|(roll, pitch, yaw)| in radians of scalar-last quaternions (crazyflow's convention)."""
    return jnp.linalg.norm(Rotation.from_quat(quat).as_euler("xyz"), axis=-1)


@jax.jit
def tracking_error(obs: dict[str, jax.Array]) -> jax.Array:
    """Distance (m) to the reference point the reward is measured against.

    The first three numbers of `local_samples` are the position error to the current point of the
    trajectory, the one the step's reward exp(-2 distance) uses.
    """
    return jnp.linalg.norm(obs["local_samples"][:, :3], axis=-1)


class DroneTask(VectorWrapper):
    """JAX side of the task: flat observations, yaw held at 0, attitude penalty, tracking error.

    Returns the *shaped* reward for learning and keeps the environment's own reward in
    `info["env_reward"]`, so that logged returns are the true ones. Everything stays a JAX array
    on the simulation's device; JaxToTorch hands it to torch afterwards without copying.
    """

    def __init__(self, env: VectorEnv, attitude_coef: float, zero_yaw: bool):
        super().__init__(env)
        space = env.single_observation_space
        self.single_observation_space = gym.spaces.flatten_space(space)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.attitude_coef = attitude_coef
        self.has_trajectory = "local_samples" in space.spaces
        action_scale = np.ones(env.single_action_space.shape, dtype=np.float32)
        if zero_yaw:
            action_scale[2] = 0.0  # attitude command order: roll, pitch, yaw, thrust
        self.action_scale = jnp.asarray(action_scale)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        return flatten_observation(obs), info

    def step(self, actions: jax.Array):
        obs, reward, terminated, truncated, info = self.env.step(actions * self.action_scale)
        info = {**info, "env_reward": reward}
        if self.has_trajectory:
            info["tracking_error"] = tracking_error(obs)
        shaped = reward - self.attitude_coef * attitude_norm(obs["quat"]) if self.attitude_coef else reward
        return flatten_observation(obs), shaped, terminated, truncated, info


def update_mean_var(
    mean: torch.Tensor, var: torch.Tensor, count: float, batch: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Merge a batch's moments into running (mean, var, count): Chan et al.'s parallel update."""
    batch_mean, batch_var, batch_count = batch.mean(0), batch.var(0, unbiased=False), batch.shape[0]
    delta = batch_mean - mean
    total = count + batch_count
    new_mean = mean + delta * batch_count / total
    m2 = var * count + batch_var * batch_count + delta.square() * count * batch_count / total
    return new_mean, m2 / total, total


class NormalizeObservation(VectorWrapper):
    """Running mean/std normalisation of torch observations, with statistics that can be frozen.

    The statistics are updated from every observation while `update_stats` is on (training). The
    evaluation envs get a copy of the training statistics and keep them frozen (`sync_envs`), and
    the checkpoint carries them: a policy only flies well on inputs scaled as in its training.
    """

    def __init__(self, env: VectorEnv, device: torch.device, epsilon: float = 1e-8):
        super().__init__(env)
        shape = env.single_observation_space.shape
        self.mean = torch.zeros(shape, device=device)
        self.var = torch.ones(shape, device=device)
        self.count = 1e-4
        self.epsilon = epsilon
        self.update_stats = True

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        if self.update_stats:
            self.mean, self.var, self.count = update_mean_var(self.mean, self.var, self.count, obs)
        return (obs - self.mean) / torch.sqrt(self.var + self.epsilon)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        return self.normalize(obs), info

    def step(self, actions: torch.Tensor):
        obs, reward, terminated, truncated, info = self.env.step(actions)
        return self.normalize(obs), reward, terminated, truncated, info

    def state_dict(self) -> dict:
        return {"mean": self.mean.cpu(), "var": self.var.cpu(), "count": float(self.count)}

    def load_state_dict(self, state: dict) -> None:
        self.mean = state["mean"].to(self.mean.device, self.mean.dtype)
        self.var = state["var"].to(self.var.device, self.var.dtype)
        self.count = float(state["count"])


def sync_envs(train_envs: NormalizeObservation, eval_envs: NormalizeObservation) -> None:
    """Give the evaluation envs the training envs' normalisation statistics, frozen."""
    eval_envs.load_state_dict(train_envs.state_dict())
    eval_envs.update_stats = False


def make_envs(args: Args, num_envs: int, jax_device: str, torch_device: torch.device) -> NormalizeObservation:
    """All drones in one JAX simulation, seen from torch with normalised flat observations.

    crazyflow's envs are natively vectorised (`vector_entry_point`): one `step` advances every
    drone. They autoreset on the *next* step (metadata NEXT_STEP, no SAME_STEP option): the step
    after an episode ends returns the reset observation with a plausible reward and no done flag;
    `main` masks those steps out of the rollout.
    """
    # crazyflow builds its MuJoCo model from a spec without a name prefix, and MuJoCo warns (in C,
    # straight to stderr) that such a model may not save correctly; it is never saved here. Route
    # MuJoCo's warnings through Python's warnings module so that exactly this one is silenced.
    mujoco.set_mju_user_warning(lambda message: warnings.warn(message, stacklevel=2))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Attaching a spec with an empty prefix")
        try:
            envs = gym.make_vec(
                args.env_id,
                num_envs=num_envs,
                freq=args.env_freq,
                max_episode_time=args.max_episode_time,
                device=jax_device,
            )
        except (ValueError, TypeError) as error:
            fail(f"cannot build {args.env_id} with these settings: {error}")
    if not isinstance(envs.single_action_space, gym.spaces.Box) or len(envs.single_action_space.shape) != 1:
        fail(f"{args.env_id} actions are {envs.single_action_space}; this script needs a 1-D Box")
    if args.zero_yaw and envs.single_action_space.shape != (4,):
        fail(
            f"--zero-yaw needs the 4-number attitude command; {args.env_id} takes "
            f"{envs.single_action_space} (pass --no-zero-yaw)"
        )
    envs = NormalizeActions(envs)
    envs = DroneTask(envs, args.attitude_coef, args.zero_yaw)
    envs = JaxToTorch(envs, device=torch_device)
    return NormalizeObservation(envs, torch_device)


def layer_init(layer: nn.Linear, gain: float = np.sqrt(2), bias: float = 0.0) -> nn.Linear:
    """Orthogonal weights and constant bias: keeps activations well-scaled through tanh layers."""
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.constant_(layer.bias, bias)
    return layer


def gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """Log-density of `action` under a diagonal Gaussian, summed over the action dimensions."""
    z = (action - mean) * torch.exp(-log_std)
    return (-0.5 * z.square() - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def gaussian_entropy(log_std: torch.Tensor) -> torch.Tensor:
    """Entropy of a diagonal Gaussian, summed over the action dimensions."""
    return (log_std + 0.5 * (1.0 + math.log(2 * math.pi))).sum(-1)


class Agent(nn.Module):
    """Separate tanh actor and critic MLPs and a state-independent log-std.

    The actor outputs the Gaussian's mean; actions are sampled around it and clipped to [-1, 1] by
    NormalizeActions, while the log-prob is that of the unclipped sample (the distribution the
    policy actually sampled from). A state-independent log-std is the usual choice for PPO on
    continuous control: exploration shrinks globally as the policy becomes sure.
    """

    def __init__(self, obs_dim: int, action_dim: int, hidden_size: int = 64):
        super().__init__()
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden_size)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden_size, hidden_size)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden_size, 1), gain=1.0),
        )
        # A 0.01-gain output layer starts every action mean near 0: early exploration comes from
        # the log-std, not from the luck of the initialisation.
        self.actor_mean = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden_size)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden_size, hidden_size)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden_size, action_dim), gain=0.01),
        )
        self.actor_logstd = nn.Parameter(torch.zeros(action_dim))

    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)

    def get_action_and_value(self, obs: torch.Tensor, action: torch.Tensor | None = None):
        """Sample an action (or score a given one): action, log-prob, entropy, value."""
        mean = self.actor_mean(obs)
        log_std = self.actor_logstd.expand_as(mean)
        if action is None:
            action = mean + torch.exp(log_std) * torch.randn_like(mean)
        return (
            action,
            gaussian_log_prob(mean, log_std, action),
            gaussian_entropy(log_std),
            self.get_value(obs),
        )

    def deterministic_action(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor_mean(obs)


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    terminated: torch.Tensor,
    episode_ended: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over a (T, N) rollout; returns (advantages, returns).

    `values` has T + 1 rows: V(s_0) ... V(s_T), the last being the value of the observation after
    the final step. With next-step autoreset the observation after an episode's last step is its
    final observation, so `values[t + 1]` is V(final obs) exactly where a *truncated* episode must
    be bootstrapped from it. Hence:
      - `terminated[t]` (the drone crashed) removes the bootstrap term: nothing follows a crash;
      - `episode_ended[t]` (terminated or truncated) stops the advantage recursion, so credit never
        flows across an episode boundary, but a truncated step still bootstraps from V(final obs).
    The step after an episode ends (the autoreset step) gets a meaningless advantage here; the
    caller drops it from the update.
    """
    num_steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[0])
    for t in reversed(range(num_steps)):
        not_terminal = 1.0 - terminated[t].to(rewards.dtype)
        continues = 1.0 - episode_ended[t].to(rewards.dtype)
        delta = rewards[t] + gamma * values[t + 1] * not_terminal - values[t]
        next_advantage = delta + gamma * gae_lambda * continues * next_advantage
        advantages[t] = next_advantage
    return advantages, advantages + values[:-1]


def ppo_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    new_values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    clip_coef: float,
    clip_vloss: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate policy loss and (optionally clipped) value loss; also the ratio.

    The policy loss is the negated PPO objective: max(-A r, -A clip(r, 1 - eps, 1 + eps)), i.e. a
    pessimistic bound that removes the incentive to move the ratio r outside [1 - eps, 1 + eps].
    """
    ratio = (new_logprobs - old_logprobs).exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_coef, 1.0 + clip_coef)
    policy_loss = torch.max(unclipped, clipped).mean()
    if clip_vloss:
        values_clipped = old_values + (new_values - old_values).clamp(-clip_coef, clip_coef)
        value_loss = 0.5 * torch.max((new_values - returns) ** 2, (values_clipped - returns) ** 2).mean()
    else:
        value_loss = 0.5 * ((new_values - returns) ** 2).mean()
    return policy_loss, value_loss, ratio


def linear_schedule(start: float, iteration: int, num_iterations: int, final_fraction: float = 0.0) -> float:
    """Value at 1-based `iteration` of a linear decay from `start` to `final_fraction * start`."""
    return start * (1.0 - (1.0 - final_fraction) * (iteration - 1.0) / num_iterations)


def explained_variance(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """1 - Var(targets - predictions) / Var(targets): 1 is perfect, 0 is no better than a mean."""
    target_variance = targets.var()
    if target_variance == 0:
        return float("nan")
    return float(1.0 - (targets - predictions).var() / target_variance)


def update(agent, optimizer, args, b_obs, b_actions, b_logprobs, b_advantages, b_returns, b_values) -> dict:
    """Several epochs of minibatch PPO over one rollout; returns the last epoch's statistics."""
    batch = len(b_obs)
    clipfracs = []
    stats = {}
    for _epoch in range(args.update_epochs):
        permutation = torch.randperm(batch, device=b_obs.device)
        for minibatch in permutation.tensor_split(args.num_minibatches):
            _, new_logprob, entropy, new_value = agent.get_action_and_value(
                b_obs[minibatch], b_actions[minibatch]
            )
            log_ratio = new_logprob - b_logprobs[minibatch]
            advantages = b_advantages[minibatch]
            if args.norm_adv and len(advantages) > 1:
                advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
            policy_loss, value_loss, ratio = ppo_loss(
                new_logprob, b_logprobs[minibatch], advantages, new_value, b_values[minibatch],
                b_returns[minibatch], args.clip_coef, args.clip_vloss,
            )  # fmt: skip
            entropy_loss = entropy.mean()
            loss = policy_loss - args.ent_coef * entropy_loss + args.vf_coef * value_loss
            if not torch.isfinite(loss):
                return {"finite": False}

            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            optimizer.step()

            with torch.no_grad():
                # Schulman's estimators of KL(old || new): the second is unbiased, lower variance.
                old_approx_kl = (-log_ratio).mean()
                approx_kl = ((ratio - 1) - log_ratio).mean()
                clipfracs.append(((ratio - 1.0).abs() > args.clip_coef).float().mean())
            stats = {
                "policy_loss": policy_loss.item(),
                "value_loss": value_loss.item(),
                "entropy": entropy_loss.item(),
                "old_approx_kl": old_approx_kl.item(),
                "approx_kl": approx_kl.item(),
                "ratio_mean": ratio.mean().item(),
                "ratio_max": ratio.max().item(),
            }
        if args.target_kl is not None and stats["approx_kl"] > args.target_kl:
            break
    stats["clipfrac"] = torch.stack(clipfracs).mean().item()
    stats["finite"] = True
    return stats


# A camera looking along the y axis at the plane of the figure-eight (x-z, centred at 1 m height).
VIDEO_CAMERA = {
    "distance": 2.4,
    "azimuth": 90.0,
    "elevation": -8.0,
    "lookat": np.array([0.0, 0.0, 1.0]),
}
VIDEO_SIZE = (400, 300)


def render_frame(envs: VectorEnv, reference: np.ndarray | None) -> np.ndarray:
    """Offscreen MuJoCo image of drone 0 (MUJOCO_GL=egl when headless), reference in red."""
    sim = envs.unwrapped.sim
    if reference is not None and sim.viewer is not None:  # markers need the renderer to exist
        from crazyflow.sim.visualize import draw_line

        points = np.vstack([reference[::10], reference[-1:]])  # every 10th point, loop closed
        draw_line(sim, points, rgba=np.array([1.0, 0.0, 0.0, 1.0]), start_size=2.0, end_size=2.0)
    width, height = VIDEO_SIZE
    return sim.render(mode="rgb_array", world=0, width=width, height=height, cam_config=VIDEO_CAMERA)


def save_flight(
    folder: Path,
    frames: list[np.ndarray],
    fps: float,
    path: np.ndarray,
    reference: np.ndarray | None,
) -> None:
    """Write the rendered flight (mp4) and a plot of its path against the reference (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from moviepy import ImageSequenceClip

    folder.mkdir(parents=True, exist_ok=True)
    ImageSequenceClip(frames, fps=fps).write_videofile(str(folder / "flight.mp4"), logger=None)
    figure, axis = plt.subplots(figsize=(6, 4))
    if reference is not None:
        axis.plot(reference[:, 0], reference[:, 2], "r--", label="reference")
    axis.plot(path[:, 0], path[:, 2], "b-", label="flown (drone 0)")
    axis.plot(path[:1, 0], path[:1, 2], "bo", label="start")
    axis.set(xlabel="x (m)", ylabel="z (m)", aspect="equal", title="evaluation flight, side view")
    axis.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(folder / "flight.png", dpi=100)
    plt.close(figure)


@torch.inference_mode()
def evaluate(
    agent: Agent,
    envs: NormalizeObservation,
    episodes: int,
    seed: int,
    video_folder: Path | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fly the deterministic (mean) policy; return per-episode returns and mean tracking errors (m).

    Every drone flies its first episode after a reset, in rounds, until `episodes` are done; the
    episodes counted are those of the lowest-numbered drones, not the first to finish (that would
    favour crashes). Returns are the environment's own rewards (no attitude penalty). The eval envs
    are reseeded on every call, so an evaluation after training and one of the saved checkpoint
    fly the same drones from the same starts. The tracking errors are NaN for envs without a
    reference trajectory.
    """
    returns, errors = [], []
    reference = getattr(envs.unwrapped, "trajectory", None)
    frames, path = [], []
    frame_stride = max(1, round(envs.unwrapped.freq / 25))  # videos at about 25 frames/s
    device = envs.mean.device
    for round_index in range(math.ceil(episodes / envs.num_envs)):
        obs, _ = envs.reset(seed=seed if round_index == 0 else None)
        recording = video_folder is not None and round_index == 0
        episode_return = torch.zeros(envs.num_envs, device=device)
        error_sum = torch.zeros(envs.num_envs, device=device)
        length = torch.zeros(envs.num_envs, device=device)
        flying = torch.ones(envs.num_envs, dtype=torch.bool, device=device)
        while flying.any():
            if recording:
                path.append(np.asarray(envs.unwrapped.sim.data.states.pos[0, 0]))
                if (len(path) - 1) % frame_stride == 0:
                    frames.append(render_frame(envs, reference))
            obs, _, terminated, truncated, info = envs.step(agent.deterministic_action(obs))
            # Drones whose episode is over keep flying (autoreset) but no longer count.
            episode_return += info["env_reward"] * flying
            if "tracking_error" in info:
                error_sum += info["tracking_error"] * flying
            length += flying
            if recording and (terminated[0] or truncated[0]):  # drone 0's final state
                path.append(np.asarray(envs.unwrapped.sim.data.states.pos[0, 0]))
                frames.append(render_frame(envs, reference))
                recording = False
            flying &= ~(terminated | truncated)
        returns.append(episode_return)
        errors.append(
            error_sum / length if "tracking_error" in info else torch.full_like(length, float("nan"))
        )
    if video_folder is not None:
        save_flight(video_folder, frames, envs.unwrapped.freq / frame_stride, np.array(path), reference)
    return torch.cat(returns)[:episodes].cpu().numpy(), torch.cat(errors)[:episodes].cpu().numpy()


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: str, env_id: str) -> dict:
    """Load and check a checkpoint of this script for `env_id`; fail with one line otherwise."""
    if not Path(path).is_file():
        fail(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        fail(f"{path} is not a readable checkpoint ({type(error).__name__}); it may be truncated")
    if not isinstance(checkpoint, dict) or "script" not in checkpoint:
        fail(f"{path} is not a checkpoint of this project")
    if checkpoint["script"] != SCRIPT:
        fail(f"{path} was saved by {checkpoint['script']}.py, not {SCRIPT}.py")
    if checkpoint["env_id"] != env_id:
        fail(
            f"{path} was saved for {checkpoint['env_id']}, not {env_id}; pass --env-id {checkpoint['env_id']}"
        )
    return checkpoint


def seed_everything(seed: int, torch_deterministic: bool) -> None:
    """Seed the Python, NumPy and torch generators (the simulation's JAX key is seeded at reset)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic
    torch.backends.cudnn.benchmark = not torch_deterministic


def pick_device(want_cuda: bool) -> torch.device:
    if want_cuda and torch.cuda.is_available():
        return torch.device("cuda")
    if want_cuda:
        print("note: no CUDA device found, training on the CPU", file=sys.stderr)
    return torch.device("cpu")


def pick_jax_device(torch_device: torch.device) -> str:
    """Simulate where the networks run, so that JAX arrays reach torch without a device copy."""
    if torch_device.type == "cuda":
        try:
            jax.devices("gpu")
            return "gpu"
        except RuntimeError:
            print("note: JAX sees no GPU, simulating on the CPU", file=sys.stderr)
    return "cpu"


def build_agent(envs: VectorEnv, hidden_size: int, device: torch.device) -> Agent:
    obs_dim = envs.single_observation_space.shape[0]
    action_dim = envs.single_action_space.shape[0]
    return Agent(obs_dim, action_dim, hidden_size).to(device)


# Flags that may differ between a run and its resumption; every other setting must match the
# checkpoint's, or the resumed run would silently be a different experiment.
RESUME_MAY_CHANGE = {
    "total_timesteps", "resume", "eval_checkpoint", "eval_episodes", "n_eval_envs", "cuda", "track",
    "wandb_project_name", "wandb_entity", "capture_video", "save_model", "checkpoint_freq",
}  # fmt: skip


def check_resume_args(args: Args, saved_args: dict) -> None:
    for name, saved in saved_args.items():
        current = getattr(args, name, saved)
        if name not in RESUME_MAY_CHANGE and current != saved:
            flag = "--" + name.replace("_", "-")
            fail(
                f"{flag} is {current!r} but the checkpoint was trained with {saved!r}; resume with the same settings"
            )


# The evaluation drones start from their own seed, the same after training and for a checkpoint.
EVAL_SEED_OFFSET = 10_000


def eval_summary(returns: np.ndarray, errors: np.ndarray) -> str:
    summary = f"return {returns.mean():.2f} ± {returns.std():.2f} over {len(returns)} episodes"
    if not np.isnan(errors).all():
        summary += f", tracking error {errors.mean():.3f} m"
    return summary


def evaluate_checkpoint(args: Args) -> None:
    """--eval-checkpoint: rebuild agent and observation statistics from the checkpoint, then fly.

    The control frequency and the yaw setting come from the checkpoint (the policy was trained for
    them); the episode length, the number of evaluation drones and the seed from the command line.
    """
    checkpoint = load_checkpoint(args.eval_checkpoint, args.env_id)
    saved = checkpoint["args"]
    device = pick_device(args.cuda)
    eval_args = replace(args, env_freq=saved["env_freq"], zero_yaw=saved["zero_yaw"])
    envs = make_envs(eval_args, args.n_eval_envs, pick_jax_device(device), device)
    envs.load_state_dict(checkpoint["obs_rms"])
    envs.update_stats = False
    agent = build_agent(envs, saved["hidden_size"], device)
    agent.load_state_dict(checkpoint["model"])
    video_folder = Path("videos") / checkpoint["run_name"] / "eval-checkpoint" if args.capture_video else None
    returns, errors = evaluate(agent, envs, args.eval_episodes, args.seed + EVAL_SEED_OFFSET, video_folder)
    envs.close()
    print(f"eval: {eval_summary(returns, errors)} ({args.eval_checkpoint})")


class InterruptFlag:
    """First Ctrl-C asks the loop to stop after the iteration (and save); a second aborts."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nstopping after this iteration (Ctrl-C again to abort without saving)",
            file=sys.stderr,
        )


def main(args: Args) -> None:
    validate(args)
    if args.eval_checkpoint:
        evaluate_checkpoint(args)
        return

    checkpoint = load_checkpoint(args.resume, args.env_id) if args.resume else None
    if checkpoint is not None:
        check_resume_args(args, checkpoint["args"])
        run_name = checkpoint["run_name"]
        start_iteration = checkpoint["iteration"] + 1
        global_step = checkpoint["global_step"]
    else:
        run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
        start_iteration, global_step = 1, 0
    run_dir = Path("runs") / run_name
    checkpoint_path = run_dir / f"{args.exp_name}.pt"

    if args.track:
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            save_code=True,
        )
    writer = SummaryWriter(str(run_dir))
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n" + "\n".join(f"|{key}|{value}|" for key, value in vars(args).items()),
    )

    # A resumed run reseeds with an offset so it does not replay the random stream of its start.
    seed = args.seed + (start_iteration - 1)
    seed_everything(seed, args.torch_deterministic)
    device = pick_device(args.cuda)
    jax_device = pick_jax_device(device)
    # A 64-unit MLP is too small to gain from intra-op threads: on the CPU their synchronisation
    # costs more than the arithmetic (measured: one PPO update took 5 s with 1 thread, 41-77 s
    # with 2 on a loaded 2-core machine). The simulation keeps JAX's own threads.
    torch.set_num_threads(1)

    envs = make_envs(args, args.num_envs, jax_device, device)
    agent = build_agent(envs, args.hidden_size, device)
    optimizer = torch.optim.AdamW(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    if checkpoint is not None:
        try:
            agent.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            envs.load_state_dict(checkpoint["obs_rms"])
        except (RuntimeError, ValueError, KeyError) as error:
            fail(f"{args.resume} does not match these args ({str(error).splitlines()[0]})")

    def training_state(iteration: int) -> dict:
        return {
            "script": SCRIPT,
            "env_id": args.env_id,
            "run_name": run_name,
            "args": asdict(args),
            "global_step": global_step,
            "iteration": iteration,
            "model": agent.state_dict(),
            "optimizer": optimizer.state_dict(),
            "obs_rms": envs.state_dict(),
        }

    # Rollout storage, preallocated on the device: no per-step Python lists of tensors.
    obs_dim, action_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    shape = (args.num_steps, args.num_envs)
    obs = torch.zeros((*shape, obs_dim), device=device)
    actions = torch.zeros((*shape, action_dim), device=device)
    logprobs = torch.zeros(shape, device=device)
    rewards = torch.zeros(shape, device=device)
    env_rewards = torch.zeros(shape, device=device)
    errors = torch.zeros(shape, device=device)
    terminated = torch.zeros(shape, dtype=torch.bool, device=device)
    episode_ended = torch.zeros(shape, dtype=torch.bool, device=device)
    valid = torch.zeros(shape, dtype=torch.bool, device=device)
    values = torch.zeros((args.num_steps + 1, args.num_envs), device=device)

    # Seeding the reset seeds the simulation's JAX random key (crazyflow's Sim.seed), which then
    # draws every drone's start and every later autoreset.
    next_obs, _ = envs.reset(seed=seed)
    # True where the env's previous step ended an episode: its next step is the autoreset step.
    next_is_autoreset = torch.zeros(args.num_envs, dtype=torch.bool, device=device)
    # Running true (unshaped) return and length of every drone's current episode.
    episode_return = torch.zeros(args.num_envs, device=device)
    episode_length = torch.zeros(args.num_envs, device=device)

    recent_returns: list[float] = []
    interrupt = InterruptFlag()
    start_time = time.time()
    start_step = global_step
    progress = tqdm(
        total=args.num_iterations * args.batch_size,
        initial=global_step,
        unit="step",
        dynamic_ncols=True,
    )
    iteration = start_iteration - 1
    for iteration in range(start_iteration, args.num_iterations + 1):
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = linear_schedule(
                args.learning_rate, iteration, args.num_iterations, args.lr_final_fraction
            )
        finished_return, finished_length, finished = 0.0, 0.0, 0

        for step in range(args.num_steps):
            global_step += args.num_envs
            obs[step] = next_obs
            # crazyflow autoresets on the step *after* an episode ends: that step returns the reset
            # observation with a plausible-looking reward and no done flag, so nothing in the env's
            # output marks it. It is not a transition (its observation is the previous episode's
            # last), so it is kept out of the update (valid = False) and out of the returns.
            valid[step] = ~next_is_autoreset
            with torch.inference_mode():
                action, logprob, _, value = agent.get_action_and_value(next_obs)
            values[step] = value
            actions[step] = action
            logprobs[step] = logprob

            next_obs, reward, term, trunc, info = envs.step(action)
            rewards[step] = reward
            env_rewards[step] = info["env_reward"]
            if "tracking_error" in info:
                errors[step] = info["tracking_error"]
            terminated[step] = term
            next_is_autoreset = term | trunc
            episode_ended[step] = next_is_autoreset

            episode_return += info["env_reward"] * valid[step]
            episode_length += valid[step]
            finished_return += (episode_return * next_is_autoreset).sum()
            finished_length += (episode_length * next_is_autoreset).sum()
            finished += next_is_autoreset.sum()
            episode_return *= ~next_is_autoreset
            episode_length *= ~next_is_autoreset

        with torch.inference_mode():
            # After the last step: V(next obs), which is V(final obs) where an episode just ended.
            values[args.num_steps] = agent.get_value(next_obs)
            advantages, returns = compute_gae(
                rewards, values, terminated, episode_ended, args.gamma, args.gae_lambda
            )

        # Flatten the rollout and drop the autoreset steps.
        keep = valid.reshape(-1)
        b_obs = obs.reshape(-1, obs_dim)[keep]
        b_actions = actions.reshape(-1, action_dim)[keep]
        b_logprobs = logprobs.reshape(-1)[keep]
        b_advantages = advantages.reshape(-1)[keep]
        b_returns = returns.reshape(-1)[keep]
        b_values = values[:-1].reshape(-1)[keep]

        stats = update(
            agent, optimizer, args, b_obs, b_actions, b_logprobs, b_advantages, b_returns, b_values
        )
        if not stats["finite"]:
            nan_path = run_dir / f"{args.exp_name}_nan.pt"
            save_checkpoint(nan_path, training_state(iteration))
            progress.close()
            print(
                f"error: loss became non-finite at step {global_step}; state saved to {nan_path}",
                file=sys.stderr,
            )
            sys.exit(1)

        sps = int((global_step - start_step) / (time.time() - start_time))
        # Finished episodes are logged as one mean per iteration: with a thousand drones that
        # start together, hundreds of episodes end on the same step.
        if finished:
            mean_return = float(finished_return / finished)
            writer.add_scalar("charts/episodic_return", mean_return, global_step)
            writer.add_scalar("charts/episodic_length", float(finished_length / finished), global_step)
            recent_returns = (recent_returns + [mean_return])[-5:]
        # Reward and tracking error per valid step: steadier learning curves than the returns,
        # which arrive in bursts and lag the policy.
        writer.add_scalar("charts/reward_per_step", env_rewards[valid].mean().item(), global_step)
        if "tracking_error" in info:
            writer.add_scalar("charts/tracking_error", errors[valid].mean().item(), global_step)
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        writer.add_scalar("charts/SPS", sps, global_step)
        for key in (
            "policy_loss",
            "value_loss",
            "entropy",
            "old_approx_kl",
            "approx_kl",
            "clipfrac",
            "ratio_mean",
            "ratio_max",
        ):
            writer.add_scalar(f"losses/{key}", stats[key], global_step)
        writer.add_scalar("losses/explained_variance", explained_variance(b_values, b_returns), global_step)
        if iteration % 10 == 1:
            writer.add_histogram("losses/advantages", b_advantages, global_step)

        progress.update(args.batch_size)
        if recent_returns:
            progress.set_postfix(sps=sps, ret=f"{np.mean(recent_returns):.1f}", refresh=False)

        if (
            args.save_model
            and args.checkpoint_freq
            and global_step // args.checkpoint_freq != (global_step - args.batch_size) // args.checkpoint_freq
        ):
            save_checkpoint(checkpoint_path, training_state(iteration))
        if interrupt.requested:
            break
    progress.close()

    if args.save_model:
        save_checkpoint(checkpoint_path, training_state(iteration))
    if interrupt.requested:
        writer.close()
        where = (
            f": checkpoint saved to {checkpoint_path} (continue with --resume {checkpoint_path})"
            if args.save_model
            else ""
        )
        print(f"interrupted at step {global_step}{where}", file=sys.stderr)
        sys.exit(130)

    # Separate evaluation drones, with the training statistics copied in and frozen.
    eval_envs = make_envs(args, args.n_eval_envs, jax_device, device)
    sync_envs(envs, eval_envs)
    video_folder = Path("videos") / run_name / "eval" if args.capture_video else None
    eval_returns, eval_errors = evaluate(
        agent, eval_envs, args.eval_episodes, args.seed + EVAL_SEED_OFFSET, video_folder
    )
    envs.close()
    eval_envs.close()
    for episode, episode_return in enumerate(eval_returns):
        writer.add_scalar("eval/episodic_return", episode_return, episode)
        if not np.isnan(eval_errors[episode]):
            writer.add_scalar("eval/tracking_error", eval_errors[episode], episode)
    writer.close()
    if args.track:
        import wandb

        wandb.finish()
    elapsed = time.time() - start_time
    saved = f"; checkpoint {checkpoint_path}" if args.save_model else ""
    print(
        f"done: {global_step} steps in {elapsed:.1f}s "
        f"({(global_step - start_step) / elapsed:.0f} steps/s); "
        f"eval {eval_summary(eval_returns, eval_errors)}{saved}"
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
