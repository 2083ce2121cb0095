"""Proximal Policy Optimisation (clipped surrogate, GAE) on Atari from pixels.

The Nature-CNN PPO agent of the Atari literature, for any ale-py game (ALE/Pong-v5 by default),
stepped by ale-py's native vector env with the DeepMind preprocessing in C++. It learns from
clipped rewards and lost lives, logs the true game scores, and trains on several processes when
torchrun launches it (README.md).

Run:
    python ppo_atari.py --env-id ALE/Pong-v5 --track               # train, evaluate, save
    python ppo_atari.py --resume runs/<run>/ppo_atari.pt           # continue a stopped run
    python ppo_atari.py --eval-checkpoint runs/<run>/ppo_atari.pt --capture-video
    python ppo_atari.py --eval-checkpoint runs/<run>/checkpoints   # the evaluation curve

Expect: Pong from random play (-20) to about -14 after 1M agent steps, about 35 minutes on a
2-core CPU; README.md has the curve and the measured figures.
"""

from __future__ import annotations

import datetime
import difflib
import functools
import os
import random
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal, NoReturn

import ale_py
import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import tyro
from ale_py.vector_env import AtariVectorEnv
from torch.distributions import Categorical
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

# Importing ale_py registers its ids with gymnasium; this call only makes that dependency explicit.
gym.register_envs(ale_py)
# 108,000 frames = 30 minutes of play, the standard cap of an Atari episode (a truncation).
MAX_EPISODE_FRAMES = 108_000


@dataclass
class Args:
    exp_name: str = Path(__file__).stem
    """name of this experiment (part of the run name and of the checkpoint file name)"""
    seed: int = 1
    """seed of random, NumPy, torch and the environments (env i gets seed + i)"""
    torch_deterministic: bool = True
    """make cuDNN deterministic (cudnn.deterministic=True, cudnn.benchmark=False)"""
    cuda: bool = True
    """use a GPU when one is present"""
    # The game threads and the network take turns (the network waits for the frames it acts on),
    # so torch may use every core; on a CPU crowded by other jobs its threads wait for each other.
    torch_threads: int = torch.get_num_threads()
    """CPU threads for torch (default: torch's own; 1 is faster on a CPU crowded by other jobs)"""
    bf16: bool = True
    """run the convolutions and the hidden layer in bfloat16 where the hardware has native bf16"""
    track: bool = False
    """log the run to Weights & Biases (works offline with WANDB_MODE=offline)"""
    wandb_project_name: str = "rl-scripts"
    """the W&B project"""
    wandb_entity: str | None = None
    """the W&B entity (team or user); None uses your default"""
    capture_video: bool = False
    """record the first evaluation game as mp4 under videos/<run_name>/, as the network sees it"""

    env_id: str = "ALE/Pong-v5"
    """an Atari game: ALE/<Game>-v5 (sticky actions) or <Game>NoFrameskip-v4 (none)"""
    total_timesteps: int = 10_000_000
    """agent steps to train for, summed over the envs (each agent step is 4 game frames)"""
    eval_greedy: bool = False
    """evaluate the most probable action instead of sampling the policy (see `evaluate`)"""
    env_backend: Literal["ale", "gymnasium"] = "ale"
    """ale: ale-py's native C++ vector env; gymnasium: SyncVectorEnv of gym.make + wrappers"""
    env_threads: int = 0
    """threads of the native vector env (0: one per CPU core)"""
    repeat_action_probability: float | None = None
    """sticky-action probability; None keeps the id's own (0.25 for v5 ids, 0 for v4 ids)"""
    episodic_life: bool = True
    """treat the loss of a life as the end of an episode for learning (not for logged returns)"""
    clip_rewards: bool = True
    """learn from the sign of each reward (the logged returns stay the true scores)"""
    learning_rate: float = 2.5e-4
    """Adam learning rate (annealed linearly to 0 with --anneal-lr)"""
    num_envs: int = 8
    """number of games played in parallel (by each process under torchrun)"""
    num_steps: int = 128
    """steps per environment in each rollout"""
    anneal_lr: bool = True
    """anneal the learning rate linearly to 0 over training"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """lambda of generalised advantage estimation"""
    num_minibatches: int = 4
    """minibatches per epoch (must divide num_envs * num_steps)"""
    update_epochs: int = 4
    """epochs of optimisation over each rollout"""
    norm_adv: bool = True
    """normalise advantages per minibatch"""
    clip_coef: float = 0.1
    """surrogate clipping coefficient epsilon"""
    clip_vloss: bool = True
    """clip the value loss around the old value estimates, as the policy loss is clipped"""
    ent_coef: float = 0.01
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient-norm clipping threshold"""
    target_kl: float | None = None
    """stop the epochs of an update early once the approximate KL exceeds this (None: never)"""

    # The run around the algorithm: checkpoints, resuming, logging, evaluation.
    wandb_group: str | None = None
    """W&B group, so the seeds of one experiment plot together (default: --exp-name)"""
    save_model: bool = True
    """save the checkpoint runs/<run_name>/<exp_name>.pt (at the end, periodically, on a signal)"""
    checkpoint_freq: int = 500_000
    """also checkpoint every this many agent steps, each kept in runs/<run>/checkpoints/ (0: off)"""
    log_interval: int = 1024
    """write the loss statistics every this many agent steps (0: never)"""
    resume: str | None = None
    """path of a checkpoint to continue training from (with the checkpoint's settings)"""
    eval_checkpoint: str | None = None
    """a checkpoint to evaluate, or a folder of them to draw the evaluation curve of; then exit"""
    eval_episodes: int = 10
    """games of the final evaluation and of --eval-checkpoint, played in parallel"""

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps


