"""Proximal Policy Optimisation (clipped surrogate, GAE) on vectorised CartPole-v1.

Trains a discrete-action PPO agent with separate actor and critic MLPs on any gymnasium
environment with a 1-D Box observation and a Discrete action space (CartPole-v1 by default;
Acrobot-v1 and MountainCar-v0 work too). The implementation follows the well-known PPO details:
orthogonal initialisation, GAE, advantage normalisation, the clipped surrogate loss (and, as a
flag, a clipped value loss), entropy bonus, global gradient clipping, learning-rate annealing and
an optional target-KL early stop.

Run:
    python ppo_cartpole.py                      # train, evaluate, save runs/<run>/ppo_cartpole.pt
    python ppo_cartpole.py --resume runs/<run>/ppo_cartpole.pt          # continue an interrupted run
    python ppo_cartpole.py --eval-checkpoint runs/<run>/ppo_cartpole.pt --capture-video
    tensorboard --logdir runs

Expect: the run stops as soon as the greedy policy is solved (every one of 10 fresh episodes at
475 or more, checked every 1024 steps) and then scores 500 ± 0 on the 10 evaluation episodes:
with seeds 1 / 2 / 3 after 11,264 / 9,216 / 8,192 environment steps, 1.3-1.8 s of training. Over
seeds 101-106 the median stop was 12.3k steps (1k-31.7k; evaluations 492.3-500). As a whole process
the default command took 2.0-5.7 s on this project's 2-core CPU (seeds 4-6), ~1.3 s of it starting
Python and importing torch; SB3's PPO with the RL-Zoo settings needed 9-19 s to reach a solved
training mean (benchmarks/README.md). `--no-stop-when-solved` trains the whole 100k-step budget.
"""

from __future__ import annotations

import difflib
import gc
import hashlib
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

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

# Checkpoints say what they hold by this kind, not by the script's file name, so a renamed copy of
# this script still loads its own checkpoints.
CHECKPOINT_KIND = "ppo-discrete-mlp/2"


@dataclass
class Args:
    exp_name: str = Path(__file__).stem
    """name of this experiment (part of the run name and of the checkpoint file name)"""
    seed: int = 1
    """seed of random, NumPy, torch and the environments (env i gets seed + i)"""
    torch_deterministic: bool = True
    """make cuDNN deterministic (cudnn.deterministic=True, cudnn.benchmark=False)"""
    cuda: bool = True
    """use a GPU when one is present (a network this small runs as fast on the CPU)"""
    torch_threads: int = 1
    """CPU threads for torch (1 measured fastest for this network on a 2-core CPU)"""
    track: bool = False
    """log the run to Weights & Biases (works offline with WANDB_MODE=offline)"""
    wandb_project_name: str = "rl-scripts"
    """the W&B project"""
    wandb_entity: str | None = None
    """the W&B entity (team or user); None uses your default"""
    wandb_group: str | None = None
    """W&B group, so the seeds of one experiment plot together (default: --exp-name)"""
    capture_video: bool = False
    """record the evaluation episodes as mp4 under videos/<run_name>/"""
    save_model: bool = True
    """save the checkpoint runs/<run_name>/<exp_name>.pt (at the end, periodically, on Ctrl-C)"""
    checkpoint_freq: int = 50_000
    """also save a checkpoint every this many environment steps, each kept in
    runs/<run_name>/checkpoints/ with the trained agent at the end (0: none of them)"""
    log_interval: int = 256
    """write the loss statistics every this many environment steps (256: every iteration)"""
    resume: str | None = None
    """path of a checkpoint to continue training from (with the checkpoint's settings)"""
    eval_checkpoint: str | None = None
    """path of a checkpoint to evaluate for --eval-episodes episodes, then exit"""
    eval_episodes: int = 10
    """episodes of the final greedy evaluation (and of --eval-checkpoint and of each solved check)"""
    stop_when_solved: bool = True
    """end training once the greedy policy solves the env: every --solved-check-freq steps it plays
    --eval-episodes fresh episodes, and if every one reaches --solved-return the run stops, as with
    SB3's StopTrainingOnRewardThreshold (--no-stop-when-solved trains the full budget)"""
    solved_check_freq: int = 1024
    """environment steps between two checks of --stop-when-solved (a check of an unsolved policy
    costs only its shortest episode, a solved one ~0.1 s)"""
    solved_return: float | None = None
    """the return every check episode must reach to count as solved (default: the env's registered
    reward threshold, 475 for CartPole-v1; an env without one trains the full budget)"""

    env_id: str = "CartPole-v1"
    """a gymnasium environment with a 1-D Box observation and a Discrete action space"""
    total_timesteps: int = 100_000
    """environment steps to train for (summed over the vectorised envs)"""
    learning_rate: float = 5e-3
    """Adam learning rate (annealed linearly to 0 with --anneal-lr); 5e-3 solved CartPole in a
    median 11k steps over six seeds, 2.5e-3 in 29k and 1e-2 in 13k (but up to 49k)"""
    num_envs: int = 8
    """number of environments stepped in parallel"""
    num_steps: int = 32
    """steps per environment in each rollout"""
    anneal_lr: bool = True
    """anneal the learning rate linearly to 0 over training"""
    gamma: float = 0.98
    """discount factor"""
    gae_lambda: float = 0.8
    """lambda of generalised advantage estimation"""
    num_minibatches: int = 1
    """minibatches per epoch (must divide num_envs * num_steps)"""
    update_epochs: int = 10
    """epochs of optimisation over each rollout"""
    norm_adv: bool = True
    """normalise advantages per minibatch"""
    clip_coef: float = 0.2
    """surrogate clipping coefficient epsilon"""
    clip_vloss: bool = False
    """clip the value loss around the old value estimates, as the policy loss is clipped (off: it
    slowed CartPole down by ~30% in environment steps, as Andrychowicz et al. 2021 found broadly)"""
    ent_coef: float = 0.0
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
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


