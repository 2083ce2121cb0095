"""Synchronous advantage actor-critic (A2C, n-step returns with GAE) on vectorised CartPole-v1.

Trains a discrete-action A2C agent -- one shared MLP trunk with a policy head and a value head --
on any gymnasium environment with a 1-D Box observation and a Discrete action space (CartPole-v1
by default; Acrobot-v1 works too). Every iteration steps all envs for a few steps, turns the
rollout into n-step / GAE targets, and takes ONE gradient step on policy loss + value loss -
entropy bonus (no replay, no epochs, no ratio clipping: that is what makes it A2C, not PPO).
Details: orthogonal initialisation, correct truncation bootstrapping and next-step autoreset
masking (gymnasium >= 1.0), global gradient clipping, Adam or RMSprop, learning-rate annealing.

Run:
    python actor_critic.py                      # train, evaluate, save runs/<run>/actor_critic.pt
    python actor_critic.py --resume runs/<run>/actor_critic.pt       # continue an interrupted run
    python actor_critic.py --eval-checkpoint runs/<run>/actor_critic.pt --capture-video
    tensorboard --logdir runs

Expect: the run stops as soon as the greedy policy is solved (every one of 10 fresh episodes at
475 or more, checked every 1024 steps): with seeds 1 / 2 / 3 after 26,624 / 53,248 / 38,912
environment steps, then evaluating 496.7 ± 9.9 / 500 ± 0 / 500 ± 0 on the 10 evaluation episodes
(2.3-5.5 s of training; over seeds 101-106 the median stop was 25k steps, at most 36k). As a whole
process the default command took 3.6-5.6 s on this project's 2-core CPU (seeds 4-6), ~1.3 s of
it starting Python and importing torch; SB3's A2C with the RL-Zoo settings needed 13-25 s to
reach a solved training mean (benchmarks/README.md). Without the stop, training on to the 100k
budget can lose the solved policy again (seed 3 then evaluated 248.5 ± 11.2):
`--no-stop-when-solved` trains the whole budget.
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
from typing import Literal, NoReturn

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.distributions import Categorical
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

# Checkpoints are identified by this kind, not by the file name: a renamed copy of this script
# still loads its own checkpoints.
CHECKPOINT_KIND = "a2c-discrete-mlp/2"


@dataclass
class Args:
    exp_name: str = Path(__file__).stem
    """name of this experiment (part of the run name and of the checkpoint file name)"""
    seed: int = 1
    """seed of random, NumPy, torch and the environments"""
    torch_deterministic: bool = True
    """make cuDNN deterministic (cudnn.deterministic=True, cudnn.benchmark=False)"""
    cuda: bool = True
    """use a GPU when one is present (a network this small runs as fast on the CPU)"""
    torch_threads: int = 1
    """CPU threads for torch (1 measured fastest for this network on a 2-core CPU: their
    synchronisation costs more than the arithmetic of a 64-unit MLP, 15x slower with 2)"""
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
    log_interval: int = 640
    """write the loss statistics (and charts/SPS) every this many environment steps; each write
    wakes TensorBoard's writer thread, and once per iteration that cost ~20% of the run (episode
    returns are always written)"""
    resume: str | None = None
    """path of a checkpoint to continue training from, with its settings"""
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
    learning_rate: float = 3e-3
    """optimiser learning rate (annealed linearly to 0 with --anneal-lr)"""
    optimizer: Literal["adam", "rmsprop"] = "adam"
    """Adam, or RMSprop as in the original A2C/A3C paper (alpha 0.99)"""
    num_envs: int = 8
    """number of environments stepped in parallel"""
    num_steps: int = 8
    """steps per environment in each rollout: the n of the n-step return"""
    anneal_lr: bool = True
    """anneal the learning rate linearly to 0 over training"""
    gamma: float = 0.98
    """discount factor"""
    gae_lambda: float = 0.8
    """lambda of generalised advantage estimation (1.0: plain n-step returns, as classic A2C)"""
    norm_adv: bool = False
    """normalise the advantages of each rollout (mean 0, std 1)"""
    ent_coef: float = 0.0
    """entropy bonus coefficient"""
    vf_coef: float = 0.2
    """value loss coefficient: the value head shares the trunk, so this weighs the two losses"""
    max_grad_norm: float = 0.5
    """global gradient-norm clipping threshold"""
    hidden_size: int = 64
    """width of the two hidden layers of the shared trunk"""

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


# Copied from ppo_cartpole.py: layer_init
def layer_init(layer: nn.Linear, gain: float = np.sqrt(2), bias: float = 0.0) -> nn.Linear:
    """Orthogonal weights and constant bias: keeps activations well-scaled through tanh layers."""
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.constant_(layer.bias, bias)
    return layer


class Agent(nn.Module):
    """A shared tanh trunk feeding a policy head (action logits) and a value head.

    Sharing the trunk means the value loss shapes the features the policy uses too (a useful
    auxiliary signal). Returns of tens of steps make the value loss's gradient far larger than
    the policy loss's; a small `--vf-coef` (0.2, vs 0.5 for separate networks) keeps it from
    crowding out the policy's features (measured with 16 envs on two seeds: with 0.5 the
    training mean reached 475 on CartPole 7% and 40% later).
    """

    def __init__(self, obs_dim: int, num_actions: int, hidden_size: int = 64):
        super().__init__()
        self.trunk = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden_size)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden_size, hidden_size)),
            nn.Tanh(),
        )
        # A 0.01-gain policy head starts with near-uniform action probabilities: early
        # exploration is not left to the luck of the initialisation.
        self.actor = layer_init(nn.Linear(hidden_size, num_actions), gain=0.01)
        self.critic = layer_init(nn.Linear(hidden_size, 1), gain=1.0)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Action logits and state values, from one pass through the trunk."""
        features = self.trunk(obs)
        return self.actor(features), self.critic(features).squeeze(-1)

    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(self.trunk(obs)).squeeze(-1)

    def get_action_and_value(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample an action for each observation from the policy; also return the state values."""
        logits, value = self(obs)
        return Categorical(logits=logits, validate_args=False).sample(), value

    def greedy_action(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor(self.trunk(obs)).argmax(dim=-1)


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


def a2c_loss(
    logits: torch.Tensor,
    actions: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    returns: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Policy-gradient loss, value loss and mean entropy of one batch of transitions.

    The policy loss is -A log pi(a|s): its gradient is the policy-gradient estimate with the
    advantage as a baseline-corrected return. The advantages are constants (computed without
    gradient), so the policy loss does not push the critic; the value loss does.
    """
    log_probs = torch.log_softmax(logits, dim=-1)
    action_log_probs = log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    policy_loss = -(advantages * action_log_probs).mean()
    value_loss = 0.5 * ((values - returns) ** 2).mean()
    entropy = -(log_probs.exp() * log_probs).sum(-1).mean()
    return policy_loss, value_loss, entropy


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


class RMSprop:
    """RMSprop (Tieleman & Hinton, 2012), the A2C paper's optimiser, computed step for step as
    torch.optim.RMSprop computes it (written out for the reason given under Adam)."""

    def __init__(self, parameters, lr: float, alpha: float = 0.99, eps: float = 1e-8):
        self.parameters = list(parameters)
        self.lr, self.alpha, self.eps = lr, alpha, eps
        # A running average of each parameter's squared gradient scales its step.
        self.square_avg = [torch.zeros_like(parameter) for parameter in self.parameters]

    def zero_grad(self) -> None:
        for parameter in self.parameters:
            parameter.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for parameter, square_avg in zip(self.parameters, self.square_avg, strict=True):
            if parameter.grad is None:
                continue
            grad = parameter.grad
            square_avg.mul_(self.alpha).addcmul_(grad, grad, value=1 - self.alpha)
            parameter.addcdiv_(grad, square_avg.sqrt().add_(self.eps), value=-self.lr)

    def state_dict(self) -> dict:
        return {"lr": self.lr, "square_avg": self.square_avg}

    def load_state_dict(self, state: dict) -> None:
        if [tensor.shape for tensor in state["square_avg"]] != [tensor.shape for tensor in self.square_avg]:
            raise ValueError("the optimiser state does not match the network's parameters")
        for tensor, saved_tensor in zip(self.square_avg, state["square_avg"], strict=True):
            tensor.copy_(saved_tensor)
        self.lr = state["lr"]


def update(
    agent: Agent,
    optimizer: Adam | RMSprop,
    args: Args,
    b_obs: torch.Tensor,
    b_actions: torch.Tensor,
    b_advantages: torch.Tensor,
    b_returns: torch.Tensor,
) -> dict:
    """ONE gradient step on policy loss + value loss - entropy bonus over the whole rollout;
    returns its statistics (`finite` False, and no step taken, if the loss is NaN or infinite)."""
    if args.norm_adv and len(b_advantages) > 1:
        b_advantages = (b_advantages - b_advantages.mean()) / (b_advantages.std() + 1e-8)
    # The values are recomputed with gradient (the ones stored while acting were computed under
    # inference mode, by the same weights).
    logits, new_values = agent(b_obs)
    policy_loss, value_loss, entropy = a2c_loss(logits, b_actions, b_advantages, new_values, b_returns)
    loss = policy_loss + args.vf_coef * value_loss - args.ent_coef * entropy
    if not torch.isfinite(loss):
        return {"finite": False}
    optimizer.zero_grad()
    loss.backward()
    # Clipping the global norm bounds the step a single noisy rollout can take.
    nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
    optimizer.step()
    return {
        "finite": True,
        "policy_loss": policy_loss.item(),
        "value_loss": value_loss.item(),
        "entropy": entropy.item(),
        "explained_variance": explained_variance(new_values.detach(), b_returns),
    }


# Copied from ppo_cartpole.py: linear_schedule
def linear_schedule(start: float, iteration: int, num_iterations: int) -> float:
    """Value at 1-based `iteration` of a linear decay from `start` (iteration 1) towards 0."""
    return start * (1.0 - (iteration - 1.0) / num_iterations)


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
        start_iteration = checkpoint["iteration"] + 1
    else:
        run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
        start_iteration, global_step = 1, 0
    run = Run(args, run_name, total_steps=args.num_iterations * args.batch_size, global_step=global_step)
    # A resumed run reseeds with an offset so it does not replay the random stream of its start.
    seed = args.seed + (start_iteration - 1)
    seed_everything(seed, args.torch_deterministic)
    device = pick_device(args.cuda, args.torch_threads)

    envs = make_envs(args.env_id, args.num_envs)
    agent = build_agent(args.env_id, args.hidden_size, device)
    optimizer = build_optimizer(agent, args.optimizer, args.learning_rate)
    if checkpoint is not None:
        restore(agent, optimizer, checkpoint, args.resume)
    iteration = start_iteration - 1  # the last completed iteration, as the checkpoint records it

    def training_state() -> dict:
        return {
            "kind": CHECKPOINT_KIND,
            "env_id": args.env_id,
            "run_name": run_name,
            "args": asdict(args),
            "global_step": global_step,
            "iteration": iteration,
            "model": agent.state_dict(),
            "optimizer": optimizer.state_dict(),
        }

    # Rollout storage: preallocated NumPy arrays, moved to the device once per rollout. The envs
    # speak NumPy, and a NumPy write into a tiny array costs ~1 us where a torch op costs ~5-10:
    # with a network this small, per-step bookkeeping in torch was a large share of the run.
    obs_shape = envs.single_observation_space.shape
    obs = np.zeros((args.num_steps, args.num_envs, *obs_shape), dtype=np.float32)
    actions = np.zeros((args.num_steps, args.num_envs), dtype=np.int64)
    rewards = np.zeros((args.num_steps, args.num_envs), dtype=np.float32)
    terminated = np.zeros((args.num_steps, args.num_envs), dtype=bool)
    episode_ended = np.zeros((args.num_steps, args.num_envs), dtype=bool)
    valid = np.zeros((args.num_steps, args.num_envs), dtype=bool)
    values = np.zeros((args.num_steps + 1, args.num_envs), dtype=np.float32)
    storage = {
        "obs": obs, "actions": actions, "rewards": rewards, "terminated": terminated,
        "episode_ended": episode_ended, "valid": valid, "values": values,
    }  # fmt: skip
    next_obs, _ = envs.reset(seed=seed)
    # True where the env's previous step ended an episode: its next step is the autoreset step.
    next_is_autoreset = np.zeros(args.num_envs, dtype=bool)
    solved_return, solved_at = solved_threshold(args), None

    for iteration in range(start_iteration, args.num_iterations + 1):
        previous_step = global_step
        if args.anneal_lr:
            optimizer.lr = linear_schedule(args.learning_rate, iteration, args.num_iterations)

        # Collect num_steps steps of every env with the current policy.
        with torch.inference_mode():
            for step in range(args.num_steps):
                global_step += args.num_envs
                obs[step] = next_obs
                # Gymnasium >= 1.0 autoresets on the step *after* an episode ends: that step
                # ignores the action and returns the reset observation with reward 0. It is not a
                # transition, so it is kept out of the update (valid = False), not learned from.
                valid[step] = ~next_is_autoreset
                action, value = agent.get_action_and_value(torch.as_tensor(obs[step], device=device))
                values[step] = value.cpu().numpy()
                actions[step] = action.cpu().numpy()
                next_obs, rewards[step], terminated[step], truncated, infos = envs.step(actions[step])
                next_is_autoreset = episode_ended[step] = terminated[step] | truncated
                if "episode" in infos:
                    for i in np.flatnonzero(infos["_episode"]):
                        run.log_episode(
                            float(infos["episode"]["r"][i]), int(infos["episode"]["l"][i]), global_step
                        )
            # After the last step: V(next obs), which is V(final obs) where an episode just ended.
            # (.cpu() before .numpy() everywhere: a tensor on a GPU does not convert to NumPy.)
            next_value = agent.get_value(torch.as_tensor(next_obs, dtype=torch.float32, device=device))
            values[args.num_steps] = next_value.cpu().numpy()

            # Targets: GAE advantages and returns (with --gae-lambda 1, the classic A2C n-step
            # returns: rewards to the rollout's or episode's end plus the discounted value there).
            rollout = {name: torch.as_tensor(array, device=device) for name, array in storage.items()}
            advantages, returns = compute_gae(
                rollout["rewards"],
                rollout["values"],
                rollout["terminated"],
                rollout["episode_ended"],
                args.gamma,
                args.gae_lambda,
            )

        # Update: one gradient step on the flattened rollout, without its autoreset steps.
        keep = rollout["valid"].reshape(-1)
        b_obs, b_actions = rollout["obs"].reshape(-1, *obs_shape)[keep], rollout["actions"].reshape(-1)[keep]
        b_advantages, b_returns = advantages.reshape(-1)[keep], returns.reshape(-1)[keep]
        stats = update(agent, optimizer, args, b_obs, b_actions, b_advantages, b_returns)

        finite = stats["finite"] and all(p.isfinite().all() for p in agent.parameters())
        run.stop_if_not_finite(finite, training_state, global_step)
        if crossed(args.log_interval, global_step, previous_step):
            losses = ("policy_loss", "value_loss", "entropy", "explained_variance")
            run.log({f"losses/{key}": stats[key] for key in losses}, global_step)
            run.log({"charts/learning_rate": optimizer.lr}, global_step)
            run.advance(global_step)  # here rather than every iteration: see --log-interval
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
    run.end_training(training_state(), global_step)  # exits 130/143 after a stop signal

    video_folder = f"videos/{run_name}/eval" if args.capture_video else None
    eval_returns = evaluate(
        agent, args.env_id, args.eval_episodes, args.seed + EVAL_SEED_OFFSET, device, video_folder
    )
    for episode, episode_return in enumerate(eval_returns):
        run.log({"eval/episodic_return": episode_return}, episode)
    solved = f"solved at step {solved_at}; " if solved_at is not None else ""
    run.finish(global_step, solved + describe_eval(eval_returns))


# ----------------------------------------------------------------------------------------------
# Plumbing: validation, evaluation of a checkpoint, checkpoint files, logging and stop signals.
# A first reading can stop here: nothing below changes what the algorithm computes.
# ----------------------------------------------------------------------------------------------

# Copied from ppo_cartpole.py: EVAL_SEED_OFFSET
EVAL_SEED_OFFSET = 10_000  # evaluation envs get seed + this: episodes that training never saw
# Copied from ppo_cartpole.py: SOLVED_CHECK_SEED_OFFSET
SOLVED_CHECK_SEED_OFFSET = 20_000


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
        "total_timesteps",
        "num_envs",
        "num_steps",
        "eval_episodes",
        "log_interval",
        "torch_threads",
        "solved_check_freq",
    ):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.checkpoint_freq < 0:
        fail(f"--checkpoint-freq must be >= 0, got {args.checkpoint_freq}")
    for name in ("gamma", "gae_lambda"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            fail(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    for name in ("learning_rate", "max_grad_norm", "hidden_size"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("ent_coef", "vf_coef"):
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.resume and args.eval_checkpoint:
        fail("give either --resume or --eval-checkpoint, not both")
    check_env(args.env_id)


# Copied from ppo_cartpole.py: check_env
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


# Settings a resumed run may change (budget, evaluation, device, logging, tracking); every other
# setting is the checkpoint's, or the resumed run would silently be a different experiment.
RESUME_MAY_CHANGE = {
    "total_timesteps", "resume", "eval_checkpoint", "eval_episodes", "cuda", "torch_threads", "track",
    "wandb_project_name", "wandb_entity", "wandb_group", "capture_video", "save_model", "checkpoint_freq",
    "log_interval", "stop_when_solved", "solved_check_freq", "solved_return",
}  # fmt: skip
# Settings that shape the environment or the network: --eval-checkpoint may not change them.
MODEL_SETTINGS = {"env_id", "hidden_size"}


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


def build_agent(env_id: str, hidden_size: int, device: torch.device) -> Agent:
    env = gym.make(env_id)
    agent = Agent(int(np.prod(env.observation_space.shape)), int(env.action_space.n), hidden_size)
    env.close()
    return agent.to(device)


def build_optimizer(agent: Agent, name: str, learning_rate: float) -> Adam | RMSprop:
    """Adam, or RMSprop with the A2C paper's smoothing (alpha 0.99); eps 1e-5 for both."""
    if name == "rmsprop":
        return RMSprop(agent.parameters(), lr=learning_rate, alpha=0.99, eps=1e-5)
    return Adam(agent.parameters(), lr=learning_rate, eps=1e-5)


def restore(agent: Agent, optimizer: Adam | RMSprop, checkpoint: dict, path: str) -> None:
    """Load the weights and the optimiser state (its moments and learning rate) of a checkpoint."""
    try:
        agent.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        fail(f"{path} does not match these args ({str(error).splitlines()[0]})")


# Copied from ppo_cartpole.py: evaluate
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


# Copied from ppo_cartpole.py: solved_threshold
def solved_threshold(args: Args) -> float | None:
    """The mean greedy return at which --stop-when-solved ends training (None: never)."""
    if not args.stop_when_solved:
        return None
    return args.solved_return if args.solved_return is not None else gym.spec(args.env_id).reward_threshold


def describe_eval(returns: np.ndarray) -> str:
    """The one sentence both the final evaluation and --eval-checkpoint print."""
    return f"eval return {returns.mean():.2f} ± {returns.std():.2f} over {len(returns)} episodes"


def evaluate_checkpoint(args: Args) -> None:
    """--eval-checkpoint: rebuild the agent from the saved settings and run the greedy policy with
    the seed of the end-of-training evaluation, so that both print the same figures."""
    checkpoint = load_checkpoint(args.eval_checkpoint)
    check_settings(args, checkpoint["args"], may_change=set(checkpoint["args"]) - MODEL_SETTINGS)
    device = pick_device(args.cuda, args.torch_threads)
    agent = build_agent(args.env_id, args.hidden_size, device)
    agent.load_state_dict(checkpoint["model"])
    video_folder = f"videos/{checkpoint['run_name']}/eval-checkpoint" if args.capture_video else None
    seed = args.seed + EVAL_SEED_OFFSET
    returns = evaluate(agent, args.env_id, args.eval_episodes, seed, device, video_folder)
    print(f"{describe_eval(returns)} ({args.eval_checkpoint})")


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
