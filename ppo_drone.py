"""Proximal Policy Optimisation (Gaussian policy, GAE) flying a quadrotor along a figure-eight.

A continuous-action PPO agent on crazyflow's DroneFigureEightTrajectory-v0, a JAX simulation of the
Crazyflie that steps a thousand drones in one call. The policy commands roll, pitch and thrust (yaw
held at 0) and is rewarded for staying close to a point that moves along the figure-eight; separate
tanh actor and critic MLPs, a state-independent log-std and running observation normalisation.

Run:
    python ppo_drone.py                                              # train, evaluate, save
    python ppo_drone.py --resume runs/<run>/ppo_drone.pt             # continue a stopped run
    python ppo_drone.py --eval-checkpoint runs/<run>/ppo_drone.pt --capture-video  # mp4 and plot
    python ppo_drone.py --eval-checkpoint runs/<run>/checkpoints     # the evaluation curve

Expect: the deterministic policy flies the whole 10 s figure-eight without a crash, ~0.03 m RMSE
from the reference, after a minute and a half on a 2-core CPU; README.md has the measured results.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
import signal
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NoReturn

# crazyflow must be imported before anything that imports scipy. MuJoCo's MJX prints a notice
# about its optional `warp` backend at import; it is irrelevant here and would only be noise.
with contextlib.redirect_stdout(io.StringIO()):
    import crazyflow  # noqa: F401  (registers the Drone*-v0 environments)
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn as nn
import tyro
from crazyflow.envs import NormalizeActions
from gymnasium.vector import VectorEnv, VectorWrapper
from gymnasium.vector.utils import batch_space
from gymnasium.wrappers.vector import JaxToTorch
from jax.scipy.spatial.transform import Rotation
from torch.distributions import Normal
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

# crazyflow simulates at 500 Hz and runs SIM_FREQ / env_freq physics steps per env step.
SIM_FREQ = 500
# Position of the yaw command in crazyflow's attitude command (roll, pitch, yaw, thrust).
YAW = 2


@dataclass
class Args:
    exp_name: str = Path(__file__).stem
    """name of this experiment (part of the run name and of the checkpoint file name)"""
    seed: int = 1
    """seed of random, NumPy, torch and the simulation's JAX random key"""
    torch_deterministic: bool = True
    """make cuDNN deterministic (cudnn.deterministic=True, cudnn.benchmark=False)"""
    cuda: bool = True
    """use a GPU when one is present, for the simulation (JAX) and the networks (torch)"""
    torch_threads: int = 2
    """CPU threads for torch (the simulation keeps JAX's own threads)"""
    track: bool = False
    """log the run to Weights & Biases (works offline with WANDB_MODE=offline)"""
    wandb_project_name: str = "rl-scripts"
    """the W&B project"""
    wandb_entity: str | None = None
    """the W&B entity (team or user); None uses your default"""
    capture_video: bool = False
    """render one evaluation flight to mp4 and plot its path (PNG) under videos/<run_name>/"""

    env_id: str = "DroneFigureEightTrajectory-v0"
    """a crazyflow environment (DroneFigureEightTrajectory-v0, DroneReachPos-v0, ...)"""
    # 2M rather than 1.6M: with 1.6M, 3 of 10 seeds were still short of 480 (README.md).
    total_timesteps: int = 2_000_000
    """environment steps to train for (summed over the drones)"""
    env_freq: int = 50
    """control frequency in Hz (crazyflow's default is 500, the rate its simulation runs at)"""
    max_episode_time: float = 10.0
    """episode length in seconds before truncation (--eval-checkpoint may change it)"""
    num_envs: int = 1024
    """number of drones simulated in parallel for training"""
    num_eval_envs: int = 64
    """number of drones simulated in parallel for evaluation (each flies its first episode)"""
    attitude_coef: float = 0.08
    """training reward -= this x |(roll, pitch, yaw)| (rad): discourages aggressive attitudes"""
    zero_yaw: bool = True
    """hold the yaw command at 0 and leave it out of the policy (the figure-eight needs no yaw)"""
    learning_rate: float = 1.5e-3
    """AdamW learning rate (decayed linearly with --anneal-lr)"""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay, on every parameter (0: plain Adam)"""
    anneal_lr: bool = True
    """decay the learning rate linearly over training to --lr-final-fraction of its start"""
    lr_final_fraction: float = 0.2
    """fraction of --learning-rate reached at the end of training when --anneal-lr is on"""
    num_steps: int = 16
    """steps per environment in each rollout"""
    gamma: float = 0.9
    """discount factor (at 50 Hz, an effective horizon of about 0.2 s of flight)"""
    gae_lambda: float = 0.95
    """lambda of generalised advantage estimation"""
    # 10 epochs of 8 minibatches rather than the course's 15 of 16: the update is most of the time
    # on a CPU, and a third of the gradient steps flies as well (benchmarks/README.md).
    num_minibatches: int = 8
    """minibatches per epoch (must divide num_envs * num_steps)"""
    update_epochs: int = 10
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

    # The run around the algorithm: checkpoints, resuming, logging, evaluation.
    wandb_group: str | None = None
    """W&B group, so the seeds of one experiment plot together (default: --exp-name)"""
    save_model: bool = True
    """save the checkpoint runs/<run_name>/<exp_name>.pt (at the end, periodically, on a signal)"""
    checkpoint_freq: int = 200_000
    """also checkpoint every this many env steps, each kept in runs/<run>/checkpoints/ (0: off)"""
    log_interval: int = 16_384
    """write the loss statistics every this many environment steps"""
    resume: str | None = None
    """path of a checkpoint to continue training from (with the checkpoint's settings)"""
    eval_checkpoint: str | None = None
    """a checkpoint to evaluate, or a folder of them to draw the evaluation curve of; then exit"""
    eval_episodes: int = 10
    """episodes of the final deterministic evaluation and of --eval-checkpoint"""

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_iterations(self) -> int:
        return max(1, self.total_timesteps // self.batch_size)


@jax.jit
def attitude_norm(quat: jax.Array) -> jax.Array:
    """|(roll, pitch, yaw)| in radians of scalar-last quaternions (crazyflow's convention)."""
    return jnp.linalg.norm(Rotation.from_quat(quat).as_euler("xyz"), axis=-1)


def crazyflow_vector_env(args: Args, num_envs: int, jax_device: str) -> VectorEnv:
    """crazyflow's vector env of `num_envs` drones; settings it cannot build, or an action space
    this script cannot drive, fail in one line."""
    import mujoco

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
    space = envs.single_action_space
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        fail(f"{args.env_id} actions are {space}; this script needs a 1-D Box")
    if args.zero_yaw and space.shape != (4,):
        fail(
            f"--zero-yaw needs the 4-number attitude command; {args.env_id} takes {space} "
            "(pass --no-zero-yaw)"
        )
    return envs


# The JAX side of DroneTask, compiled: one XLA program a step rather than one call per operation.
@jax.jit
def flatten_observation(obs: dict[str, jax.Array]) -> jax.Array:
    """Concatenate the dict's entries per drone, in gymnasium's (sorted) key order."""
    return jnp.concatenate([obs[key].reshape(obs[key].shape[0], -1) for key in sorted(obs)], -1)


@jax.jit
def tracking_error(obs: dict[str, jax.Array]) -> jax.Array:
    """Distance (m) to the reference point the reward is measured against: the first three numbers
    of `local_samples` are the position error to the trajectory point of the step's reward."""
    return jnp.linalg.norm(obs["local_samples"][:, :3], axis=-1)


@jax.jit
def insert_zero_yaw(actions: jax.Array) -> jax.Array:
    """(roll, pitch, thrust) -> (roll, pitch, 0, thrust): a yaw command of 0 rad."""
    return jnp.insert(actions, YAW, 0.0, axis=-1)


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
        self.zero_yaw = zero_yaw
        if zero_yaw:
            # The yaw command leaves the action space, so the policy neither samples nor scores it:
            # a dimension the env ignores would still feed the entropy bonus, which alone would
            # drive its std up and inflate the logged entropy, ratio, KL and clip fraction.
            low, high = env.single_action_space.low, env.single_action_space.high
            self.single_action_space = gym.spaces.Box(np.delete(low, YAW), np.delete(high, YAW))
            self.action_space = batch_space(self.single_action_space, self.num_envs)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        return flatten_observation(obs), info

    def step(self, actions: jax.Array):
        obs, reward, terminated, truncated, info = self.env.step(
            insert_zero_yaw(actions) if self.zero_yaw else actions
        )
        info = {**info, "env_reward": reward}
        if self.has_trajectory:
            info["tracking_error"] = tracking_error(obs)
        if self.attitude_coef:
            reward = reward - self.attitude_coef * attitude_norm(obs["quat"])
        return flatten_observation(obs), reward, terminated, truncated, info


def update_mean_var(mean: torch.Tensor, var: torch.Tensor, count: float, batch: torch.Tensor):
    """Merge a batch's moments into running (mean, var, count): Chan et al.'s parallel update."""
    batch_mean, batch_var, batch_count = batch.mean(0), batch.var(0, unbiased=False), len(batch)
    delta = batch_mean - mean
    total = count + batch_count
    new_mean = mean + delta * batch_count / total
    m2 = var * count + batch_var * batch_count + delta.square() * count * batch_count / total
    return new_mean, m2 / total, total


class NormalizeObservation(VectorWrapper):
    """Running mean/std normalisation of torch observations, with statistics that can be frozen.

    The statistics are updated from every observation while `update_stats` is on (training). The
    checkpoint carries them, and evaluation restores them frozen: a policy only flies well on
    inputs scaled as in its training.
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

    def freeze(self, state: dict) -> None:
        """Normalise with the statistics `state` from now on, without updating them: evaluation
        scales a policy's inputs as its training did."""
        self.load_state_dict(state)
        self.update_stats = False


def make_envs(args: Args, num_envs: int, jax_device: str, device: torch.device):
    """All drones in one JAX simulation, seen from torch with normalised flat observations.

    crazyflow's envs are natively vectorised (`vector_entry_point`): one `step` advances every
    drone. They autoreset on the *next* step (metadata NEXT_STEP, no SAME_STEP option): the step
    after an episode ends returns the reset observation with a plausible reward and no done flag;
    `main` masks those steps out of the rollout.
    """
    envs = crazyflow_vector_env(args, num_envs, jax_device)
    envs = NormalizeActions(envs)  # the policy's [-1, 1] onto the attitude command's range
    envs = DroneTask(envs, args.attitude_coef, args.zero_yaw)
    envs = JaxToTorch(envs, device=device)
    # Running mean/std normalisation of the observations (NormalizeObservation, after the banner);
    # the checkpoint carries its statistics, and evaluation restores them frozen.
    return NormalizeObservation(envs, device)


# Copied from ppo_cartpole.py: layer_init
def layer_init(layer: nn.Linear, gain: float = np.sqrt(2), bias: float = 0.0) -> nn.Linear:
    """Orthogonal weights and constant bias: keeps activations well-scaled through tanh layers."""
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.constant_(layer.bias, bias)
    return layer


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
        """Sample an action (or score a given one): action, log-prob, entropy, value. The action
        dimensions are independent: log-prob and entropy are sums over them."""
        distribution = Normal(self.actor_mean(obs), self.actor_logstd.exp(), validate_args=False)
        if action is None:
            action = distribution.sample()
        log_prob, entropy = distribution.log_prob(action).sum(-1), distribution.entropy().sum(-1)
        return action, log_prob, entropy, self.get_value(obs)

    def deterministic_action(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor_mean(obs)


# Copied from ppo_cartpole.py: compute_gae
def compute_gae(rewards, values, terminated, episode_ended, gamma: float, gae_lambda: float):
    """Generalised advantage estimation over a (T, N) rollout; returns (advantages, returns).

    `values` has T + 1 rows, the last being V(observation after the final step). With next-step
    autoreset that is V(final obs) exactly where a *truncated* episode must be bootstrapped, so
    `terminated` (the MDP ended) removes the bootstrap term, while `episode_ended` (terminated or
    truncated) only stops the recursion: credit never flows across an episode boundary. The
    autoreset step after an episode gets a meaningless advantage; the caller drops it.
    """
    num_steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[0])
    for t in reversed(range(num_steps)):
        not_terminal = (~terminated[t]).to(rewards.dtype)
        continues = (~episode_ended[t]).to(rewards.dtype)
        delta = rewards[t] + gamma * values[t + 1] * not_terminal - values[t]
        next_advantage = delta + gamma * gae_lambda * continues * next_advantage
        advantages[t] = next_advantage
    return advantages, advantages + values[:-1]


# Copied from ppo_cartpole.py: ppo_loss
def ppo_loss(new_logprobs, old_logprobs, advantages, new_values, old_values, returns,
             clip_coef: float, clip_vloss: bool):  # fmt: skip
    """Clipped surrogate policy loss and (optionally clipped) value loss; also the ratio.

    The policy loss is the negated PPO objective max(-A r, -A clip(r, 1 - eps, 1 + eps)): a
    pessimistic bound that removes the incentive to move the ratio r outside [1 - eps, 1 + eps].
    """
    ratio = (new_logprobs - old_logprobs).exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_coef, 1.0 + clip_coef)
    policy_loss = torch.max(unclipped, clipped).mean()
    if clip_vloss:
        values_clipped = old_values + (new_values - old_values).clamp(-clip_coef, clip_coef)
        squared_errors = torch.max((new_values - returns) ** 2, (values_clipped - returns) ** 2)
        value_loss = 0.5 * squared_errors.mean()
    else:
        value_loss = 0.5 * ((new_values - returns) ** 2).mean()
    return policy_loss, value_loss, ratio


def linear_schedule(start: float, iteration: int, num_iterations: int, final_fraction: float):
    """Value at 1-based `iteration` of a linear decay from `start` to `final_fraction * start`."""
    return start * (1.0 - (1.0 - final_fraction) * (iteration - 1.0) / num_iterations)


# Copied from ppo_cartpole.py: update
def update(agent, optimizer, args, b_obs, b_actions, b_logprobs, b_advantages, b_returns, b_values):
    """Several epochs of minibatch PPO over one rollout; returns the last minibatch's statistics
    and whether the losses and the weights stayed finite."""
    batch = len(b_obs)
    if batch == 0:
        return {"finite": True}  # every step of a tiny rollout was an autoreset step
    clipfracs, stats = [], {}
    for _epoch in range(args.update_epochs):
        permutation = torch.randperm(batch, device=b_obs.device)
        for minibatch in permutation.tensor_split(args.num_minibatches):
            # Dropping the autoreset steps can leave fewer samples than minibatches: an empty
            # minibatch has no mean loss (NaN), so it is skipped.
            if len(minibatch) == 0:
                continue
            _, new_logprob, entropy, new_value = agent.get_action_and_value(
                b_obs[minibatch], b_actions[minibatch]
            )
            log_ratio = new_logprob - b_logprobs[minibatch]
            advantages = b_advantages[minibatch]
            if args.norm_adv and len(advantages) > 1:  # one advantage has no spread (std NaN)
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
                # Schulman's KL(old || new) estimators: the second is unbiased, with less variance.
                stats = {
                    "policy_loss": policy_loss.item(),
                    "value_loss": value_loss.item(),
                    "entropy": entropy_loss.item(),
                    "old_approx_kl": (-log_ratio).mean().item(),
                    "approx_kl": ((ratio - 1) - log_ratio).mean().item(),
                    "ratio_mean": ratio.mean().item(),
                    "ratio_max": ratio.max().item(),
                }
                clipfracs.append(((ratio - 1.0).abs() > args.clip_coef).float().mean().item())
        if args.target_kl is not None and stats["approx_kl"] > args.target_kl:
            break
    stats["clipfrac"] = float(np.mean(clipfracs))
    stats["explained_variance"] = explained_variance(b_values, b_returns)
    stats["finite"] = all(parameter.isfinite().all() for parameter in agent.parameters())
    return stats


def main(args: Args) -> None:
    validate(args)
    if args.eval_checkpoint:
        return evaluate_checkpoint(args)
    # The run's name, loggers, progress bar and stop signals; with --resume, the saved state.
    run = Run(args, total_steps=args.num_iterations * args.batch_size)
    global_step, start_iteration = run.start_step, run.start_step // args.batch_size + 1
    # A resumed run reseeds with an offset so it does not replay the random stream of its start.
    seed = training_seed(args.seed, start_iteration - 1, args.num_envs)
    seed_everything(seed, args.torch_deterministic)
    device = pick_device(args.cuda, args.torch_threads)
    jax_device = pick_jax_device(device)

    envs = make_envs(args, args.num_envs, jax_device, device)
    obs_dim, action_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    agent = Agent(obs_dim, action_dim, args.hidden_size).to(device)
    # eps=1e-5 rather than 1e-8, as in the reference PPO implementation. The weight decay is on
    # every parameter: on the log-std it is a slight pull towards std 1.
    optimizer = torch.optim.AdamW(
        agent.parameters(), lr=args.learning_rate, eps=1e-5, weight_decay=args.weight_decay
    )
    run.restore(model=agent, optimizer=optimizer, obs_rms=envs)  # with --resume

    def training_state() -> dict:
        return {
            "kind": CHECKPOINT_KIND,
            "env_id": args.env_id,
            "run_name": run.name,
            "args": asdict(args),
            "global_step": global_step,
            "model": agent.state_dict(),
            "optimizer": optimizer.state_dict(),
            "obs_rms": envs.state_dict(),
        }

    # Rollout storage, preallocated on the device: the envs hand torch tensors over as they are.
    shape = (args.num_steps, args.num_envs)
    obs = torch.zeros((*shape, obs_dim), device=device)
    actions = torch.zeros((*shape, action_dim), device=device)
    logprobs, rewards = torch.zeros(shape, device=device), torch.zeros(shape, device=device)
    terminated, episode_ended, valid = (
        torch.zeros(shape, dtype=torch.bool, device=device) for _ in range(3)
    )
    values = torch.zeros((args.num_steps + 1, args.num_envs), device=device)

    # Seeding the reset seeds the simulation's JAX random key (crazyflow's Sim.seed), which then
    # draws every drone's start and every later autoreset. A resumed run restarts every flight; an
    # uninterrupted run would not have seen these starts, so they stay out of the statistics.
    envs.update_stats = run.resumed is None
    next_obs, _ = envs.reset(seed=seed)
    envs.update_stats = True
    # True where the env's previous step ended an episode: its next step is the autoreset step.
    next_is_autoreset = torch.zeros(args.num_envs, dtype=torch.bool, device=device)
    flights = FlightStats(args.num_envs, device)

    for iteration in range(start_iteration, args.num_iterations + 1):
        previous_step = global_step
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = linear_schedule(
                args.learning_rate, iteration, args.num_iterations, args.lr_final_fraction
            )

        for step in range(args.num_steps):
            global_step += args.num_envs
            obs[step] = next_obs
            # crazyflow autoresets on the step *after* an episode ends: that step returns the reset
            # observation with a plausible-looking reward and no done flag, so nothing in the env's
            # output marks it. It is not a transition (its observation is the previous episode's
            # last), so it is kept out of the update (valid = False) and out of the returns.
            valid[step] = ~next_is_autoreset
            with torch.inference_mode():
                action, logprobs[step], _, values[step] = agent.get_action_and_value(next_obs)
            actions[step] = action
            next_obs, rewards[step], terminated[step], truncated, info = envs.step(action)
            next_is_autoreset = episode_ended[step] = terminated[step] | truncated
            flights.step(info, valid[step], next_is_autoreset)

        with torch.inference_mode():
            # After the last step: V(next obs), which is V(final obs) where an episode just ended.
            values[args.num_steps] = agent.get_value(next_obs)
            advantages, returns = compute_gae(
                rewards, values, terminated, episode_ended, args.gamma, args.gae_lambda
            )

        # Flatten the rollout and drop the autoreset steps.
        keep = valid.reshape(-1)
        b_obs, b_actions, b_logprobs, b_advantages, b_returns, b_values = (
            tensor.flatten(0, 1)[keep]
            for tensor in (obs, actions, logprobs, advantages, returns, values[:-1])
        )
        stats = update(
            agent, optimizer, args, b_obs, b_actions, b_logprobs, b_advantages, b_returns, b_values
        )

        # The iteration's finished episodes as one mean: with a thousand drones that start
        # together, hundreds of episodes end on the same step.
        finished, scalars = flights.summary()
        if finished is not None:
            run.log_episode(*finished, global_step)
        # Logging, the NaN check, the progress bar, checkpoints and stop signals.
        scalars |= {f"losses/{key}": value for key, value in stats.items() if key != "finite"}
        scalars["charts/learning_rate"] = optimizer.param_groups[0]["lr"]
        histograms = {"losses/advantages": b_advantages}
        if run.end_iteration(
            global_step, previous_step, scalars, training_state, stats["finite"], histograms
        ):
            break
    envs.close()

    def final_evaluation(video_folder: str | None) -> tuple[dict[str, np.ndarray], str]:
        """The deterministic policy on new drones, from starts that training never flew."""
        with collection_paused():  # so that a signal ends the evaluation (see collection_paused)
            eval_envs = make_envs(args, args.num_eval_envs, jax_device, device)
            eval_envs.freeze(envs.state_dict())  # the training statistics, no longer updated
            eval_seed = args.seed + EVAL_SEED_OFFSET
            returns, errors, rmses = evaluate(
                agent.deterministic_action, eval_envs, args.eval_episodes, eval_seed, video_folder
            )
            eval_envs.close()
        per_episode = {"eval/episodic_return": returns, "eval/tracking_error": errors}
        per_episode["eval/tracking_rmse"] = rmses
        return per_episode, eval_summary(returns) + tracking_summary(errors, rmses)

    # Save, evaluate, summarise; after Ctrl-C or SIGTERM, exit 130 or 143 instead.
    run.finish(training_state(), global_step, final_evaluation)


# ----------------------------------------------------------------------------------------------
# Plumbing: validation, evaluation of a checkpoint, checkpoint files, logging and stop signals.
# A first reading can stop here: nothing below changes what is learned or delivered.
# ----------------------------------------------------------------------------------------------

# Checkpoints say what they hold by this kind, not by the script's file name, so a renamed copy of
# this script still loads its own checkpoints.
CHECKPOINT_KIND = "ppo-gaussian-mlp/3"
# Earlier kinds with the same network: evaluated, but not resumed (their optimiser state differs).
EVALUATED_KINDS = ("ppo-gaussian-mlp/2",)
CHECKPOINT_SUFFIX = ".pt"


# Copied from ppo_cartpole.py: EVAL_SEED_OFFSET
EVAL_SEED_OFFSET = 10_000  # evaluation envs get seed + this: episodes that training never saw


# Copied from ppo_cartpole.py: training_seed
def training_seed(seed: int, resume_offset: int, num_envs: int) -> int:
    """The training envs' seed (env i gets it + i). A resumed run starts its stream at an offset so
    as not to replay its start's, taken modulo so that every training env's seed stays below
    seed + EVAL_SEED_OFFSET whatever the budget: training never plays an evaluation's episodes."""
    return seed + resume_offset % (EVAL_SEED_OFFSET - num_envs + 1)


# Copied from ppo_cartpole.py: explained_variance
def explained_variance(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """1 - Var(targets - predictions) / Var(targets): 1 is perfect, 0 is no better than a mean."""
    if len(targets) < 2 or targets.var() == 0:  # no variance to explain
        return float("nan")
    target_variance = targets.var()
    return float(1.0 - (targets - predictions).var() / target_variance)


# Copied from ppo_cartpole.py: crossed
def crossed(every: int, step: int, previous_step: int) -> bool:
    """True when a multiple of `every` lies in (previous_step, step]: periodic work (logging,
    checkpoints) is counted in environment steps, whatever the steps per iteration."""
    return every > 0 and step // every != previous_step // every


# Copied from ppo_cartpole.py: fail
def fail(message: str) -> NoReturn:
    """Report bad input as one line on stderr and exit with status 2 (no traceback)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# Copied from ppo_cartpole.py: check_positive
def check_positive(args: Args, *names: str) -> None:
    for name in names:
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")


# Copied from ppo_cartpole.py: check_non_negative
def check_non_negative(args: Args, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")


# Copied from ppo_cartpole.py: check_fraction
def check_fraction(args: Args, *names: str) -> None:
    for name in names:
        if not 0.0 <= getattr(args, name) <= 1.0:
            fail(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")


# Copied from ppo_cartpole.py: check_seed_room
def check_seed_room(args: Args, *names: str) -> None:
    """Each stream of env seeds (training, evaluation) holds EVAL_SEED_OFFSET of them."""
    for name in names:
        if getattr(args, name) > EVAL_SEED_OFFSET:
            flag, value = f"--{name.replace('_', '-')}", getattr(args, name)
            fail(f"{flag} must be at most {EVAL_SEED_OFFSET:,} (seeds would overlap), got {value}")


def validate(args: Args) -> None:
    """Check every knob before any heavy work, so a typo costs a second, not a run."""
    check_positive(
        args, "total_timesteps", "num_envs", "num_eval_envs", "num_steps", "num_minibatches",
        "update_epochs", "env_freq", "eval_episodes", "torch_threads", "log_interval",
        "learning_rate", "clip_coef", "max_grad_norm", "hidden_size", "max_episode_time",
    )  # fmt: skip
    check_non_negative(args, "checkpoint_freq", "attitude_coef", "weight_decay")
    check_seed_room(args, "num_envs", "num_eval_envs", "eval_episodes")
    check_fraction(args, "gamma", "gae_lambda", "lr_final_fraction")
    if args.batch_size % args.num_minibatches:
        fail(
            f"--num-minibatches {args.num_minibatches} does not divide the batch of "
            f"{args.batch_size} (= num_envs {args.num_envs} x num_steps {args.num_steps})"
        )
    if SIM_FREQ % args.env_freq:
        fail(f"--env-freq {args.env_freq} must divide the simulation's {SIM_FREQ} Hz")
    if args.target_kl is not None and args.target_kl <= 0:
        fail(f"--target-kl must be positive (or omitted), got {args.target_kl}")
    if args.resume and args.eval_checkpoint:
        fail("give either --resume or --eval-checkpoint, not both")
    check_env(args.env_id)


def crazyflow_env_ids() -> list[str]:
    return sorted(
        env_id
        for env_id, spec in gym.registry.items()
        if getattr(spec.vector_entry_point, "__module__", "").startswith("crazyflow")
    )


def check_env(env_id: str) -> None:
    """Fail with suggestions for an unknown id, and with an explanation for a non-crazyflow env.
    This script drives crazyflow's JAX vector environments directly (one simulation of all drones,
    JAX arrays handed to torch), so any other environment is refused up front."""
    if env_id not in gym.registry:
        import difflib

        close = difflib.get_close_matches(env_id, list(gym.registry), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        fail(f"unknown environment id {env_id!r}{hint}")
    if env_id not in crazyflow_env_ids():
        fail(
            f"{env_id} is not a crazyflow environment; this script needs one of crazyflow's JAX "
            f"vector envs ({', '.join(crazyflow_env_ids())})"
        )


# Copied from ppo_cartpole.py: newest_checkpoint
def newest_checkpoint(folder: str) -> str:
    """The checkpoint of the latest step in `folder` (a stopped run's folder, or its kept ones)."""
    paths = sorted(str(path) for path in Path(folder).glob(f"*{CHECKPOINT_SUFFIX}"))
    if not paths:
        fail(f"{folder} holds no checkpoints (*{CHECKPOINT_SUFFIX}) to resume from")
    return max(paths, key=lambda path: load_checkpoint(path, resume=True)["global_step"])


# Copied from ppo_cartpole.py: parse_args
def parse_args(argv: list[str] | None = None) -> Args:
    """The command line as Args. With --resume or --eval-checkpoint, every flag left out takes the
    checkpoint's setting, so `--resume PATH` alone continues the run that PATH belongs to (for a
    folder of checkpoints, the settings of its first). `--resume FOLDER` continues from the
    newest checkpoint in the folder, and says which."""
    args = tyro.cli(Args, args=argv)
    newest = newest_checkpoint(args.resume) if args.resume and Path(args.resume).is_dir() else None
    path = newest or args.resume or args.eval_checkpoint
    if path is not None and Path(path).is_dir():
        path = next(iter(sorted(Path(path).glob(f"*{CHECKPOINT_SUFFIX}"))), None)
    if path is None:  # (an empty folder is reported by the evaluation of the folder)
        return args
    saved_args = load_checkpoint(path)["args"]
    known = {field.name for field in fields(Args)}
    defaults = Args(**{name: value for name, value in saved_args.items() if name in known})
    defaults.resume = defaults.eval_checkpoint = None
    args = tyro.cli(Args, args=argv, default=defaults)
    if newest is not None:
        print(f"note: resuming from {newest}, the newest checkpoint in {args.resume}",
              file=sys.stderr)  # fmt: skip
        args.resume = newest
    return args


# Flags that may differ between a run and its resumption (budget, logging, tracking, evaluation);
# every other setting must match the checkpoint's, or the resumed run would silently be a
# different experiment.
RESUME_MAY_CHANGE = {
    "total_timesteps", "resume", "eval_checkpoint", "eval_episodes", "cuda", "torch_threads",
    "track", "wandb_project_name", "wandb_entity", "wandb_group", "capture_video", "save_model",
    "checkpoint_freq", "log_interval", "num_eval_envs",
}  # fmt: skip
# Settings that shape the environment or the network the policy was trained for: --eval-checkpoint
# may not change them (the episode length, the evaluation drones and the seed may change).
MODEL_SETTINGS = {"env_id", "env_freq", "zero_yaw", "hidden_size"}


# Copied from ppo_cartpole.py: check_settings
def check_settings(args: Args, saved_args: dict, may_change: set[str]) -> None:
    """Refuse, in one line, a flag given against the checkpoint's setting. (parse_args has already
    made every flag left out equal to it; only the settings in `may_change` may differ.)"""
    for name, saved in saved_args.items():
        current = getattr(args, name, saved)
        if name not in may_change and current != saved:
            flag = "--" + name.replace("_", "-")
            fail(
                f"{flag} is {current!r} but the checkpoint was trained with {saved!r}; "
                "leave the flag out to keep the checkpoint's setting"
            )


# Copied from ppo_cartpole.py: seed_everything
def seed_everything(seed: int, torch_deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic
    torch.backends.cudnn.benchmark = not torch_deterministic


# Copied from ppo_cartpole.py: pick_device
def pick_device(want_cuda: bool, torch_threads: int) -> torch.device:
    """The GPU when asked for and present, else the CPU with a notice; `torch_threads` threads."""
    torch.set_num_threads(torch_threads)
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


# Copied from ppo_cartpole.py: restore
def restore(checkpoint: dict, path: str, **objects) -> None:
    """Load each object's saved state (model=agent, optimizer=...); a mismatch fails in one line."""
    try:
        for key, target in objects.items():
            target.load_state_dict(checkpoint[key])
    except (RuntimeError, ValueError, KeyError) as error:
        fail(f"{path} does not match this network ({str(error).splitlines()[0]})")


class FlightStats:
    """The training flights as logged: true (unshaped) episode returns and lengths, and the reward
    and tracking error per valid step, the steadier learning curves (returns arrive in bursts and
    lag the policy). Sums on the device over an iteration, read once at its end."""

    def __init__(self, num_envs: int, device: torch.device):
        self.returns = torch.zeros(num_envs, device=device)
        self.lengths = torch.zeros(num_envs, device=device)
        # Finished episodes: return, length, count; valid steps: reward, tracking error, count.
        self.sums = torch.zeros(6, device=device)
        self.has_trajectory = False

    def step(self, info: dict, counted: torch.Tensor, ended: torch.Tensor) -> None:
        reward = info["env_reward"]
        error = info.get("tracking_error", torch.zeros_like(reward))
        self.returns += reward * counted
        self.lengths += counted
        self.sums += torch.stack([
            (self.returns * ended).sum(), (self.lengths * ended).sum(), ended.sum(),
            (reward * counted).sum(), (error * counted).sum(), counted.sum(),
        ])  # fmt: skip
        self.returns *= ~ended
        self.lengths *= ~ended
        self.has_trajectory = "tracking_error" in info

    def summary(self) -> tuple[tuple[float, float] | None, dict[str, float]]:
        """Since the last call: the finished episodes' mean (return, length), or None if none
        finished, and the per-step means as scalars to log."""
        finished_return, finished_length, finished, reward, error, valid_steps = self.sums.tolist()
        self.sums.zero_()
        episode = (finished_return / finished, finished_length / finished) if finished else None
        scalars = {}
        if valid_steps:
            scalars["charts/reward_per_step"] = reward / valid_steps
            if self.has_trajectory:
                scalars["charts/tracking_error"] = error / valid_steps
        return episode, scalars


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
    return sim.render(
        mode="rgb_array", world=0, width=width, height=height, cam_config=VIDEO_CAMERA
    )


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


@contextlib.contextmanager
def collection_paused():
    """No automatic garbage collection inside. JAX runs Python code in a collection's callback
    (jax._src.lib._xla_gc_callback), and Python drops ("Exception ignored") the KeyboardInterrupt
    that a signal's handler raises there: Ctrl-C or SIGTERM would often not end an evaluation."""
    import gc

    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@torch.inference_mode()
def evaluate(
    policy: Callable[[torch.Tensor], torch.Tensor],
    envs: NormalizeObservation,
    episodes: int,
    seed: int,
    video_folder: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fly `policy` (observations -> actions); return per-episode returns, mean tracking errors (m)
    and tracking RMSEs (m): the mean and the root mean square of the distance to the reference
    point over the episode's steps. The RMSE weighs large excursions more, and is never below the
    mean.

    Every drone flies its first episode after a reset, in rounds, until `episodes` are done; the
    episodes counted are those of the lowest-numbered drones, not the first to finish (that would
    favour crashes). Returns are the environment's own rewards (no attitude penalty). The eval envs
    are reseeded on every call, so an evaluation after training and one of the saved checkpoint
    fly the same drones from the same starts. The tracking errors are NaN for envs without a
    reference trajectory.
    """
    returns, errors, rmses = [], [], []
    reference = getattr(envs.unwrapped, "trajectory", None)
    frames, path = [], []
    frame_stride = max(1, round(envs.unwrapped.freq / 25))  # videos at about 25 frames/s
    device = envs.mean.device
    for round_index in range(math.ceil(episodes / envs.num_envs)):
        obs, _ = envs.reset(seed=seed if round_index == 0 else None)
        recording = video_folder is not None and round_index == 0
        episode_return = torch.zeros(envs.num_envs, device=device)
        error_sum = torch.zeros(envs.num_envs, device=device)
        squared_error_sum = torch.zeros(envs.num_envs, device=device)
        length = torch.zeros(envs.num_envs, device=device)
        flying = torch.ones(envs.num_envs, dtype=torch.bool, device=device)
        while flying.any():
            if recording:
                path.append(np.asarray(envs.unwrapped.sim.data.states.pos[0, 0]))
                if (len(path) - 1) % frame_stride == 0:
                    frames.append(render_frame(envs, reference))
            obs, _, terminated, truncated, info = envs.step(policy(obs))
            # Drones whose episode is over keep flying (autoreset) but no longer count.
            episode_return += info["env_reward"] * flying
            if "tracking_error" in info:
                error_sum += info["tracking_error"] * flying
                squared_error_sum += info["tracking_error"] ** 2 * flying
            length += flying
            if recording and (terminated[0] or truncated[0]):  # drone 0's final state
                path.append(np.asarray(envs.unwrapped.sim.data.states.pos[0, 0]))
                frames.append(render_frame(envs, reference))
                recording = False
            flying &= ~(terminated | truncated)
        returns.append(episode_return)
        if "tracking_error" in info:
            errors.append(error_sum / length)
            rmses.append((squared_error_sum / length).sqrt())
        else:
            errors.append(torch.full_like(length, float("nan")))
            rmses.append(torch.full_like(length, float("nan")))
    if video_folder is not None:
        fps = envs.unwrapped.freq / frame_stride
        save_flight(Path(video_folder), frames, fps, np.array(path), reference)
    return tuple(torch.cat(values)[:episodes].cpu().numpy() for values in (returns, errors, rmses))


# Copied from ppo_cartpole.py: eval_summary
def eval_summary(returns: np.ndarray) -> str:
    return f"eval return {returns.mean():.2f} ± {returns.std():.2f} over {len(returns)} episodes"


def tracking_summary(errors: np.ndarray, rmses: np.ndarray) -> str:
    """What follows eval_summary's sentence where the env has a reference trajectory."""
    if np.isnan(errors).all():
        return ""
    return f", tracking error {errors.mean():.3f} m (RMSE {rmses.mean():.3f} m)"


def evaluate_checkpoint(args: Args) -> None:
    """--eval-checkpoint: rebuild the agent and its observation statistics (frozen) from the saved
    settings and fly the deterministic policy with the same evaluation seed as the end of
    training, so the figures are the same; the episode length, the number of evaluation drones and
    the seed may be given anew. Given a folder (runs/<run>/checkpoints), evaluate each checkpoint
    in it and draw the curve."""
    import functools

    # Built at the first flight, so that bad input is reported before the device notice; the same
    # drones then fly every checkpoint of a folder (compiled once).
    device = functools.cache(lambda: pick_device(args.cuda, args.torch_threads))
    envs = functools.cache(
        lambda: make_envs(args, args.num_eval_envs, pick_jax_device(device()), device())
    )
    eval_seed = args.seed + EVAL_SEED_OFFSET

    def load(path: str) -> dict:
        checkpoint = load_checkpoint(path)
        check_settings(args, checkpoint["args"], set(checkpoint["args"]) - MODEL_SETTINGS)
        return checkpoint

    def fly(checkpoint: dict | None, path: str, video: str | None = None) -> tuple[np.ndarray, ...]:
        """evaluate() of the checkpoint's deterministic policy, or of uniformly random actions."""
        obs_dim = envs().single_observation_space.shape[0]
        action_dim = envs().single_action_space.shape[0]
        if checkpoint is None:  # the same random actions on every call
            generator = torch.Generator(device()).manual_seed(eval_seed)

            def policy(obs: torch.Tensor) -> torch.Tensor:
                shape = (len(obs), action_dim)
                return torch.rand(shape, generator=generator, device=obs.device) * 2 - 1
        else:
            envs().freeze(checkpoint["obs_rms"])
            agent = Agent(obs_dim, action_dim, args.hidden_size).to(device())
            restore(checkpoint, path, model=agent)
            policy = agent.deterministic_action
        return evaluate(policy, envs(), args.eval_episodes, eval_seed, video)

    def play(checkpoint: dict | None, path: str) -> dict[str, np.ndarray]:
        returns, _, rmses = fly(checkpoint, path)
        if np.isnan(rmses).all():  # an env without a reference trajectory
            return {"return": returns}
        return {"return": returns, "tracking RMSE (m)": rmses}

    with collection_paused():  # so that Ctrl-C ends the evaluation
        if Path(args.eval_checkpoint).is_dir():
            evaluate_checkpoint_folder(
                args.eval_checkpoint, load, play, CHECKPOINT_SUFFIX, "environment steps"
            )
        else:
            checkpoint = load(args.eval_checkpoint)
            run_name = checkpoint["run_name"]
            video = f"videos/{run_name}/eval-checkpoint" if args.capture_video else None
            returns, errors, rmses = fly(checkpoint, args.eval_checkpoint, video)
            summary = eval_summary(returns) + tracking_summary(errors, rmses)
            print(f"{summary} ({args.eval_checkpoint})")
        envs().close()


# Copied from ppo_atari.py: evaluate_checkpoint_folder
def evaluate_checkpoint_folder(
    folder: str,
    load: Callable[[str], dict],
    play: Callable[[dict | None, str], dict[str, np.ndarray]],
    suffix: str,
    x_label: str,
    mark: tuple[int, str] | None = None,
) -> list[tuple[int, dict[str, np.ndarray]]]:
    """Evaluate every checkpoint (*`suffix`) in `folder` in step order: print a table, write
    eval_curve.csv and eval_curve.png into the folder; return [(step, metrics)], the random
    policy's last with step -1. `mark` (step, label): a step the PNG marks on every panel.

    `load(path)` reads one checkpoint (a dict with "global_step" and "env_id") and fails with one
    line on a file that is not one of the script's or does not match the command line's flags;
    every checkpoint is loaded once before anything is played. `play(checkpoint, path)` plays the
    evaluation episodes of a loaded checkpoint, `play(None, "")` those of the uniformly random
    policy on the same seeds; both return per-episode arrays by metric: "return", then any extra
    metric the script reports. The table and the CSV give the return's mean, std, min and max,
    then each extra metric's mean and std; the PNG draws the return against `x_label` (with the
    run's training returns from its TensorBoard log beside the folder), then one panel per extra
    metric, each with the random policy's mean as a line.
    """
    paths = sorted(str(path) for path in Path(folder).glob(f"*{suffix}"))
    if not paths:
        fail(f"{folder} holds no checkpoints (*{suffix}); give a file, or runs/<run>/checkpoints")
    steps, env_ids = {}, set()
    # Shown once the check takes a second: a quick refusal stays one line.
    for path in tqdm(paths, desc="checking checkpoints", unit="checkpoint", delay=1, leave=False):
        checkpoint = load(path)  # keep only the step and the env, not the weights
        steps[path], env_ids = int(checkpoint["global_step"]), env_ids | {str(checkpoint["env_id"])}
    if len(env_ids) > 1:
        fail(
            f"{folder} mixes checkpoints of {', '.join(sorted(env_ids))}; evaluate one run's folder"
        )
    paths.sort(key=steps.get)
    results = []
    # "" stands for the random policy, played last.
    for path in tqdm([*paths, ""], desc="evaluating checkpoints", unit="checkpoint"):
        results.append((steps.get(path, -1), play(load(path) if path else None, path)))

    checkpoints, (_, random_policy) = results[:-1], results[-1]
    extras = [name for name in random_policy if name != "return"]
    width = {name: max(8, len(name)) for name in extras}
    header = f"{'step':>12s}  {'mean':>8s} ± {'std':<6s} {'min':>8s} {'max':>8s}"
    print(header + "".join(f"  {name:>{width[name]}s} ± {'std':<6s}" for name in extras))
    csv_header = ["step,mean,std,min,max,episodes"]
    for name in extras:  # column-safe snake case: "tracking RMSE (m)" -> tracking_rmse_m
        column = "_".join("".join(c if c.isalnum() else " " for c in name.lower()).split())
        csv_header.append(f"{column}_mean,{column}_std")
    with open(Path(folder) / "eval_curve.csv", "w") as csv_file:
        csv_file.write(",".join(csv_header) + "\n")
        for step, values in [results[-1], *checkpoints]:
            returns = values["return"]
            mean, std, low, high = returns.mean(), returns.std(), returns.min(), returns.max()
            label = "random" if step < 0 else step
            line = f"{label:>12}  {mean:8.2f} ± {std:<6.2f} {low:8.2f} {high:8.2f}"
            cells = [step, mean, std, low, high, len(returns)]
            for name in extras:
                mean, std = values[name].mean(), values[name].std()
                line += f"  {mean:>{width[name]}.4g} ± {std:<6.4g}"
                cells += [mean, std]
            print(line)
            csv_file.write(",".join(map(str, cells)) + "\n")

    # Imported here: only this command draws, and a Figure needs no display or pyplot state.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4 + 2.5 * len(extras)), layout="constrained")
    panels = figure.subplots(1 + len(extras), 1, sharex=True, squeeze=False)[:, 0]
    x = np.array([step for step, _ in checkpoints])
    for panel, name in zip(panels, ["return", *extras], strict=True):
        mean = np.array([values[name].mean() for _, values in checkpoints])
        std = np.array([values[name].std() for _, values in checkpoints])
        episodes = len(random_policy[name])
        panel.plot(x, mean, marker="o", label=f"checkpoints (mean of {episodes} episodes)")
        panel.fill_between(x, mean - std, mean + std, alpha=0.25, label="± std")
        baseline = random_policy[name].mean()
        panel.axhline(baseline, color="grey", linestyle="--", label="random policy")
        panel.set_ylabel("evaluation return" if name == "return" else name)
    # The folder of kept checkpoints sits in its run's folder, beside the training's own log.
    train_steps, returns = training_returns(Path(folder).parent)
    if len(returns):
        window = min(20, len(returns))
        smoothed = np.convolve(returns, np.ones(window) / window, mode="valid")
        label = f"training (mean of {window} episodes)"
        panels[0].plot(train_steps[window - 1 :], smoothed, linewidth=1, alpha=0.7, label=label)
    if mark is not None:
        for panel in panels:
            panel.axvline(mark[0], color="black", linestyle=":", label=mark[1])
    panels[0].set_title(env_ids.pop())
    panels[0].legend(loc="best")
    panels[-1].set_xlabel(x_label)
    figure.savefig(Path(folder) / "eval_curve.png", dpi=100)
    print(f"wrote {Path(folder) / 'eval_curve.csv'} and {Path(folder) / 'eval_curve.png'}")
    return results


# Copied from ppo_atari.py: training_returns
def training_returns(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(steps, returns) of the training episodes logged under `run_dir`; empty if none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    if "charts/episodic_return" not in events.Tags()["scalars"]:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    scalars = events.Scalars("charts/episodic_return")
    steps = np.array([scalar.step for scalar in scalars])
    return steps, np.array([scalar.value for scalar in scalars])


# Copied from ppo_cartpole.py: save_checkpoint
def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically and durably: the new file reaches the disk before it replaces the old one,
    and the folder's entry after (and a new folder's own entry in its parent), so a crash or a
    power loss leaves one whole checkpoint or the other under the name, never an empty file."""
    make_folder(path.parent)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    sync_folder(path.parent)


# Copied from ppo_cartpole.py: make_folder
def make_folder(folder: Path) -> None:
    """mkdir -p, with each folder it creates synced into its parent."""
    created = [path for path in (folder, *folder.parents) if not path.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    for path in reversed(created):
        sync_folder(path.parent)


# Copied from ppo_cartpole.py: sync_folder
def sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename, a new file) to the disk. Windows cannot open a folder
    as a file (PermissionError), so there it is left to NTFS, which journals its entries."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except PermissionError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# Copied from ppo_cartpole.py: load_checkpoint
def load_checkpoint(path: str, resume: bool = False) -> dict:
    """Load a checkpoint of this script's kind; anything else fails with one line."""
    if not Path(path).is_file():
        fail(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        fail(f"{path} is not a readable checkpoint ({type(error).__name__}); it may be truncated")
    if not isinstance(checkpoint, dict) or "kind" not in checkpoint or "args" not in checkpoint:
        fail(f"{path} is not a checkpoint of this project")
    kind = checkpoint["kind"]
    if kind in EVALUATED_KINDS and resume:
        fail(
            f"{path} holds a {kind} checkpoint, an earlier kind that this version can evaluate "
            "(--eval-checkpoint) but not resume: its training state is saved differently"
        )
    if kind != CHECKPOINT_KIND and kind not in EVALUATED_KINDS:
        fail(f"{path} holds a {kind} checkpoint; this script trains {CHECKPOINT_KIND}")
    return checkpoint


# Copied from ppo_cartpole.py: start_wandb
def start_wandb(args: Args, run_name: str) -> None:
    """With --track: a W&B run that mirrors the TensorBoard log and records the arguments."""
    import hashlib

    import wandb

    wandb.init(
        project=args.wandb_project_name,
        entity=args.wandb_entity,
        group=args.wandb_group or args.exp_name,
        name=run_name,
        # The id follows from the run name, so a resumed run continues the same W&B run.
        id=hashlib.sha256(run_name.encode()).hexdigest()[:16],
        resume="allow",
        config=asdict(args),
        sync_tensorboard=True,
        save_code=True,
    )


# Copied from ppo_cartpole.py: Run
class Run:
    """What the training loop does besides the algorithm, behind three calls: the run's name and
    resumed state, TensorBoard (and W&B) logging, the progress bar, checkpoint files, and stop
    signals. Ctrl-C (SIGINT) or SIGTERM (job schedulers, `timeout`, `docker stop`) stops training
    at the end of the iteration with a checkpoint; a second signal aborts at once (exit 128 + n, one
    line); a signal during the final evaluation ends it (the trained agent is saved by then)."""

    def __init__(self, args: Args, total_steps: int):
        self.args = args
        self.resumed = load_checkpoint(args.resume, resume=True) if args.resume else None
        if self.resumed is not None:
            check_settings(args, self.resumed["args"], RESUME_MAY_CHANGE)
            self.name, self.start_step = self.resumed["run_name"], self.resumed["global_step"]
        else:
            env_name = args.env_id.replace("/", "-")
            self.name = f"{env_name}__{args.exp_name}__{args.seed}__{int(time.time())}"
            self.start_step = 0
        self.dir = Path("runs") / self.name
        self.checkpoint_path = self.dir / f"{args.exp_name}{CHECKPOINT_SUFFIX}"
        # Before anything renders: SDL (pygame) installs signal handlers of its own when it starts,
        # which would swallow SIGTERM, unless this hint tells it not to.
        self.signum, self.evaluating = None, False
        os.environ.setdefault("SDL_NO_SIGNAL_HANDLERS", "1")
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)
        if args.track:
            start_wandb(args, self.name)
        self.writer = SummaryWriter(str(self.dir))
        table = "\n".join(f"|{key}|{value}|" for key, value in asdict(args).items())
        self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
        self.start_time = time.time()
        self.recent_returns: deque[float] = deque(maxlen=20)
        self.progress = tqdm(
            total=total_steps, initial=self.start_step, unit="step", dynamic_ncols=True
        )

    def _on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self.evaluating:  # the trained agent is saved: end the evaluation (see finish)
            self.signum = self.signum or signum
            raise KeyboardInterrupt
        if self.signum is not None:  # the second signal: abort from wherever the code is
            print(f"\n{name} again: aborted; nothing was saved since the last checkpoint",
                  file=sys.stderr, flush=True)  # fmt: skip
            # Not SystemExit: Python only prints an exception raised inside a callback (a weakref's,
            # the garbage collector's) and goes on; os._exit ends the process wherever it is.
            sys.stdout.flush()
            os._exit(128 + signum)
        self.signum = signum
        print(f"\n{name}: stopping after this iteration (send it again to abort without saving)",
              file=sys.stderr)  # fmt: skip

    def _close_and_exit(self, code: int, message: str) -> NoReturn:
        """Close the progress bar and the log, print `message` to stderr, exit with `code`."""
        self.progress.close()
        self.writer.close()
        print(message, file=sys.stderr)
        sys.exit(code)

    def restore(self, **objects) -> None:
        """With --resume: load each object's saved state (model=agent, optimizer=...)."""
        if self.resumed is not None:
            restore(self.resumed, self.args.resume, **objects)

    def log_episode(self, episodic_return: float, length: int, global_step: int) -> None:
        """One finished training episode, with its true (unclipped, unscaled) return."""
        self.writer.add_scalar("charts/episodic_return", float(episodic_return), global_step)
        self.writer.add_scalar("charts/episodic_length", int(length), global_step)
        self.recent_returns.append(float(episodic_return))

    def end_iteration(
        self,
        global_step: int,
        previous_step: int,
        scalars: dict[str, float],
        state: Callable[[], dict],
        finite: bool = True,
        histograms: dict | None = None,
    ) -> bool:
        """Once per iteration: stop on a non-finite loss (the state saved for inspection, exit 1),
        log every --log-interval steps, move the progress bar, checkpoint every --checkpoint-freq
        steps. True when a stop signal asks the training loop to end."""
        if not finite:
            path = self.dir / f"{self.checkpoint_path.stem}_nan{self.checkpoint_path.suffix}"
            save_checkpoint(path, state())
            error = f"error: loss became non-finite at step {global_step}; state saved to {path}"
            self._close_and_exit(1, error)
        sps = int((global_step - self.start_step) / max(time.time() - self.start_time, 1e-6))
        if crossed(self.args.log_interval, global_step, previous_step):
            for key, value in {**scalars, "charts/SPS": sps}.items():
                self.writer.add_scalar(key, value, global_step)
            if histograms and crossed(10 * self.args.log_interval, global_step, previous_step):
                for key, values in histograms.items():
                    self.writer.add_histogram(key, values, global_step)
        self.progress.update(global_step - self.progress.n)
        if self.recent_returns:
            recent = f"{np.mean(self.recent_returns):.1f}"
            self.progress.set_postfix(sps=sps, ret=recent, refresh=False)
        if self.args.save_model and crossed(self.args.checkpoint_freq, global_step, previous_step):
            saved = state()
            save_checkpoint(self.checkpoint_path, saved)
            save_checkpoint(self.kept_path(global_step), saved)
        return self.signum is not None

    def kept_path(self, global_step: int) -> Path:
        """runs/<run>/checkpoints/<name>_<step>: where the checkpoint of a step is kept."""
        name = f"{self.checkpoint_path.stem}_{global_step:012d}{self.checkpoint_path.suffix}"
        return self.dir / "checkpoints" / name

    def finish(
        self,
        state: dict,
        global_step: int,
        final_evaluation: Callable[[str | None], tuple[dict[str, np.ndarray], str]],
    ) -> None:
        """After the loop: save the checkpoint; after a stop signal, say where it is and exit
        128 + the signal (130, 143). Else run `final_evaluation(video_folder)`, which returns its
        per-episode scalars and a summary; log them and print the one summary line."""
        self.progress.close()
        where = f"; checkpoint {self.checkpoint_path}" if self.args.save_model else ""
        if self.args.save_model:
            save_checkpoint(self.checkpoint_path, state)
            # The trained agent is kept too, so that evaluating the folder of kept checkpoints ends
            # with it (a stopped run's checkpoint is a point to resume from, not a result).
            if self.args.checkpoint_freq and self.signum is None:
                save_checkpoint(self.kept_path(global_step), state)
        if self.signum is not None:
            resume = f" (continue with --resume {self.checkpoint_path})" if where else ""
            interrupted = f"interrupted at step {global_step}{where}{resume}"
            self._close_and_exit(128 + self.signum, interrupted)
        video_folder = None
        if self.args.capture_video:
            # A resumed run's evaluation gets a folder of its own: no video overwrites another's.
            resumed = f"-step-{global_step}" if self.resumed is not None else ""
            video_folder = f"videos/{self.name}/eval{resumed}"
        self.evaluating = True  # from here on, a signal ends the evaluation and the process
        try:
            per_episode, summary = final_evaluation(video_folder)
        except KeyboardInterrupt:
            if self.signum is None:
                raise
        # (Checked after the evaluation too: Python drops an exception raised inside a garbage
        # collector's callback, such as JAX's, so the signal may have left the evaluation running.)
        if self.signum is not None:
            name = signal.Signals(self.signum).name
            stopped = f"{name}: the final evaluation was stopped at step {global_step}{where}"
            self._close_and_exit(128 + self.signum, stopped)
        self.evaluating = False
        for key, values in per_episode.items():
            for episode, value in enumerate(values):
                if not np.isnan(value):
                    self.writer.add_scalar(key, value, episode)
        self.writer.close()
        if self.args.track:
            import wandb

            wandb.finish()
        elapsed = time.time() - self.start_time
        sps = (global_step - self.start_step) / elapsed
        print(f"done: {global_step} steps in {elapsed:.1f}s ({sps:.0f} steps/s); {summary}{where}")


if __name__ == "__main__":
    main(parse_args())