def make_envs(env_id: str, num_envs: int) -> gym.vector.VectorEnv:
    """Vectorised envs with episode statistics, through the fastest implementation available.

    CartPole has a pure-NumPy vector implementation (`vector_entry_point`) that steps all envs in
    one call, about 1.5x faster than a loop over envs; other envs are stepped in a loop. Either
    way the env autoresets on the *next* step (gymnasium >= 1.0), which `main` masks out of the
    rollout.
    """
    mode = "vector_entry_point" if gym.spec(env_id).vector_entry_point else "sync"
    envs = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode=mode)
    return gym.wrappers.vector.RecordEpisodeStatistics(envs)


def layer_init(layer: nn.Linear, gain: float = np.sqrt(2), bias: float = 0.0) -> nn.Linear:
    """Orthogonal weights and constant bias: keeps activations well-scaled through tanh layers."""
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.constant_(layer.bias, bias)
    return layer


class Agent(nn.Module):
    """Separate actor and critic MLPs: sharing a trunk couples the two losses' scales."""

    def __init__(self, obs_dim: int, num_actions: int, hidden_size: int = 64):
        super().__init__()
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden_size)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden_size, hidden_size)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden_size, 1), gain=1.0),
        )
        # A 0.01-gain policy head starts with near-uniform action probabilities: early
        # exploration is not left to the luck of the initialisation.
        self.actor = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden_size)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden_size, hidden_size)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden_size, num_actions), gain=0.01),
        )

    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)

    def get_action_and_value(self, obs: torch.Tensor, action: torch.Tensor | None = None):
        """Sample an action (or score a given one): action, log-prob, entropy, value.

        This is `Categorical(logits=...)` written out with log-softmax: the same numbers, for less
        per-call overhead, which is what dominates on a network this small (measured in
        benchmarks/README.md, "Speed choices").
        """
        log_probs = self.actor(obs).log_softmax(dim=-1)
        if action is None:
            action = torch.multinomial(log_probs.exp(), num_samples=1).squeeze(-1)
        log_prob = log_probs.gather(-1, action.unsqueeze(-1)).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
        return action, log_prob, entropy, self.get_value(obs)

    def greedy_action(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor(obs).argmax(dim=-1)


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


def linear_schedule(start: float, iteration: int, num_iterations: int) -> float:
    """Value at 1-based `iteration` of a linear decay from `start` (iteration 1) towards 0."""
    return start * (1.0 - (iteration - 1.0) / num_iterations)


def explained_variance(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """1 - Var(targets - predictions) / Var(targets): 1 is perfect, 0 is no better than a mean."""
    target_variance = targets.var()
    if target_variance == 0:
        return float("nan")
    return float(1.0 - (targets - predictions).var() / target_variance)


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
    """Several epochs of minibatch PPO over one rollout; returns the last epoch's statistics and
    whether the losses and the weights stayed finite."""
    batch = len(b_obs)
    if batch == 0:
        return {"finite": True}  # every step of a tiny rollout was an autoreset step: nothing to learn
    clipfracs = []
    stats = {}
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
            # One advantage has no spread to normalise by (its std is NaN).
            if args.norm_adv and len(advantages) > 1:
                advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
            policy_loss, value_loss, ratio = ppo_loss(
                new_logprob,
                b_logprobs[minibatch],
                advantages,
                new_value,
                b_values[minibatch],
                b_returns[minibatch],
                args.clip_coef,
                args.clip_vloss,
            )
            entropy_loss = entropy.mean()
            loss = policy_loss - args.ent_coef * entropy_loss + args.vf_coef * value_loss
            if not torch.isfinite(loss):
                return {"finite": False}

            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            optimizer.step()

            with torch.no_grad():
                # Schulman's estimators of KL(old || new): the second is unbiased with lower variance.
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
    stats["explained_variance"] = explained_variance(b_values, b_returns)
    stats["finite"] = all(parameter.isfinite().all() for parameter in agent.parameters())
    return stats


def main(args: Args) -> None:
    validate(args)
    if args.eval_checkpoint:
        evaluate_checkpoint(args)
        return
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    if checkpoint is not None:
        check_settings(args, checkpoint["args"], RESUME_MAY_CHANGE)
        run_name, global_step = checkpoint["run_name"], checkpoint["global_step"]
        start_iteration = checkpoint["iteration"] + 1
    else:
        run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
        global_step, start_iteration = 0, 1
    run = Run(args, run_name, total_steps=args.num_iterations * args.batch_size, global_step=global_step)
    # A resumed run reseeds with an offset so it does not replay the random stream of its start.
    seed = args.seed + (start_iteration - 1)
    seed_everything(seed, args.torch_deterministic)
    device = pick_device(args.cuda, args.torch_threads)

    envs = make_envs(args.env_id, args.num_envs)
    agent = build_agent(args.env_id, args.hidden_size, device)
    # eps=1e-5 rather than 1e-8, as in the reference PPO implementation.
    optimizer = Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    if checkpoint is not None:
        restore(checkpoint, args.resume, agent, optimizer)

    def training_state() -> dict:
        return {
            "kind": CHECKPOINT_KIND,
            "env_id": args.env_id,
            "run_name": run_name,
            "args": asdict(args),
            "global_step": global_step,
            "iteration": iteration,  # the learning-rate schedule's position
            "model": agent.state_dict(),
            "optimizer": optimizer.state_dict(),
        }

    # Rollout storage, preallocated: no per-step Python lists of tensors. What the network produces
    # lives on its device; what the envs return (rewards, done flags) stays in NumPy until the
    # rollout is complete and goes to the device in one copy per array, not one per step.
    obs_shape = envs.single_observation_space.shape
    obs = torch.zeros((args.num_steps, args.num_envs, *obs_shape), device=device)
    actions = torch.zeros((args.num_steps, args.num_envs), dtype=torch.long, device=device)
    logprobs = torch.zeros((args.num_steps, args.num_envs), device=device)
    rewards = np.zeros((args.num_steps, args.num_envs), dtype=np.float32)
    terminated = np.zeros((args.num_steps, args.num_envs), dtype=bool)
    episode_ended = np.zeros((args.num_steps, args.num_envs), dtype=bool)
    values = torch.zeros((args.num_steps + 1, args.num_envs), device=device)

    next_obs, _ = envs.reset(seed=seed)
    next_obs = torch.as_tensor(next_obs, dtype=torch.float32, device=device)
    # True where the last step of the previous rollout ended an episode.
    previous_rollout_ended = np.zeros(args.num_envs, dtype=bool)
    solved_return, solved_at = solved_threshold(args), None

    iteration = start_iteration - 1  # the last iteration done: training_state saves it
    for iteration in range(start_iteration, args.num_iterations + 1):
        previous_step = global_step
        if args.anneal_lr:
            optimizer.lr = linear_schedule(args.learning_rate, iteration, args.num_iterations)

        for step in range(args.num_steps):
            global_step += args.num_envs
            obs[step] = next_obs
            with torch.inference_mode():
                action, logprob, _, value = agent.get_action_and_value(next_obs)
            values[step], actions[step], logprobs[step] = value, action, logprob

            next_obs_np, rewards[step], terminated[step], truncated, infos = envs.step(action.cpu().numpy())
            episode_ended[step] = terminated[step] | truncated
            next_obs = torch.as_tensor(next_obs_np, dtype=torch.float32, device=device)
            for i in np.flatnonzero(infos.get("_episode", [])):
                run.log_episode(float(infos["episode"]["r"][i]), int(infos["episode"]["l"][i]), global_step)

        with torch.inference_mode():
            # After the last step: V(next obs), which is V(final obs) where an episode just ended.
            values[args.num_steps] = agent.get_value(next_obs)
            advantages, returns = compute_gae(
                torch.as_tensor(rewards, device=device),
                values,
                torch.as_tensor(terminated, device=device),
                torch.as_tensor(episode_ended, device=device),
                args.gamma,
                args.gae_lambda,
            )

        # Gymnasium >= 1.0 autoresets on the step *after* an episode ends: that step ignores the
        # action and returns the reset observation with reward 0. It is not a transition, so it is
        # dropped from the update rather than learned from. Flatten the rollout without those steps.
        autoreset = np.concatenate([previous_rollout_ended[None], episode_ended[:-1]])
        previous_rollout_ended = episode_ended[-1].copy()
        keep = torch.as_tensor(~autoreset, device=device).reshape(-1)
        b_obs = obs.reshape(-1, *obs_shape)[keep]
        b_actions = actions.reshape(-1)[keep]
        b_logprobs = logprobs.reshape(-1)[keep]
        b_advantages = advantages.reshape(-1)[keep]
        b_returns = returns.reshape(-1)[keep]
        b_values = values[:-1].reshape(-1)[keep]

        stats = update(
            agent, optimizer, args, b_obs, b_actions, b_logprobs, b_advantages, b_returns, b_values
        )

        run.stop_if_not_finite(stats.pop("finite"), training_state, global_step)
        if crossed(args.log_interval, global_step, previous_step):
            losses = {f"losses/{key}": value for key, value in stats.items()}
            run.log({**losses, "charts/learning_rate": optimizer.lr}, global_step)
            if crossed(10 * args.log_interval, global_step, previous_step):
                run.writer.add_histogram("losses/advantages", b_advantages, global_step)
        run.advance(global_step)
        run.checkpoint(training_state, global_step, previous_step)
        if run.stop.requested:
            break

        # Stop once solved, as judged by the greedy policy on fresh episodes (never those of the
        # final evaluation): the training return lags behind it, since sampled actions keep
        # exploring. Every episode must reach the threshold, not only their mean, so that the
        # final evaluation on other episodes passes too.
        if solved_return is not None and crossed(args.solved_check_freq, global_step, previous_step):
            check_seed = args.seed + SOLVED_CHECK_SEED_OFFSET + global_step
            check_returns = evaluate(
                agent, args.env_id, args.eval_episodes, check_seed, device, give_up_below=solved_return
            )
            if check_returns.min() >= solved_return:
                solved_at = global_step
                break
    envs.close()
    run.end_training(training_state(), global_step)  # after Ctrl-C or SIGTERM: exits 130 or 143

    video_folder = f"videos/{run_name}/eval" if args.capture_video else None
    eval_returns = evaluate(
        agent, args.env_id, args.eval_episodes, args.seed + EVAL_SEED_OFFSET, device, video_folder
    )
    for episode, episode_return in enumerate(eval_returns):
        run.log({"eval/episodic_return": episode_return}, episode)
    mean, std = eval_returns.mean(), eval_returns.std()
    solved = f"solved at step {solved_at}; " if solved_at is not None else ""
    run.finish(global_step, f"{solved}eval return {mean:.2f} ± {std:.2f} over {len(eval_returns)} episodes")


# ----------------------------------------------------------------------------------------------
# Plumbing: validation, evaluation of a checkpoint, checkpoint files, logging and stop signals.
# A first reading can stop here: nothing below changes what the algorithm computes.
# ----------------------------------------------------------------------------------------------

EVAL_SEED_OFFSET = 10_000  # evaluation envs get seed + this: episodes that training never saw
# The checks of --stop-when-solved play seed + this + the step: never the final evaluation's episodes.
SOLVED_CHECK_SEED_OFFSET = 20_000


def crossed(every: int, step: int, previous_step: int) -> bool:
    """True when a multiple of `every` lies in (previous_step, step]: periodic work (logging,
    checkpoints) is counted in environment steps, whatever the steps per iteration."""
    return every > 0 and step // every != previous_step // every


def fail(message: str) -> NoReturn:
    """Report bad input as one line on stderr and exit with status 2 (no traceback)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def validate(args: Args) -> None:
    """Check every knob before any heavy work, so a typo costs a second, not a run."""
    for name in (
        "total_timesteps",
        "num_envs",
        "num_steps",
        "num_minibatches",
        "update_epochs",
        "torch_threads",
        "solved_check_freq",
    ):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.eval_episodes <= 0:
        fail(f"--eval-episodes must be positive, got {args.eval_episodes}")
    for name in ("checkpoint_freq", "log_interval"):
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.batch_size % args.num_minibatches:
        fail(
            f"--num-minibatches {args.num_minibatches} does not divide the batch of "
            f"{args.batch_size} (= num_envs {args.num_envs} x num_steps {args.num_steps})"
        )
    for name in ("gamma", "gae_lambda"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            fail(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    for name in ("learning_rate", "clip_coef", "max_grad_norm", "hidden_size"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.target_kl is not None and args.target_kl <= 0:
        fail(f"--target-kl must be positive (or omitted), got {args.target_kl}")
    if args.resume and args.eval_checkpoint:
        fail("give either --resume or --eval-checkpoint, not both")
    check_env(args.env_id)


def check_env(env_id: str) -> None:
    """Fail with suggestions for an unknown id, and with an explanation for unusable spaces."""
    if env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, list(gym.registry), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        fail(f"unknown environment id {env_id!r}{hint}")
    env = gym.make(env_id)
    observation_space, action_space = env.observation_space, env.action_space
    env.close()
    if not isinstance(action_space, gym.spaces.Discrete):
        fail(f"{env_id} has a {type(action_space).__name__} action space; this script needs Discrete")
    if not isinstance(observation_space, gym.spaces.Box) or len(observation_space.shape) != 1:
        fail(f"{env_id} observations are {observation_space}; this script needs a 1-D Box")


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


# Flags that may differ between a run and its resumption (budget, logging, tracking); every other
# setting must match the checkpoint's, or the resumed run would silently be a different experiment.
RESUME_MAY_CHANGE = {
    "total_timesteps", "resume", "eval_checkpoint", "eval_episodes", "cuda", "torch_threads", "track",
    "wandb_project_name", "wandb_entity", "wandb_group", "capture_video", "save_model",
    "checkpoint_freq", "log_interval", "stop_when_solved", "solved_check_freq", "solved_return",
}  # fmt: skip
# Settings that shape the environment or the network: --eval-checkpoint may not change them.
MODEL_SETTINGS = {"env_id", "hidden_size"}


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


def seed_everything(seed: int, torch_deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic
    torch.backends.cudnn.benchmark = not torch_deterministic


def pick_device(want_cuda: bool, torch_threads: int) -> torch.device:
    """The GPU when asked for and present, else the CPU with a notice; `torch_threads` CPU threads."""
    torch.set_num_threads(torch_threads)
    if want_cuda and torch.cuda.is_available():
        return torch.device("cuda")
    if want_cuda:
        print("note: no CUDA device found, training on the CPU", file=sys.stderr)
    return torch.device("cpu")


def build_agent(env_id: str, hidden_size: int, device: torch.device) -> Agent:
    env = gym.make(env_id)
    agent = Agent(int(np.prod(env.observation_space.shape)), int(env.action_space.n), hidden_size)
    env.close()
    return agent.to(device)


def restore(checkpoint: dict, path: str, agent: Agent, optimizer: Adam | None = None) -> None:
    """Load the saved weights (and optimiser state); a mismatch fails with one line."""
    try:
        agent.load_state_dict(checkpoint["model"])
        if optimizer is not None:
            optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        fail(f"{path} does not match this network ({str(error).splitlines()[0]})")


@torch.inference_mode()
def evaluate(
    agent: Agent,
    env_id: str,
    episodes: int,
    seed: int,
    device: torch.device,
    video_folder: str | None = None,
    give_up_below: float | None = None,
) -> np.ndarray:
    """Play one full episode of the greedy policy in each of `episodes` envs at once (env i seeded
    seed + i); return their undiscounted returns. With `give_up_below`, stop as soon as an episode
    ends with less (the returns so far come back): a check of an unsolved policy then costs only
    its shortest episode."""

    def make_env(index: int) -> Callable[[], gym.Env]:
        def thunk() -> gym.Env:
            env = gym.make(env_id, render_mode="rgb_array" if video_folder else None)
            if video_folder is None:
                return env
            # Each env records its first episode (env-<i>-episode-0.mp4): one video per evaluation
            # episode. The recorders after the first find the folder the first one made; the
            # warning about overwriting it would be about their siblings, so it is theirs to skip.
            with warnings.catch_warnings():
                if index > 0:
                    warnings.filterwarnings("ignore", message=".*Overwriting existing videos")
                return gym.wrappers.RecordVideo(
                    env, video_folder, name_prefix=f"env-{index}", disable_logger=True,
                    episode_trigger=lambda episode: episode == 0,
                )  # fmt: skip

        return thunk

    envs = gym.vector.SyncVectorEnv([make_env(index) for index in range(episodes)])
    obs, _ = envs.reset(seed=seed)
    returns, playing = np.zeros(episodes), np.ones(episodes, dtype=bool)
    while playing.any():
        actions = agent.greedy_action(torch.as_tensor(obs, dtype=torch.float32, device=device))
        obs, rewards, terminated, truncated, _ = envs.step(actions.cpu().numpy())
        returns += rewards * playing  # an env whose episode has ended plays on, uncounted
        ended = playing & (terminated | truncated)
        playing &= ~ended
        if give_up_below is not None and (returns[ended] < give_up_below).any():
            break
    envs.close()
    return returns


def solved_threshold(args: Args) -> float | None:
    """The mean greedy return at which --stop-when-solved ends training (None: never)."""
    if not args.stop_when_solved:
        return None
    return args.solved_return if args.solved_return is not None else gym.spec(args.env_id).reward_threshold


def evaluate_checkpoint(args: Args) -> None:
    """--eval-checkpoint: rebuild the agent from the saved settings and run the greedy policy with
    the same evaluation seed as the end of training, so the figures are the same."""
    checkpoint = load_checkpoint(args.eval_checkpoint)
    check_settings(args, checkpoint["args"], may_change=set(checkpoint["args"]) - MODEL_SETTINGS)
    device = pick_device(args.cuda, args.torch_threads)
    agent = build_agent(args.env_id, args.hidden_size, device)
    restore(checkpoint, args.eval_checkpoint, agent)
    video_folder = f"videos/{checkpoint['run_name']}/eval-checkpoint" if args.capture_video else None
    returns = evaluate(
        agent, args.env_id, args.eval_episodes, args.seed + EVAL_SEED_OFFSET, device, video_folder
    )
    print(
        f"eval return {returns.mean():.2f} ± {returns.std():.2f} over {len(returns)} episodes"
        f" ({args.eval_checkpoint})"
    )


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


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
