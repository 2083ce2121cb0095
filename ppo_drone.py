"""Proximal Policy Optimisation (Gaussian policy, GAE) flying a quadrotor along a figure-eight.

Trains a continuous-action PPO agent on crazyflow's `DroneFigureEightTrajectory-v0`: a JAX
simulation of the Crazyflie that steps a thousand drones in one call. The policy commands roll,
pitch and collective thrust (attitude control, rescaled to [-1, 1] by crazyflow's NormalizeActions;
the yaw command is held at 0) and is rewarded for staying close to a reference point that moves
along the figure-eight x = sin t, z = 1 + 0.5 sin 2t; it sees its position, attitude, velocities
and the position errors to the next ten reference points. The implementation is the well-known PPO
recipe for continuous control: separate tanh actor and critic MLPs with orthogonal initialisation,
a state-independent log-std, running observation normalisation, GAE, advantage normalisation,
clipped policy and value losses, entropy bonus, global gradient clipping, learning-rate decay and
an optional target-KL stop. The defaults start from a course setting (1024 drones, control at
50 Hz, γ 0.9, 16-step rollouts, an attitude penalty in the training reward) with a cheaper update,
10 epochs of 8 minibatches rather than 15 of 16, spent on a longer budget of 1.6M steps.

Run:
    python ppo_drone.py                      # train, evaluate, save runs/<run>/ppo_drone.pt
    python ppo_drone.py --resume runs/<run>/ppo_drone.pt           # continue an interrupted run
    python ppo_drone.py --eval-checkpoint runs/<run>/ppo_drone.pt --capture-video  # mp4 + plot
    tensorboard --logdir runs

Expect: the deterministic policy flies the whole 10 s figure-eight without a crash. Measured on
this project's quiet 2-core CPU with the defaults, as whole processes, seeds 42 / 123 / 456:
63 / 57 / 61 s (1,589,248 steps, ~26k steps/s; the same seed-42 run took 74-97 s at other times
that day), evaluation returns 488.9 / 491.2 / 484.7 (of at most 500) over 10 drones, mean
distance to the moving reference point 0.012 / 0.009 / 0.016 m, full-episode RMSE 0.028 / 0.023 /
0.029 m. Most of the RMSE is the start: crazyflow starts each drone ~0.22 m from the reference,
and over 64 evaluation flights of seed 42 the first 10 steps (0.2 s) hold ~80% of the squared
error: median RMSE 0.024 m over the whole flight, 0.010 m without them
(experiments/drone_start.py). Of a 74 s run, the PPO updates took 43 s, the simulation 17 s,
imports 4 s, building the envs and compiling 3.4 s, the final evaluation 4.9 s. The former
course shape (15 epochs x 16 minibatches, 1M steps, one torch thread) took 106 s for
473.7 and 0.029 m (RMSE 0.053 m) on a slower day; 10 x 8 at 1M steps took 60 s for 473.4 and
0.029 m (RMSE 0.046 m).
Training crashes on a plateau for ~500-600k steps, then switches to clean flight within a few
iterations. `--capture-video` writes flight.mp4 (MuJoCo offscreen, MUJOCO_GL=egl when headless)
and flight.png (the flown path against the figure-eight).
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import hashlib
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
from torch.distributions import Normal
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

# Checkpoints name their kind rather than this file's name, so that a renamed copy of the script
# still loads its own checkpoints.
CHECKPOINT_KIND = "ppo-gaussian-mlp/2"
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
    """use a GPU when one is present, for both the simulation (JAX) and the networks (torch)"""
    torch_threads: int = 2
    """CPU threads for torch (2, one per core of a 2-core CPU: on a quiet machine the default run's
    PPO updates took 43.0 s against 55.7 s with one thread, the whole process 73.8 s against 84.9 s;
    on a CPU crowded by other jobs one thread is faster; the simulation keeps JAX's own threads)"""
    track: bool = False
    """log the run to Weights & Biases (works offline with WANDB_MODE=offline)"""
    wandb_project_name: str = "rl-scripts"
    """the W&B project"""
    wandb_entity: str | None = None
    """the W&B entity (team or user); None uses your default"""
    wandb_group: str | None = None
    """W&B group, so the seeds of one experiment plot together (default: --exp-name)"""
    capture_video: bool = False
    """render one evaluation flight to mp4 and plot its path (PNG) under videos/<run_name>/"""
    save_model: bool = True
    """save the checkpoint runs/<run_name>/<exp_name>.pt (at the end, periodically, on Ctrl-C)"""
    checkpoint_freq: int = 200_000
    """also save a checkpoint every this many environment steps, each kept in
    runs/<run_name>/checkpoints/ with the trained agent at the end (0: none of them)"""
    log_interval: int = 16_384
    """write the loss statistics every this many environment steps"""
    resume: str | None = None
    """path of a checkpoint to continue training from (with its settings)"""
    eval_checkpoint: str | None = None
    """path of a checkpoint to evaluate for --eval-episodes episodes, then exit"""
    eval_episodes: int = 10
    """episodes of the final deterministic evaluation (and of --eval-checkpoint)"""
    env_id: str = "DroneFigureEightTrajectory-v0"
    """a crazyflow environment (DroneFigureEightTrajectory-v0, DroneReachPos-v0, ...)"""
    total_timesteps: int = 1_600_000
    """environment steps to train for (summed over the drones)"""

    env_freq: int = 50
    """control frequency of the environment in Hz (crazyflow's default is 500; the simulation
    itself always runs at 500 Hz)"""
    max_episode_time: float = 10.0
    """episode length in seconds before truncation (an evaluation setting for --eval-checkpoint)"""
    num_envs: int = 1024
    """number of drones simulated in parallel for training"""
    num_eval_envs: int = 64
    """number of drones simulated in parallel for evaluation (each flies its first episode)"""
    attitude_coef: float = 0.08
    """training reward -= this x |(roll, pitch, yaw)| (rad): discourages aggressive attitudes"""
    zero_yaw: bool = True
    """hold the yaw command at 0 and leave it out of the policy: the figure-eight does not need
    yaw, and exploring it only adds noise"""
    learning_rate: float = 1.5e-3
    """AdamW learning rate"""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay (its default, the course's setting), on every parameter: on
    the log-std it is a slight pull towards std 1; 0 makes the optimiser plain Adam"""
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
    # 10 epochs of 8 minibatches (2,048 samples each) rather than the course's 15 of 16: the update
    # is most of the time on a CPU, and 80 gradient steps an iteration instead of 240 made a 1M-step
    # run 1.8x faster (60 s against 106 s) for the same flight; the time saved buys 1.6M steps.
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

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_iterations(self) -> int:
        return max(1, self.total_timesteps // self.batch_size)


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
        """Sample an action (or score a given one): action, log-prob, entropy, value.

        The action dimensions are independent: log-prob and entropy are sums over them.
        """
        mean = self.actor_mean(obs)
        distribution = Normal(mean, self.actor_logstd.exp(), validate_args=False)
        if action is None:
            action = distribution.sample()
        return (
            action,
            distribution.log_prob(action).sum(-1),
            distribution.entropy().sum(-1),
            self.get_value(obs),
        )

    def deterministic_action(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor_mean(obs)


# Copied from ppo_cartpole.py: compute_gae
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
      - `terminated[t]` (the MDP ended) removes the bootstrap term: nothing follows a terminal state;
      - `episode_ended[t]` (terminated or truncated) stops the advantage recursion, so credit never
        flows across an episode boundary, but a truncated step still bootstraps from V(final obs).
    The step after an episode ends (the autoreset step) gets a meaningless advantage here; the
    caller drops it from the update.
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


# Copied from ppo_cartpole.py: Adam
class Adam:
    """Adam (Kingma & Ba, 2015), computed step for step as torch.optim.Adam computes it; with
    `weight_decay`, AdamW's decoupled weight decay (Loshchilov & Hutter, 2019), as torch.optim.AdamW.

    Written out rather than taken from torch.optim: torch.optim's first call imports torch._dynamo
    (the compiler's machinery, ~1.4 s), a third of ppo_cartpole.py's whole run when it stops
    solved after a few thousand steps. The test suite checks it against torch.optim.Adam and AdamW.
    """

    def __init__(
        self,
        parameters,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        self.parameters = list(parameters)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        # Steps taken by each parameter: one that got no gradient is not stepped (as in torch).
        self.steps = [0] * len(self.parameters)
        # Running averages of each parameter's gradient (first moment) and squared gradient (second).
        self.exp_avg = [torch.zeros_like(parameter) for parameter in self.parameters]
        self.exp_avg_sq = [torch.zeros_like(parameter) for parameter in self.parameters]

    def zero_grad(self) -> None:
        for parameter in self.parameters:
            parameter.grad = None

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        for index, (parameter, exp_avg, exp_avg_sq) in enumerate(
            zip(self.parameters, self.exp_avg, self.exp_avg_sq, strict=True)
        ):
            if parameter.grad is None:
                continue
            grad = parameter.grad
            self.steps[index] += 1
            if self.weight_decay:
                # Decoupled: the weights shrink towards 0 directly, not through the gradient's moments.
                parameter.mul_(1 - self.lr * self.weight_decay)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            # The averages start at 0: dividing by 1 - beta^t removes that bias from early steps.
            bias_correction1 = 1 - beta1 ** self.steps[index]
            bias_correction2_sqrt = (1 - beta2 ** self.steps[index]) ** 0.5
            denominator = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
            parameter.addcdiv_(exp_avg, denominator, value=-self.lr / bias_correction1)

    def state_dict(self) -> dict:
        return {"lr": self.lr, "steps": self.steps, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state_dict(self, state: dict) -> None:
        saved = state["exp_avg"] + state["exp_avg_sq"]
        mine = self.exp_avg + self.exp_avg_sq
        if [tensor.shape for tensor in saved] != [tensor.shape for tensor in mine]:
            raise ValueError("the optimiser state does not match the network's parameters")
        for tensor, saved_tensor in zip(mine, saved, strict=True):
            tensor.copy_(saved_tensor)
        self.lr, self.steps = state["lr"], list(state["steps"])


def update(agent, optimizer, args, b_obs, b_actions, b_logprobs, b_advantages, b_returns, b_values) -> dict:
    """Several epochs of minibatch PPO over one rollout; returns the last epoch's statistics.

    The rollout has lost its autoreset steps, so it may hold fewer samples than --num-minibatches:
    empty minibatches are skipped (their mean loss would be NaN), and an empty rollout changes
    nothing (its statistics are then only {"finite": True}).
    """
    if len(b_obs) == 0:
        return {"finite": True}
    clipfracs = []
    stats = {}
    for _epoch in range(args.update_epochs):
        permutation = torch.randperm(len(b_obs), device=b_obs.device)
        for minibatch in permutation.tensor_split(args.num_minibatches):
            if len(minibatch) == 0:
                continue
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
                # Kept as tensors: read out once after the loop, not synchronised every minibatch.
                stats = {
                    "policy_loss": policy_loss.detach(),
                    "value_loss": value_loss.detach(),
                    "entropy": entropy_loss.detach(),
                    "old_approx_kl": (-log_ratio).mean(),
                    "approx_kl": ((ratio - 1) - log_ratio).mean(),
                    "ratio_mean": ratio.mean(),
                    "ratio_max": ratio.max(),
                }
                clipfracs.append(((ratio - 1.0).abs() > args.clip_coef).float().mean())
        if args.target_kl is not None and stats["approx_kl"] > args.target_kl:
            break
    stats = {key: value.item() for key, value in stats.items()}
    stats["clipfrac"] = torch.stack(clipfracs).mean().item()
    stats["finite"] = True
    return stats


def linear_schedule(start: float, iteration: int, num_iterations: int, final_fraction: float = 0.0) -> float:
    """Value at 1-based `iteration` of a linear decay from `start` to `final_fraction * start`."""
    return start * (1.0 - (1.0 - final_fraction) * (iteration - 1.0) / num_iterations)


# Copied from ppo_cartpole.py: explained_variance
def explained_variance(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """1 - Var(targets - predictions) / Var(targets): 1 is perfect, 0 is no better than a mean."""
    target_variance = targets.var()
    if target_variance == 0:
        return float("nan")
    return float(1.0 - (targets - predictions).var() / target_variance)


def main(args: Args) -> None:
    validate(args)
    if args.eval_checkpoint:
        evaluate_checkpoint(args)
        return
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    if checkpoint is not None:
        check_settings(args, checkpoint["args"], RESUME_MAY_CHANGE)
        run_name, global_step = checkpoint["run_name"], checkpoint["global_step"]
    else:
        run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
        global_step = 0
    start_iteration = global_step // args.batch_size + 1
    run = Run(args, run_name, total_steps=args.num_iterations * args.batch_size, global_step=global_step)
    # A resumed run reseeds with an offset so that it does not replay the random stream of its start.
    seed = args.seed + start_iteration - 1
    seed_everything(seed, args.torch_deterministic)
    device = pick_device(args.cuda, args.torch_threads)
    jax_device = pick_jax_device(device)

    envs = make_envs(args, args.num_envs, jax_device, device)
    agent = build_agent(envs, args.hidden_size, device)
    optimizer = Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, weight_decay=args.weight_decay)
    if checkpoint is not None:
        restore(checkpoint, agent, optimizer, envs)

    def training_state() -> dict:
        return {
            "kind": CHECKPOINT_KIND,
            "env_id": args.env_id,
            "run_name": run_name,
            "args": asdict(args),
            "global_step": global_step,
            "model": agent.state_dict(),
            "optimizer": optimizer.state_dict(),
            "obs_rms": envs.state_dict(),
        }

    # Rollout storage, preallocated on the device: no per-step Python lists of tensors.
    obs_dim, action_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    shape = (args.num_steps, args.num_envs)
    obs = torch.zeros((*shape, obs_dim), device=device)
    actions = torch.zeros((*shape, action_dim), device=device)
    logprobs, rewards = torch.zeros(shape, device=device), torch.zeros(shape, device=device)
    terminated, episode_ended, valid = (torch.zeros(shape, dtype=torch.bool, device=device) for _ in range(3))
    values = torch.zeros((args.num_steps + 1, args.num_envs), device=device)

    # Seeding the reset seeds the simulation's JAX random key (crazyflow's Sim.seed), which then
    # draws every drone's start and every later autoreset.
    # A resumed run restarts every flight; an uninterrupted run would not have seen these starts, so
    # they stay out of the restored observation statistics.
    envs.update_stats = checkpoint is None
    next_obs, _ = envs.reset(seed=seed)
    envs.update_stats = True
    # True where the env's previous step ended an episode: its next step is the autoreset step.
    next_is_autoreset = torch.zeros(args.num_envs, dtype=torch.bool, device=device)
    episodes = FlightStats(args.num_envs, device)

    for iteration in range(start_iteration, args.num_iterations + 1):
        previous_step = global_step
        if args.anneal_lr:
            optimizer.lr = linear_schedule(
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
            episodes.step(info, valid[step], next_is_autoreset)

        with torch.inference_mode():
            # After the last step: V(next obs), which is V(final obs) where an episode just ended.
            values[args.num_steps] = agent.get_value(next_obs)
            advantages, returns = compute_gae(
                rewards, values, terminated, episode_ended, args.gamma, args.gae_lambda
            )

        # Flatten the rollout and drop the autoreset steps.
        keep = valid.reshape(-1)
        b_obs, b_actions = obs.reshape(-1, obs_dim)[keep], actions.reshape(-1, action_dim)[keep]
        b_logprobs, b_advantages = logprobs.reshape(-1)[keep], advantages.reshape(-1)[keep]
        b_returns, b_values = returns.reshape(-1)[keep], values[:-1].reshape(-1)[keep]
        stats = update(
            agent, optimizer, args, b_obs, b_actions, b_logprobs, b_advantages, b_returns, b_values
        )

        finite = stats["finite"] and all(p.isfinite().all() for p in agent.parameters())
        run.stop_if_not_finite(finite, training_state, global_step)
        episodes.log(run, global_step)
        if crossed(args.log_interval, global_step, previous_step) and len(b_returns) > 1:
            losses = {f"losses/{key}": value for key, value in stats.items() if key != "finite"}
            losses["losses/explained_variance"] = explained_variance(b_values, b_returns)
            run.log({**losses, "charts/learning_rate": optimizer.lr}, global_step)
            if crossed(10 * args.log_interval, global_step, previous_step):
                run.writer.add_histogram("losses/advantages", b_advantages, global_step)
        run.advance(global_step)
        run.checkpoint(training_state, global_step, previous_step)
        if run.stop.requested:
            break

    run.end_training(training_state(), global_step)
    # Separate evaluation drones, with the training statistics copied in and frozen.
    eval_envs = make_envs(args, args.num_eval_envs, jax_device, device)
    sync_envs(envs, eval_envs)
    envs.close()
    video_folder = Path("videos") / run_name / "eval" if args.capture_video else None
    eval_returns, eval_errors, eval_rmses = evaluate(
        agent, eval_envs, args.eval_episodes, args.seed + EVAL_SEED_OFFSET, video_folder
    )
    eval_envs.close()
    for episode, (episode_return, error, rmse) in enumerate(
        zip(eval_returns, eval_errors, eval_rmses, strict=True)
    ):
        run.log({"eval/episodic_return": episode_return}, episode)
        if not np.isnan(error):
            run.log({"eval/tracking_error": error, "eval/tracking_rmse": rmse}, episode)
    run.finish(global_step, eval_summary(eval_returns, eval_errors, eval_rmses))


# ----------------------------------------------------------------------------------------------
# Plumbing: validation, evaluation of a checkpoint, checkpoint files, logging and stop signals.
# A first reading can stop here: nothing below changes what the algorithm computes.
# ----------------------------------------------------------------------------------------------

# Copied from ppo_cartpole.py: EVAL_SEED_OFFSET
EVAL_SEED_OFFSET = 10_000  # evaluation envs get seed + this: episodes that training never saw


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


def validate(args: Args) -> None:
    """Check every knob before any heavy work, so a typo costs a second, not a run."""
    for name in (
        "total_timesteps", "num_envs", "num_eval_envs", "num_steps", "num_minibatches",
        "update_epochs", "env_freq", "eval_episodes", "torch_threads", "log_interval",
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
    for name in ("attitude_coef", "weight_decay"):
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
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


# Copied from ppo_cartpole.py: parse_args
def parse_args(argv: list[str] | None = None) -> Args:
    """The command line as Args. With --resume or --eval-checkpoint, every flag left out takes the
    checkpoint's setting, so `--resume PATH` alone continues the run that PATH belongs to."""
    args = tyro.cli(Args, args=argv)
    path = args.resume or args.eval_checkpoint
    if path is None:
        return args
    saved_args = load_checkpoint(path)["args"]
    known = {field.name for field in fields(Args)}
    defaults = Args(**{name: value for name, value in saved_args.items() if name in known})
    defaults.resume = defaults.eval_checkpoint = None
    return tyro.cli(Args, args=argv, default=defaults)


# Settings a resumed run may give anew; every other setting must match the checkpoint's, or the
# resumed run would silently be a different experiment.
RESUME_MAY_CHANGE = {
    "total_timesteps", "resume", "eval_checkpoint", "eval_episodes", "cuda", "torch_threads", "track",
    "wandb_project_name", "wandb_entity", "wandb_group", "capture_video", "save_model", "checkpoint_freq",
    "log_interval", "num_eval_envs",
}  # fmt: skip
# Settings that shape the environment or the network the policy was trained for: --eval-checkpoint
# refuses to change them (the episode length, the evaluation drones and the seed may change).
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
    """The GPU when asked for and present, else the CPU with a notice; `torch_threads` CPU threads."""
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


def build_agent(envs: VectorEnv, hidden_size: int, device: torch.device) -> Agent:
    obs_dim = envs.single_observation_space.shape[0]
    action_dim = envs.single_action_space.shape[0]
    return Agent(obs_dim, action_dim, hidden_size).to(device)


def restore(checkpoint: dict, agent: Agent, optimizer: Adam, envs: NormalizeObservation) -> None:
    """--resume: the checkpoint's weights, optimiser state and observation statistics."""
    try:
        agent.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        envs.load_state_dict(checkpoint["obs_rms"])
    except (RuntimeError, ValueError, KeyError) as error:
        fail(f"the checkpoint does not fit this script's agent ({str(error).splitlines()[0]})")


class FlightStats:
    """The training flights as logged: true (unshaped) episode returns and lengths, and the reward
    and tracking error per valid step, the steadier learning curves (returns arrive in bursts and
    lag the policy). Finished episodes are logged as one mean per iteration: with a thousand
    drones that start together, hundreds of episodes end on the same step."""

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

    def log(self, run: Run, global_step: int) -> None:
        finished_return, finished_length, finished, reward, error, valid_steps = self.sums.tolist()
        if finished:
            run.log_episode(finished_return / finished, finished_length / finished, global_step)
        if valid_steps:
            run.log({"charts/reward_per_step": reward / valid_steps}, global_step)
            if self.has_trajectory:
                run.log({"charts/tracking_error": error / valid_steps}, global_step)
        self.sums.zero_()


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
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fly the deterministic (mean) policy; return per-episode returns, mean tracking errors (m) and
    tracking RMSEs (m): the mean and the root mean square of the distance to the reference point
    over the episode's steps. The RMSE weighs large excursions more, and is never below the mean.

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
            obs, _, terminated, truncated, info = envs.step(agent.deterministic_action(obs))
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
        no_reference = torch.full_like(length, float("nan"))
        errors.append(error_sum / length if "tracking_error" in info else no_reference)
        rmses.append((squared_error_sum / length).sqrt() if "tracking_error" in info else no_reference)
    if video_folder is not None:
        save_flight(video_folder, frames, envs.unwrapped.freq / frame_stride, np.array(path), reference)
    return tuple(torch.cat(values)[:episodes].cpu().numpy() for values in (returns, errors, rmses))


def eval_summary(returns: np.ndarray, errors: np.ndarray, rmses: np.ndarray) -> str:
    """The sentence the final evaluation and --eval-checkpoint both print."""
    summary = f"eval return {returns.mean():.2f} ± {returns.std():.2f} over {len(returns)} episodes"
    if not np.isnan(errors).all():
        summary += f", tracking error {errors.mean():.3f} m (RMSE {rmses.mean():.3f} m)"
    return summary


def evaluate_checkpoint(args: Args) -> None:
    """--eval-checkpoint: rebuild agent and observation statistics (frozen) from the checkpoint, fly.

    The settings come from the checkpoint (parse_args); the episode length, the number of evaluation
    drones and the seed may be given anew, the environment and the network may not.
    """
    checkpoint = load_checkpoint(args.eval_checkpoint)
    check_settings(args, checkpoint["args"], may_change=set(checkpoint["args"]) - MODEL_SETTINGS)
    device = pick_device(args.cuda, args.torch_threads)
    envs = make_envs(args, args.num_eval_envs, pick_jax_device(device), device)
    envs.load_state_dict(checkpoint["obs_rms"])
    envs.update_stats = False
    agent = build_agent(envs, args.hidden_size, device)
    agent.load_state_dict(checkpoint["model"])
    video_folder = Path("videos") / checkpoint["run_name"] / "eval-checkpoint" if args.capture_video else None
    returns, errors, rmses = evaluate(
        agent, envs, args.eval_episodes, args.seed + EVAL_SEED_OFFSET, video_folder
    )
    envs.close()
    print(eval_summary(returns, errors, rmses))


# Copied from ppo_cartpole.py: save_checkpoint
def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


# Copied from ppo_cartpole.py: load_checkpoint
def load_checkpoint(path: str) -> dict:
    """Load a checkpoint of this script's kind; anything else fails with one line."""
    if not Path(path).is_file():
        fail(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        fail(f"{path} is not a readable checkpoint ({type(error).__name__}); it may be truncated")
    if not isinstance(checkpoint, dict) or "kind" not in checkpoint or "args" not in checkpoint:
        fail(f"{path} is not a checkpoint of this project")
    if checkpoint["kind"] != CHECKPOINT_KIND:
        fail(f"{path} holds a {checkpoint['kind']} checkpoint; this script trains {CHECKPOINT_KIND}")
    return checkpoint


# Copied from ppo_cartpole.py: StopFlag
class StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM (job schedulers, `timeout`, `docker stop`) asks the training loop
    to stop at the end of the iteration and save; a second signal aborts at once."""

    def __init__(self):
        self.signum: int | None = None
        # SDL (pygame renders CartPole and Flappy Bird) installs its own SIGINT/SIGTERM handlers
        # when it starts, which would swallow SIGTERM; this hint tells it not to.
        os.environ.setdefault("SDL_NO_SIGNAL_HANDLERS", "1")
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        name = signal.Signals(signum).name
        print(
            f"\n{name}: stopping after this iteration (send it again to abort without saving)",
            file=sys.stderr,
        )

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process ended by it (130, 143)."""
        return 128 + self.signum


# Copied from ppo_cartpole.py: Run
class Run:
    """What the training loop does besides the algorithm, behind a few calls: TensorBoard (and
    W&B) logging, the progress bar, checkpoint files and the stop flag of Ctrl-C and SIGTERM."""

    def __init__(self, args: Args, run_name: str, total_steps: int, global_step: int):
        self.args = args
        self.dir = Path("runs") / run_name
        self.checkpoint_path = self.dir / f"{args.exp_name}.pt"
        # Before anything renders, so that SDL finds the handlers in place.
        self.stop = StopFlag()
        if args.track:
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
        self.writer = SummaryWriter(str(self.dir))
        self.writer.add_text(
            "hyperparameters",
            "|param|value|\n|-|-|\n" + "\n".join(f"|{key}|{value}|" for key, value in asdict(args).items()),
        )
        self.start_step, self.start_time = global_step, time.time()
        self.recent_returns: deque[float] = deque(maxlen=20)
        self.progress = tqdm(total=total_steps, initial=global_step, unit="step", dynamic_ncols=True)

    def log_episode(self, episodic_return: float, length: int, global_step: int) -> None:
        """One finished training episode, with its true (unclipped, unscaled) return."""
        self.writer.add_scalar("charts/episodic_return", episodic_return, global_step)
        self.writer.add_scalar("charts/episodic_length", length, global_step)
        self.recent_returns.append(episodic_return)

    def log(self, scalars: dict[str, float], global_step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step)

    def advance(self, global_step: int) -> int:
        """Move the progress bar to `global_step` and log charts/SPS; return the steps per second."""
        sps = int((global_step - self.start_step) / max(time.time() - self.start_time, 1e-6))
        self.writer.add_scalar("charts/SPS", sps, global_step)
        self.progress.update(global_step - self.progress.n)
        if self.recent_returns:
            self.progress.set_postfix(sps=sps, ret=f"{np.mean(self.recent_returns):.1f}", refresh=False)
        return sps

    def checkpoint(self, state: Callable[[], dict], global_step: int, previous_step: int) -> None:
        """Every --checkpoint-freq steps: refresh the checkpoint and keep a copy named by its step."""
        if self.args.save_model and crossed(self.args.checkpoint_freq, global_step, previous_step):
            saved = state()
            save_checkpoint(self.checkpoint_path, saved)
            save_checkpoint(self.kept_path(global_step), saved)

    def kept_path(self, global_step: int) -> Path:
        """runs/<run>/checkpoints/<name>_<step>: where the checkpoint of a step is kept."""
        name = f"{self.checkpoint_path.stem}_{global_step:012d}{self.checkpoint_path.suffix}"
        return self.dir / "checkpoints" / name

    def stop_if_not_finite(self, finite: bool, state: Callable[[], dict], global_step: int) -> None:
        """A NaN or infinite loss or weight ends the run: save the state for inspection, exit 1."""
        if finite:
            return
        path = self.dir / f"{self.checkpoint_path.stem}_nan{self.checkpoint_path.suffix}"
        save_checkpoint(path, state())
        self.progress.close()
        print(f"error: loss became non-finite at step {global_step}; state saved to {path}", file=sys.stderr)
        sys.exit(1)

    def end_training(self, state: dict, global_step: int) -> None:
        """Save the final checkpoint; if a stop signal ended training, say where it is and exit."""
        self.progress.close()
        if self.args.save_model:
            save_checkpoint(self.checkpoint_path, state)
            # The trained agent is kept too, so that evaluating the folder of kept checkpoints ends
            # with it (a stopped run's checkpoint is a point to resume from, not a result).
            if self.args.checkpoint_freq and not self.stop.requested:
                save_checkpoint(self.kept_path(global_step), state)
        if self.stop.requested:
            self.writer.close()
            where = (
                f": checkpoint saved to {self.checkpoint_path} (continue with --resume {self.checkpoint_path})"
                if self.args.save_model
                else ""
            )
            print(f"interrupted at step {global_step}{where}", file=sys.stderr)
            sys.exit(self.stop.exit_code)

    def finish(self, global_step: int, result: str) -> None:
        """Close the loggers and print the one summary line: steps, time, evaluation, checkpoint."""
        self.writer.close()
        if self.args.track:
            import wandb

            wandb.finish()
        elapsed = time.time() - self.start_time
        saved = f"; checkpoint {self.checkpoint_path}" if self.args.save_model else ""
        print(
            f"done: {global_step} steps in {elapsed:.1f}s ({(global_step - self.start_step) / elapsed:.0f} steps/s); "
            f"{result}{saved}"
        )


if __name__ == "__main__":
    main(parse_args())
    # Spare the interpreter's exit a garbage collection over the ~170k objects torch created at
    # import (~0.4 s): the process ends, and the OS frees its memory all at once.
    gc.freeze()