# The two id styles this script accepts: the ALE v5 ids (sticky actions on) and the classic
# NoFrameskip-v4 ids of the DQN/PPO papers (sticky actions off).
ATARI_ID = re.compile(r"^(ALE/(?P<v5>[A-Za-z]+)-v5|(?P<v4>[A-Za-z]+)NoFrameskip-v4)$")


def atari_game(env_id: str) -> tuple[str, float]:
    """The ROM name and the default sticky-action probability of an Atari id; fail otherwise."""
    match = ATARI_ID.match(env_id)
    if match and env_id in gym.registry:
        spec = gym.spec(env_id)
        return spec.kwargs["game"], float(spec.kwargs.get("repeat_action_probability", 0.0))
    accepted = [name for name in gym.registry if ATARI_ID.match(name)]
    if env_id in gym.registry and gym.spec(env_id).kwargs.get("game"):
        game = "".join(part.capitalize() for part in gym.spec(env_id).kwargs["game"].split("_"))
        fail(f"{env_id} is not a supported id style; use ALE/{game}-v5 or {game}NoFrameskip-v4")
    if env_id in gym.registry:
        fail(
            f"{env_id} is not an Atari game; this script trains on ale-py games, "
            "ALE/<Game>-v5 or <Game>NoFrameskip-v4 (e.g. ALE/Pong-v5)"
        )
    close = difflib.get_close_matches(env_id, accepted, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else " (ids look like ALE/Pong-v5)"
    fail(f"unknown environment id {env_id!r}{hint}")


def make_envs(
    env_id: str,
    num_envs: int,
    sticky: float | None,
    backend: str = "ale",
    threads: int = 0,
    noop_max: int = 30,
) -> gym.vector.VectorEnv:
    """`num_envs` preprocessed games with episode statistics of the true (unclipped) scores.

    Both backends give (N, 4, 84, 84) uint8 observations, the game's own rewards, the `lives` info
    and next-step autoreset (gymnasium >= 1.0), which `main` masks out of the rollout. The native
    env steps every game in C++ threads, about 4x faster than a Python loop over wrapped envs; the
    gymnasium one is there to check the native one against (tests) and for platforms without it.
    Videos are made of the observations themselves (see `evaluate`), whichever the backend.
    """
    game, default_sticky = atari_game(env_id)
    sticky = default_sticky if sticky is None else sticky
    if backend == "ale":
        envs = AtariVectorEnv(
            game,
            num_envs,
            num_threads=threads,
            repeat_action_probability=sticky,
            max_num_frames_per_episode=MAX_EPISODE_FRAMES,
            noop_max=noop_max,
            use_fire_reset=True,
            # Clipped rewards are not the game's score: clip in `main`, log the true return here.
            reward_clipping=False,
            # Ending the episode on a life loss would end the *logged* episode too; instead
            # `main` reads `lives` from the info and ends only the learning episode.
            episodic_life=False,
        )
    else:
        envs = gym.vector.SyncVectorEnv(
            [lambda: make_gymnasium_env(env_id, sticky, noop_max) for _ in range(num_envs)]
        )
    return gym.wrappers.vector.RecordEpisodeStatistics(envs)


class FireOnReset(gym.Wrapper):
    """Press FIRE after every reset: games like Breakout wait for it (the native env does this)."""

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        meanings = self.env.unwrapped.get_action_meanings()
        if "FIRE" in meanings:
            obs, _, terminated, truncated, info = self.env.step(meanings.index("FIRE"))
            if terminated or truncated:
                obs, info = self.env.reset()
        return obs, info


def make_gymnasium_env(env_id: str, sticky: float, noop_max: int) -> gym.Env:
    """One game through gymnasium's wrappers, preprocessed as the native vector env does it: the
    same frames, up to the no-op starts (their random counts come from another generator)."""
    env = gym.make(
        env_id,
        frameskip=1,
        repeat_action_probability=sticky,
        full_action_space=False,
        max_num_frames_per_episode=MAX_EPISODE_FRAMES,
    )
    env = gym.wrappers.AtariPreprocessing(env, noop_max=noop_max, frame_skip=4, screen_size=84)
    env = FireOnReset(env)
    # The native env starts an episode's stack with three black frames, not with copies of the
    # first: the network must see the same thing from either backend.
    return gym.wrappers.FrameStackObservation(env, 4, padding_type="zero")


def layer_init(layer: nn.Module, gain: float = np.sqrt(2), bias: float = 0.0) -> nn.Module:
    """Orthogonal weights and constant bias: keeps activations well-scaled through ReLU layers."""
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.constant_(layer.bias, bias)
    return layer


class Agent(nn.Module):
    """The Nature CNN (3 conv + 512 linear) shared by a policy head and a value head."""

    def __init__(self, num_actions: int, bf16: bool = False):
        super().__init__()
        self.bf16 = bf16
        self.trunk = nn.Sequential(
            layer_init(nn.Conv2d(4, 32, 8, stride=4)),
            nn.ReLU(),
            layer_init(nn.Conv2d(32, 64, 4, stride=2)),
            nn.ReLU(),
            layer_init(nn.Conv2d(64, 64, 3, stride=1)),
            nn.ReLU(),
            nn.Flatten(),
            layer_init(nn.Linear(64 * 7 * 7, 512)),
            nn.ReLU(),
        )
        # A 0.01-gain policy head starts with near-uniform action probabilities: early
        # exploration is not left to the luck of the initialisation.
        self.actor = layer_init(nn.Linear(512, num_actions), gain=0.01)
        self.critic = layer_init(nn.Linear(512, 1), gain=1.0)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 frames in, (logits, value) out: the rollout stores 4x fewer bytes as uint8."""
        # Channels-last: oneDNN's CPU convolutions run the update 1.4-1.6x faster than in NCHW.
        frames = obs.float().div_(255.0).contiguous(memory_format=torch.channels_last)
        # The trunk in bf16 makes a whole training run 1.4x faster (benchmarks/README.md).
        # The heads stay fp32: the PPO ratio is clipped at 1 +- 0.1, and bf16's 3 significant
        # digits in the logits would be noise of that order.
        with torch.autocast(frames.device.type, torch.bfloat16, enabled=self.bf16):
            hidden = self.trunk(frames)
        hidden = hidden.float()
        return self.actor(hidden), self.critic(hidden).squeeze(-1)

    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        return self(obs)[1]

    def get_action_and_value(self, obs: torch.Tensor, action: torch.Tensor | None = None):
        """Sample an action (or score a given one): action, log-prob, entropy, value."""
        logits, value = self(obs)
        # No argument validation: a diverged net must reach the loss check, not raise in here.
        distribution = Categorical(logits=logits, validate_args=False)
        if action is None:
            action = distribution.sample()
        return action, distribution.log_prob(action), distribution.entropy(), value

    def greedy_action(self, obs: torch.Tensor) -> torch.Tensor:
        return self(obs)[0].argmax(dim=-1)


def build_agent(env_id: str, device: torch.device, bf16: bool) -> Agent:
    """The network for `env_id`'s actions; bf16 autocast only where the hardware has native bf16."""
    env = gym.make(env_id)
    # native_bf16 (below the banner) asks the hardware; bf16 runs only where it is native.
    agent = Agent(int(env.action_space.n), bf16=bf16 and native_bf16(device))
    env.close()
    return agent.to(device, memory_format=torch.channels_last)


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


def learning_signals(
    rewards, terminated, truncated, lives, previous_lives, autoreset, clip_rewards, episodic_life
):
    """What the learner sees of one vector step: (reward, terminated, episode_ended).

    Clipping rewards to their sign makes one set of hyper-parameters work across games whose
    scores differ by orders of magnitude. A lost life counts as a terminal state for learning (the
    DeepMind recipe: it teaches that losing a life is bad), though the game goes on; the autoreset
    step restores the lives, which is no loss.
    """
    reward = np.sign(rewards) if clip_rewards else rewards
    life_lost = (
        (lives < previous_lives) & ~autoreset if episodic_life else np.zeros_like(terminated)
    )
    learn_terminated = terminated | life_lost
    return reward.astype(np.float32), learn_terminated, learn_terminated | truncated


# Copied from ppo_cartpole.py: linear_schedule
def linear_schedule(start: float, iteration: int, num_iterations: int) -> float:
    """Value at 1-based `iteration` of a linear decay from `start` (iteration 1) towards 0."""
    return start * (1.0 - (iteration - 1.0) / num_iterations)


def update(
    agent, optimizer, args, keep, b_obs, b_actions, b_logprobs, b_advantages, b_returns, b_values,
    average: Callable[[list[torch.Tensor]], None] = lambda tensors: None,
) -> dict:  # fmt: skip
    """Several epochs of minibatch PPO over the `keep` samples of one rollout; last epoch's stats.

    `keep` holds the flat indices of the real transitions (the autoreset steps are left out), so
    a minibatch gathers its uint8 frames rather than the whole rollout being copied first.
    Under torchrun, `average` replaces tensors by their mean over the ranks (in one process it
    does nothing): each rank's gradients become the gradients of all ranks' minibatches together,
    so every rank takes the same step and the copies of the network stay identical.
    """
    if len(keep) == 0:  # every step of the rollout was an autoreset step: nothing to learn from
        return {"finite": True}
    clipfracs, stats = [], {}
    for _epoch in range(args.update_epochs):
        permutation = keep[torch.randperm(len(keep), device=keep.device)]
        for minibatch in permutation.tensor_split(args.num_minibatches):
            # Fewer real transitions than minibatches leaves some empty: the mean of nothing is NaN.
            if len(minibatch) == 0:
                continue
            _, new_logprob, entropy, new_value = agent.get_action_and_value(
                b_obs[minibatch], b_actions[minibatch]
            )
            log_ratio = new_logprob - b_logprobs[minibatch]
            advantages = b_advantages[minibatch]
            # The standard deviation of a single advantage is NaN: normalise two or more.
            if args.norm_adv and len(advantages) > 1:
                advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
            policy_loss, value_loss, ratio = ppo_loss(
                new_logprob, b_logprobs[minibatch], advantages, new_value, b_values[minibatch],
                b_returns[minibatch], args.clip_coef, args.clip_vloss,
            )  # fmt: skip
            entropy_loss = entropy.mean()
            loss = policy_loss - args.ent_coef * entropy_loss + args.vf_coef * value_loss

            optimizer.zero_grad()
            loss.backward()
            # The verdict on the loss travels in the gradients' all-reduce: a rank whose loss is
            # NaN or infinite must not leave the others waiting alone in it, and every rank must
            # stop at the same step. `not_finite` becomes the share of ranks with such a loss.
            not_finite = (~torch.isfinite(loss)).float().reshape(1)
            average([*(parameter.grad for parameter in agent.parameters()), not_finite])
            if not_finite.item() > 0:
                return {"finite": False}
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
                clipfracs.append(((ratio - 1.0).abs() > args.clip_coef).float().mean())
        if args.target_kl is not None:
            approx_kl = torch.tensor([stats["approx_kl"]], device=b_obs.device)
            average([approx_kl])  # every rank stops after the same epoch
            if approx_kl.item() > args.target_kl:
                break
    stats["clipfrac"] = torch.stack(clipfracs).mean().item()
    # The last step may have broken the weights even though every loss was finite.
    stats["finite"] = all(bool(torch.isfinite(parameter).all()) for parameter in agent.parameters())
    return stats


def mean_over_ranks(tensors: list[torch.Tensor], ranks: Ranks) -> None:
    """Replace each tensor by its mean over the torchrun ranks (the data-parallel gradient, as
    DistributedDataParallel averages it), in one all-reduce of them all; alone, leave them be."""
    if ranks.world == 1:
        return
    flat = torch.cat([tensor.flatten() for tensor in tensors])
    ranks.collective(lambda: dist.all_reduce(flat))  # the sum over the ranks
    flat /= ranks.world
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


def main(args: Args) -> None:
    validate(args)
    if args.eval_checkpoint:
        return evaluate_checkpoint(args)
    # Launched by torchrun, this process is one rank of several, each stepping its own --num-envs
    # games; alone, it is rank 0 of 1 and nothing below changes.
    ranks = Ranks(args.cuda)
    steps_per_iteration = args.batch_size * ranks.world  # every rank's rollout
    num_iterations = max(1, args.total_timesteps // steps_per_iteration)
    # The run's name, loggers, progress bar and stop signals; with --resume, the saved state. Rank 0
    # logs, saves and evaluates; the other ranks' runs only follow its exits.
    run_of_this_rank = MainRun if ranks.is_main else RankRun
    run = run_of_this_rank(args, num_iterations * steps_per_iteration, ranks)
    # Counted in steps, so that a run saved by N ranks resumes in any number of them.
    global_step, start_iteration = run.start_step, run.start_step // steps_per_iteration + 1
    # A resumed run reseeds at an offset, not to replay its start; each rank has its own games.
    seed = training_seed(args.seed, start_iteration - 1, args.num_envs)
    seed += ranks.rank * RANK_SEED_OFFSET
    seed_everything(seed, args.torch_deterministic)
    device = ranks.local_device(pick_device(args.cuda, args.torch_threads))

    envs = make_envs(
        args.env_id,
        args.num_envs,
        args.repeat_action_probability,
        args.env_backend,
        args.env_threads,
    )
    agent = build_agent(args.env_id, device, args.bf16)
    ranks.copy_from_rank_0(agent)  # the same initial weights on every rank
    # eps=1e-5 rather than 1e-8, as in the reference PPO implementation.
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    run.restore(model=agent, optimizer=optimizer)  # with --resume
    iteration = start_iteration - 1  # the last finished one, saved with the state

    def training_state() -> dict:
        return {
            "kind": CHECKPOINT_KIND,
            "env_id": args.env_id,
            "run_name": run.name,
            "args": asdict(args),
            "global_step": global_step,
            "iteration": iteration,
            "model": agent.state_dict(),
            "optimizer": optimizer.state_dict(),
        }

    # Rollout storage, preallocated. What the network computes lives on the device; what the envs
    # return per step (rewards, flags) is gathered on the host and uploaded once per rollout, so a
    # step costs one observation upload and one action download, no other host-device round trip.
    shape = (args.num_steps, args.num_envs)
    obs = torch.zeros(shape + envs.single_observation_space.shape, dtype=torch.uint8, device=device)
    actions = torch.zeros(shape, dtype=torch.long, device=device)
    logprobs = torch.zeros(shape, device=device)
    values = torch.zeros((args.num_steps + 1, args.num_envs), device=device)
    rewards = np.zeros(shape, dtype=np.float32)
    terminated = np.zeros(shape, dtype=bool)
    episode_ended = np.zeros(shape, dtype=bool)
    valid = np.zeros(shape, dtype=bool)

    next_obs, infos = envs.reset(seed=seed)
    lives = infos["lives"]
    # True where the env's previous step ended a game: its next step is the autoreset step.
    next_is_autoreset = np.zeros(args.num_envs, dtype=bool)
    # The gradients' mean over the torchrun ranks (alone: left as they are).
    average_over_ranks = functools.partial(mean_over_ranks, ranks=ranks)

    for iteration in range(start_iteration, num_iterations + 1):
        previous_step = global_step
        if args.anneal_lr:
            learning_rate = linear_schedule(args.learning_rate, iteration, num_iterations)
            optimizer.param_groups[0]["lr"] = learning_rate

        for step in range(args.num_steps):
            global_step += args.num_envs * ranks.world  # the steps of every rank
            obs[step] = torch.from_numpy(next_obs)
            # Gymnasium >= 1.0 autoresets on the step *after* a game ends: that step ignores the
            # action and returns the reset observation with reward 0. It is not a transition, so
            # it is kept out of the update (valid = False) instead of being learned from.
            valid[step] = ~next_is_autoreset
            with torch.inference_mode():
                action, logprob, _, value = agent.get_action_and_value(obs[step])
            values[step], actions[step], logprobs[step] = value, action, logprob

            next_obs, reward, term, trunc, infos = envs.step(action.cpu().numpy())
            # Clipped rewards, and a lost life as a terminal state (see learning_signals).
            rewards[step], terminated[step], episode_ended[step] = learning_signals(
                reward, term, trunc, infos["lives"], lives, next_is_autoreset,
                args.clip_rewards, args.episodic_life,
            )  # fmt: skip
            lives, next_is_autoreset = infos["lives"], term | trunc
            for i in np.flatnonzero(infos.get("_episode", [])):
                run.log_episode(infos["episode"]["r"][i], infos["episode"]["l"][i], global_step)

        with torch.inference_mode():
            # After the last step: V(next obs), which is V(final obs) where a game just ended.
            values[args.num_steps] = agent.get_value(torch.from_numpy(next_obs).to(device))
            rewards_t, terminated_t, episode_ended_t = (
                torch.from_numpy(array).to(device) for array in (rewards, terminated, episode_ended)
            )
            advantages, returns = compute_gae(
                rewards_t, values, terminated_t, episode_ended_t, args.gamma, args.gae_lambda
            )
        keep = torch.from_numpy(np.flatnonzero(valid)).to(device)  # the real transitions
        b_values, b_returns = values[:-1].flatten(), returns.flatten()
        b_advantages = advantages.flatten()
        stats = update(
            agent, optimizer, args, keep, obs.flatten(0, 1), actions.flatten(), logprobs.flatten(),
            b_advantages, b_returns, b_values, average_over_ranks,
        )  # fmt: skip

        # Logging, the NaN check, the progress bar, checkpoints and stop signals (a non-finite loss
        # or a signal to any rank stops every rank at the same iteration).
        scalars = {f"losses/{key}": value for key, value in stats.items() if key != "finite"}
        scalars["losses/explained_variance"] = explained_variance(b_values[keep], b_returns[keep])
        scalars["charts/learning_rate"] = optimizer.param_groups[0]["lr"]
        histograms = {"losses/advantages": b_advantages[keep]}
        if run.end_iteration(
            global_step, previous_step, scalars, training_state, stats["finite"], histograms
        ):
            break
    envs.close()

    def final_evaluation(video_folder: str | None) -> tuple[dict[str, np.ndarray], str]:
        """Rank 0 alone: --eval-episodes full games, the ones --eval-checkpoint plays again."""
        eval_envs = make_envs(
            args.env_id,
            args.eval_episodes,
            args.repeat_action_probability,
            args.env_backend,
            args.env_threads,
        )
        video = Path(video_folder) / "episode-0.mp4" if video_folder else None
        eval_seed = args.seed + EVAL_SEED_OFFSET
        returns = evaluate(agent, eval_envs, eval_seed, device, args.eval_greedy, video)
        return {"eval/episodic_return": returns}, eval_summary(returns)

    # Save, evaluate, summarise; after Ctrl-C or SIGTERM, exit 130 or 143 instead (on every rank).
    run.finish(training_state(), global_step, final_evaluation)


# ----------------------------------------------------------------------------------------------
# Plumbing: validation, evaluation, checkpoints, logging, stop signals, torchrun ranks.
# A first reading can stop here: nothing below changes what is learned or delivered.
# ----------------------------------------------------------------------------------------------

# Checkpoints say what they hold by this kind, not by the script's file name, so a renamed copy of
# this script still loads its own checkpoints.
CHECKPOINT_KIND = "ppo-atari-cnn/1"
EVALUATED_KINDS = ()  # earlier kinds that this version evaluates but does not resume: none yet
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
        args, "total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs",
        "eval_episodes", "torch_threads", "learning_rate", "clip_coef", "max_grad_norm",
    )  # fmt: skip
    check_non_negative(args, "checkpoint_freq", "log_interval", "env_threads")
    check_seed_room(args, "num_envs", "eval_episodes")
    check_fraction(args, "gamma", "gae_lambda")
    if args.repeat_action_probability is not None:  # None: the id's own
        check_fraction(args, "repeat_action_probability")
    if args.batch_size % args.num_minibatches:
        fail(
            f"--num-minibatches {args.num_minibatches} does not divide the batch of "
            f"{args.batch_size} (= num_envs {args.num_envs} x num_steps {args.num_steps})"
        )
    if args.target_kl is not None and args.target_kl <= 0:
        fail(f"--target-kl must be positive (or omitted), got {args.target_kl}")
    # Every other step of a rollout is a real transition at least (an autoreset step follows a
    # game's last step only), so this many leave no minibatch empty: under torchrun every rank must
    # take every gradient step, or the others would wait for it forever.
    if (
        int(os.environ.get("WORLD_SIZE", "1")) > 1
        and (args.num_steps // 2) * args.num_envs < args.num_minibatches
    ):
        fail(
            f"under torchrun each rank needs (--num-steps // 2) x --num-envs >= --num-minibatches "
            f"({args.num_steps // 2} x {args.num_envs} < {args.num_minibatches})"
        )
    if args.resume and args.eval_checkpoint:
        fail("give either --resume or --eval-checkpoint, not both")
    atari_game(args.env_id)


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


# Settings that may differ between a run and its resumption (budget, logging, tracking, speed,
# evaluation); every other setting must match the checkpoint's, or the resumed run would silently
# be a different experiment (another --num-envs, say, would not even match the saved iteration).
RESUME_MAY_CHANGE = {
    "total_timesteps", "resume", "eval_checkpoint", "eval_episodes", "cuda", "torch_threads",
    "track", "wandb_project_name", "wandb_entity", "wandb_group", "capture_video", "save_model",
    "checkpoint_freq", "log_interval", "eval_greedy", "env_threads", "bf16",
}  # fmt: skip
# Settings that shape the network or the game it plays: --eval-checkpoint may not change them.
MODEL_SETTINGS = {"env_id", "repeat_action_probability"}


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


def check_resume_step(global_step: int, batch_size: int, world: int) -> None:
    """Refuse to resume on `world` ranks a run saved in the middle of one of their iterations (one
    of a single process at an odd iteration, say): whole iterations from there would end past the
    budget, and the iteration-counted learning-rate schedule would lag behind the step."""
    rollouts = global_step // batch_size  # each of one rank's --num-envs x --num-steps
    if rollouts % world:
        *others, last = [str(n) for n in range(1, min(rollouts, 64) + 1) if rollouts % n == 0]
        fitting = f"{', '.join(others)} or {last} ranks" if others else "one rank"
        fail(
            f"the checkpoint is at step {global_step}, inside an iteration of {world} ranks "
            f"({world} x {batch_size} agent steps), so the run would end past its budget with a "
            f"shifted learning-rate schedule; resume it on {fitting}"
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


def native_bf16(device: torch.device) -> bool:
    """True where bfloat16 matrix arithmetic runs in hardware: Ampere or newer GPUs; CPUs with
    AVX512-BF16 or AMX. Elsewhere bf16 is emulated and slower than fp32, so the flag is ignored."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to ask, stay in fp32
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


# Copied from ppo_cartpole.py: restore
def restore(checkpoint: dict, path: str, **objects) -> None:
    """Load each object's saved state (model=agent, optimizer=...); a mismatch fails in one line."""
    try:
        for key, target in objects.items():
            target.load_state_dict(checkpoint[key])
    except (RuntimeError, ValueError, KeyError) as error:
        fail(f"{path} does not match this network ({str(error).splitlines()[0]})")


@torch.inference_mode()
def evaluate(
    agent: Agent | None,
    envs: gym.vector.VectorEnv,
    seed: int,
    device: torch.device,
    greedy: bool = False,
    video_path: Path | None = None,
) -> np.ndarray:
    """Play one full episode in each of the vector's envs; return their true (unclipped) returns.

    The policy is sampled by default, as the Atari literature scores PPO: an argmax policy can
    freeze in a state it never learnt to leave (Breakout waits for FIRE after a lost life), and
    the episode then runs to the 30-minute cap. `seed` seeds the sampling as well as the games, so
    a checkpoint evaluated later plays the very games the end of its training run played.
    `agent=None` plays uniformly random actions: the baseline a learnt policy must beat.
    With `video_path`, the first env's game is written there as the network saw it (the newest
    frame of each observation, 84x84 grayscale, 15 agent steps per second of video): a video of
    the very preprocessing the policy was trained and evaluated on, not of another pipeline.
    """
    torch.manual_seed(seed)
    returns = np.full(envs.num_envs, np.nan)
    obs, _ = envs.reset(seed=seed)
    frames = [obs[0, -1]]
    while np.isnan(returns).any():
        if agent is None:
            action = torch.randint(int(envs.single_action_space.n), (envs.num_envs,))
        else:
            obs = torch.from_numpy(obs).to(device)
            action = agent.greedy_action(obs) if greedy else agent.get_action_and_value(obs)[0]
        obs, _, _, _, infos = envs.step(action.cpu().numpy())
        if np.isnan(returns[0]):
            frames.append(obs[0, -1])
        if "episode" in infos:
            first = infos["_episode"] & np.isnan(returns)
            returns[first] = infos["episode"]["r"][first]
    envs.close()
    if video_path is not None:
        write_video(video_path, frames)
    return returns


def write_video(path: Path, frames: list[np.ndarray], fps: int = 15) -> None:
    """84x84 grayscale frames as an mp4, each pixel drawn 4x4 so players can see the game."""
    from moviepy import ImageSequenceClip

    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = [np.repeat(frame.repeat(4, 0).repeat(4, 1)[..., None], 3, axis=-1) for frame in frames]
    ImageSequenceClip(rgb, fps=fps).write_videofile(str(path), logger=None, audio=False)


# Copied from ppo_cartpole.py: eval_summary
def eval_summary(returns: np.ndarray) -> str:
    return f"eval return {returns.mean():.2f} ± {returns.std():.2f} over {len(returns)} episodes"


def evaluate_checkpoint(args: Args) -> None:
    """--eval-checkpoint: rebuild the agent from the checkpoint and play --eval-episodes games with
    the evaluation seed of the end of training, so the figures are those that run printed. Given
    a folder (runs/<run>/checkpoints), evaluate each checkpoint in it and draw the curve."""
    # Chosen at the first game, so that bad input is reported before the device notice.
    device = functools.cache(lambda: pick_device(args.cuda, args.torch_threads))

    def load(path: str) -> dict:
        checkpoint = load_checkpoint(path)
        check_settings(
            args, checkpoint["args"], may_change=set(checkpoint["args"]) - MODEL_SETTINGS
        )
        return checkpoint

    def play(checkpoint: dict | None, path: str, video_path: Path | None = None) -> dict:
        agent = None
        if checkpoint is not None:
            agent = build_agent(args.env_id, device(), args.bf16)
            restore(checkpoint, path, model=agent)
        envs = make_envs(
            args.env_id,
            args.eval_episodes,
            args.repeat_action_probability,
            args.env_backend,
            args.env_threads,
        )
        seed = args.seed + EVAL_SEED_OFFSET
        return {"return": evaluate(agent, envs, seed, device(), args.eval_greedy, video_path)}

    if Path(args.eval_checkpoint).is_dir():
        evaluate_checkpoint_folder(
            args.eval_checkpoint, load, play, CHECKPOINT_SUFFIX, "agent steps"
        )
        return
    checkpoint = load(args.eval_checkpoint)
    video = (
        Path(f"videos/{checkpoint['run_name']}/eval-checkpoint/episode-0.mp4")
        if args.capture_video
        else None
    )
    returns = play(checkpoint, args.eval_checkpoint, video)["return"]
    print(f"{eval_summary(returns)} ({args.eval_checkpoint})")


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


# Rank r of a torchrun launch seeds with seed + r x this: its own games and random numbers, far
# from the evaluation's seeds.
RANK_SEED_OFFSET = 1_000_000
# How long a rank waits in a collective for the others: a rank that died ends the rest with an
# error after this at most (gloo notices a closed connection at once; a hung host takes this long).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=5)


class Ranks:
    """The processes of a torchrun launch (WORLD_SIZE, RANK and LOCAL_RANK in the environment).

    Why an explicit all-reduce rather than DistributedDataParallel: the whole of it is the line in
    `update` that averages the gradients (`mean_over_ranks`), which also makes every rank stop its
    epochs together under --target-kl; DDP would wrap the agent (`agent.module...`) for the same
    averaging, spread over backward hooks. Launched without torchrun this is rank 0 of 1, and every
    method returns at once: no process group, no extra work.
    """

    def __init__(self, want_cuda: bool):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.cuda = want_cuda and torch.cuda.is_available()
        # What must still be written when a lost collective ends this process at once (MainRun
        # closes rank 0's TensorBoard log here).
        self.before_hard_exit: Callable[[], None] = lambda: None
        if self.world > 1:
            # nccl between GPUs, gloo between CPU processes (on one machine or several).
            backend = "nccl" if self.cuda else "gloo"
            if self.cuda:
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, saves checkpoints and evaluates."""
        return self.rank == 0

    def local_device(self, device: torch.device) -> torch.device:
        """Each rank of a machine on its own GPU."""
        return (
            torch.device("cuda", self.local_rank)
            if device.type == "cuda" and self.world > 1
            else device
        )

    def collective(self, operation: Callable[[], object]) -> None:
        """Run a collective; a rank that died or hangs ends this one in one line, no traceback."""
        try:
            operation()
        except (RuntimeError, dist.DistBackendError) as error:
            reason = str(error).splitlines()[0]
            message = f"error: rank {self.rank}: another rank stopped answering ({reason})"
            print(message, file=sys.stderr)
            self.before_hard_exit()
            os._exit(1)  # the process group cannot be shut down cleanly without the lost rank

    def copy_from_rank_0(self, module: nn.Module) -> None:
        """Give every rank rank 0's parameters (each rank initialised its own from its own seed)."""
        if self.world > 1:
            for tensor in module.state_dict().values():
                self.collective(lambda tensor=tensor: dist.broadcast(tensor, src=0))

    def barrier(self) -> None:
        """Wait here until every rank is here. torchrun stops every rank as soon as one exits with
        an error, so the others wait for rank 0 to write its checkpoint before they exit."""
        if self.world > 1:
            here = torch.zeros(1, device=self.device_of_collectives)
            self.collective(lambda: dist.all_reduce(here))

    def agree_on_signal(self, signum: int | None) -> int | None:
        """The stop signal of this rank, else of any other (None: none got one): Ctrl-C or SIGTERM
        to one rank stops every rank at the same iteration."""
        if self.world == 1:
            return signum
        agreed = torch.tensor([signum or 0], device=self.device_of_collectives)
        self.collective(lambda: dist.all_reduce(agreed, op=dist.ReduceOp.MAX))
        return signum or int(agreed.item()) or None

    def check_identical(self, state_dict: dict[str, torch.Tensor]) -> None:
        """After training, check that every rank holds the same parameters, bit for bit."""
        if self.world == 1:
            return
        flat = torch.cat([tensor.detach().flatten().float() for tensor in state_dict.values()])
        lowest, highest = flat.clone(), flat.clone()
        self.collective(lambda: dist.all_reduce(lowest, op=dist.ReduceOp.MIN))
        self.collective(lambda: dist.all_reduce(highest, op=dist.ReduceOp.MAX))
        if not torch.equal(lowest, highest):
            print(
                f"error: rank {self.rank}: the ranks' parameters differ after training",
                file=sys.stderr,
            )
            sys.exit(1)
        if self.is_main:
            print(
                f"ranks: {self.world} ranks, parameters identical after training", file=sys.stderr
            )

    @property
    def device_of_collectives(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.cuda else torch.device("cpu")

    def close(self) -> None:
        if self.world > 1:
            dist.destroy_process_group()


class MainRun(Run):
    """Rank 0's `Run`: the other ranks wait at a barrier for its saves before they exit alike (see
    `RankRun`), and its TensorBoard log is closed before any exit, also the hard one of a lost
    collective. Alone, it is the plain `Run` (every collective returns at once)."""

    def __init__(self, args: Args, total_steps: int, ranks: Ranks):
        if args.resume and ranks.world > 1:  # before anything is written into the run's folder
            saved_step = load_checkpoint(args.resume)["global_step"]
            check_resume_step(saved_step, args.batch_size, ranks.world)
        super().__init__(args, total_steps)
        self.ranks = ranks
        ranks.before_hard_exit = self.writer.close

    def end_iteration(
        self, global_step, previous_step, scalars, state, finite=True, histograms=None
    ) -> bool:
        try:  # on a non-finite loss: save the state, exit 1
            super().end_iteration(global_step, previous_step, scalars, state, finite, histograms)
        finally:
            if not finite:  # which every rank saw: they exit 1 too, once the state is saved
                self.ranks.barrier()
        self.signum = self.ranks.agree_on_signal(self.signum)
        return self.signum is not None

    def finish(self, state, global_step, final_evaluation) -> None:
        self.ranks.check_identical(state["model"])
        # Stopped by a signal that every rank agreed on (one during the evaluation is rank 0's).
        stopped = self.signum is not None
        try:  # save; after a stop signal, exit 128 + n, else evaluate alone
            super().finish(state, global_step, final_evaluation)
        finally:
            if stopped:  # the other ranks exit 128 + n too, once the state is saved
                self.ranks.barrier()
        self.ranks.close()


class RankRun(Run):
    """The `Run` of a rank other than 0: it logs and saves nothing, and exits where rank 0 does,
    once rank 0 has saved what it saves there (every rank gets the same verdict at the same step:
    a non-finite loss in the gradients' all-reduce, a stop signal in `Ranks.agree_on_signal`)."""

    def __init__(self, args: Args, total_steps: int, ranks: Ranks):
        self.args, self.ranks, self.name = args, ranks, None  # rank 0 names the run
        self.resumed = load_checkpoint(args.resume, resume=True) if args.resume else None
        self.start_step = 0 if self.resumed is None else self.resumed["global_step"]
        if self.resumed is not None:
            check_settings(args, self.resumed["args"], RESUME_MAY_CHANGE)
            check_resume_step(self.start_step, args.batch_size, ranks.world)
        self.signum, self.evaluating = None, False
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)

    def log_episode(self, *args) -> None: ...

    def end_iteration(
        self, global_step, previous_step, scalars, state, finite=True, histograms=None
    ) -> bool:
        if not finite:  # rank 0 saves the state (its copy of the network is this one's)
            self.ranks.barrier()
            print(f"error: loss became non-finite at step {global_step}", file=sys.stderr)
            sys.exit(1)
        self.signum = self.ranks.agree_on_signal(self.signum)
        return self.signum is not None

    def finish(self, state, global_step, final_evaluation) -> None:
        self.ranks.check_identical(state["model"])
        if self.signum is not None:  # rank 0 saves the state, then every rank exits 128 + n
            self.ranks.barrier()
            sys.exit(128 + self.signum)
        self.ranks.close()  # rank 0 goes on to evaluate alone


if __name__ == "__main__":
    main(parse_args())
