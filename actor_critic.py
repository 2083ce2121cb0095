"""Synchronous advantage actor-critic (A2C, n-step returns with GAE) on vectorised CartPole-v1.

One shared MLP trunk with a policy head and a value head, for any gymnasium env with a 1-D Box
observation and a Discrete action space (Acrobot-v1 works too). ONE gradient step per short rollout
of every env (no epochs, no clipping: A2C, not PPO), until the greedy policy solves the env.

Run:
    python actor_critic.py                                               # train, evaluate, save
    python actor_critic.py --resume runs/<run>/actor_critic.pt           # continue a stopped run
    python actor_critic.py --eval-checkpoint runs/<run>/actor_critic.pt --capture-video
    python actor_critic.py --eval-checkpoint runs/<run>/checkpoints      # the evaluation curve

Expect: greedy return ~500 after 20k-40k steps, in seconds on a CPU; measured results: README.md.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
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
    torch_threads: int = 1
    """CPU threads for torch"""
    track: bool = False
    """log the run to Weights & Biases (works offline with WANDB_MODE=offline)"""
    wandb_project_name: str = "rl-scripts"
    """the W&B project"""
    wandb_entity: str | None = None
    """the W&B entity (team or user); None uses your default"""
    capture_video: bool = False
    """record the evaluation episodes as mp4 under videos/<run_name>/"""

    env_id: str = "CartPole-v1"
    """a gymnasium environment with a 1-D Box observation and a Discrete action space"""
    total_timesteps: int = 100_000
    """environment steps to train for (summed over the vectorised envs)"""
    learning_rate: float = 3e-3
    """optimiser learning rate (annealed linearly to 0 with --anneal-lr)"""
    optimizer: Literal["adam", "rmsprop"] = "adam"
    """Adam, or RMSprop as in the original A2C/A3C paper"""
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
    stop_when_solved: bool = True
    """stop once every one of --eval-episodes fresh greedy episodes reaches --solved-return"""
    solved_check_freq: int = 1024
    """environment steps between two checks of --stop-when-solved"""
    solved_return: float | None = None
    """the return that counts as solved (default: the env's reward threshold, 475 for CartPole)"""

    # The run around the algorithm: checkpoints, resuming, logging, evaluation.
    wandb_group: str | None = None
    """W&B group, so the seeds of one experiment plot together (default: --exp-name)"""
    save_model: bool = True
    """save the checkpoint runs/<run_name>/<exp_name>.pt (at the end, periodically, on a signal)"""
    checkpoint_freq: int = 50_000
    """also checkpoint every this many env steps, each kept in runs/<run>/checkpoints/ (0: off)"""
    log_interval: int = 640
    """write the loss statistics every this many environment steps"""
    resume: str | None = None
    """path of a checkpoint to continue training from (with the checkpoint's settings)"""
    eval_checkpoint: str | None = None
    """a checkpoint to evaluate, or a folder of them to draw the evaluation curve of; then exit"""
    eval_episodes: int = 10
    """episodes of the final evaluation, of --eval-checkpoint and of each solved check"""

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_iterations(self) -> int:
        return max(1, self.total_timesteps // self.batch_size)


# Copied from ppo_cartpole.py: make_envs
def make_envs(env_id: str, num_envs: int) -> gym.vector.VectorEnv:
    """Vectorised envs with episode statistics: CartPole's NumPy vector implementation steps all
    envs in one call, other envs are stepped in a loop. Both autoreset on the *next* step
    (gymnasium >= 1.0), which `main` masks out of the rollout."""
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
    """A shared tanh trunk feeding a policy head (action logits) and a value head. The value loss
    then shapes the policy's features too, and its gradient is far larger than the policy loss's
    (returns of tens of steps): a small --vf-coef (0.2, not 0.5) keeps it from crowding them out."""

    def __init__(self, obs_dim: int, num_actions: int, hidden_size: int = 64):
        super().__init__()
        self.trunk = nn.Sequential(
            layer_init(nn.Linear(obs_dim, hidden_size)),
            nn.Tanh(),
            layer_init(nn.Linear(hidden_size, hidden_size)),
            nn.Tanh(),
        )
        # A 0.01-gain policy head starts near-uniform: early exploration is not left to chance.
        self.actor = layer_init(nn.Linear(hidden_size, num_actions), gain=0.01)
        self.critic = layer_init(nn.Linear(hidden_size, 1), gain=1.0)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Action logits and state values, from one pass through the trunk."""
        features = self.trunk(obs)
        return self.actor(features), self.critic(features).squeeze(-1)

    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(self.trunk(obs)).squeeze(-1)

    def get_action_and_value(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, value = self(obs)
        return Categorical(logits=logits, validate_args=False).sample(), value

    def greedy_action(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor(self.trunk(obs)).argmax(dim=-1)


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


def a2c_loss(logits, actions, advantages, values, returns):
    """Policy-gradient loss, value loss and mean entropy of one batch of transitions. The policy
    loss -A log pi(a|s) has the policy gradient for its gradient, the advantage standing in for a
    baseline-corrected return; the advantages are constants, so it does not push the critic."""
    log_probs = torch.log_softmax(logits, dim=-1)
    action_log_probs = log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    policy_loss = -(advantages * action_log_probs).mean()
    value_loss = 0.5 * ((values - returns) ** 2).mean()
    entropy = -(log_probs.exp() * log_probs).sum(-1).mean()
    return policy_loss, value_loss, entropy


# Copied from ppo_cartpole.py: linear_schedule
def linear_schedule(start: float, iteration: int, num_iterations: int) -> float:
    """Value at 1-based `iteration` of a linear decay from `start` (iteration 1) towards 0."""
    return start * (1.0 - (iteration - 1.0) / num_iterations)


def update(agent, optimizer, args, b_obs, b_actions, b_advantages, b_returns):
    """ONE gradient step on policy loss + value loss - entropy bonus; returns its statistics."""
    if len(b_obs) == 0:
        return {"finite": True}  # every step of a tiny rollout was an autoreset step
    if args.norm_adv and len(b_advantages) > 1:  # one advantage has no spread (std NaN)
        b_advantages = (b_advantages - b_advantages.mean()) / (b_advantages.std() + 1e-8)
    # With gradient this time: the values stored while acting were computed in inference mode.
    logits, values = agent(b_obs)
    policy_loss, value_loss, entropy = a2c_loss(logits, b_actions, b_advantages, values, b_returns)
    loss = policy_loss + args.vf_coef * value_loss - args.ent_coef * entropy
    if not torch.isfinite(loss):
        return {"finite": False}  # and no step taken
    optimizer.zero_grad()
    loss.backward()
    # Clipping the global norm bounds the step a single noisy rollout can take.
    nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
    optimizer.step()
    return {
        "policy_loss": policy_loss.item(),
        "value_loss": value_loss.item(),
        "entropy": entropy.item(),
        "explained_variance": explained_variance(values.detach(), b_returns),
        "finite": all(parameter.isfinite().all() for parameter in agent.parameters()),
    }


# Copied from ppo_cartpole.py: evaluate
@torch.inference_mode()
def evaluate(
    agent: Agent | None,
    env_id: str,
    episodes: int,
    seed: int,
    device: torch.device,
    give_up_below: float | None = None,
    video_folder: str | None = None,
) -> np.ndarray:
    """Play one full episode of the greedy policy in each of `episodes` envs at once (env i seeded
    seed + i); return their undiscounted returns. With `give_up_below`, stop as soon as an episode
    ends with less (the returns so far come back): a check of an unsolved policy then costs only
    its shortest episode. `agent=None` plays uniformly random actions (seeded by `seed`)."""

    def make_env(index: int) -> Callable[[], gym.Env]:
        def thunk() -> gym.Env:
            env = gym.make(env_id, render_mode="rgb_array" if video_folder else None)
            if video_folder is None:
                return env
            import warnings

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
    random_actions = np.random.default_rng(seed)
    while playing.any():
        if agent is None:
            actions = random_actions.integers(envs.single_action_space.n, size=episodes)
        else:
            obs = torch.as_tensor(obs, dtype=torch.float32, device=device)
            actions = agent.greedy_action(obs).cpu().numpy()
        obs, rewards, terminated, truncated, _ = envs.step(actions)
        returns += rewards * playing  # an env whose episode has ended plays on, uncounted
        ended = playing & (terminated | truncated)
        playing &= ~ended
        if give_up_below is not None and (returns[ended] < give_up_below).any():
            break
    envs.close()
    return returns


# Copied from ppo_cartpole.py: solved_threshold
def solved_threshold(args: Args) -> float | None:
    """The greedy return at which --stop-when-solved ends training (None: never)."""
    if not args.stop_when_solved:
        return None
    if args.solved_return is not None:
        return args.solved_return
    return gym.spec(args.env_id).reward_threshold


# Copied from ppo_cartpole.py: crossed
def crossed(every: int, step: int, previous_step: int) -> bool:
    """True when a multiple of `every` lies in (previous_step, step]: periodic work (logging,
    checkpoints) is counted in environment steps, whatever the steps per iteration."""
    return every > 0 and step // every != previous_step // every


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

    envs = make_envs(args.env_id, args.num_envs)
    obs_dim, num_actions = envs.single_observation_space.shape[0], envs.single_action_space.n
    agent = Agent(obs_dim, int(num_actions), args.hidden_size).to(device)
    # eps=1e-5 for both; RMSprop's defaults (alpha=0.99, not centred) are the A2C paper's.
    optimizers = {"adam": torch.optim.Adam, "rmsprop": torch.optim.RMSprop}
    optimizer = optimizers[args.optimizer](agent.parameters(), lr=args.learning_rate, eps=1e-5)
    run.restore(model=agent, optimizer=optimizer)  # with --resume

    def training_state() -> dict:
        return {
            "kind": CHECKPOINT_KIND,
            "env_id": args.env_id,
            "run_name": run.name,
            "args": asdict(args),
            "global_step": global_step,
            "model": agent.state_dict(),
            "optimizer": optimizer.state_dict(),
        }

    # Rollout storage, preallocated; what the envs return goes to the device once per rollout.
    obs = torch.zeros((args.num_steps, args.num_envs, obs_dim), device=device)
    actions = torch.zeros((args.num_steps, args.num_envs), dtype=torch.long, device=device)
    rewards = np.zeros((args.num_steps, args.num_envs), dtype=np.float32)
    terminated = np.zeros((args.num_steps, args.num_envs), dtype=bool)
    episode_ended = np.zeros((args.num_steps, args.num_envs), dtype=bool)
    valid = np.zeros((args.num_steps, args.num_envs), dtype=bool)
    values = torch.zeros((args.num_steps + 1, args.num_envs), device=device)

    next_obs, _ = envs.reset(seed=seed)
    next_obs = torch.as_tensor(next_obs, dtype=torch.float32, device=device)
    # True where the env's previous step ended an episode: its next step is the autoreset step.
    next_is_autoreset = np.zeros(args.num_envs, dtype=bool)
    solved_return, solved_at = solved_threshold(args), None

    for iteration in range(start_iteration, args.num_iterations + 1):
        previous_step = global_step
        if args.anneal_lr:
            learning_rate = linear_schedule(args.learning_rate, iteration, args.num_iterations)
            optimizer.param_groups[0]["lr"] = learning_rate

        for step in range(args.num_steps):
            global_step += args.num_envs
            obs[step] = next_obs
            # Gymnasium >= 1.0 autoresets on the step *after* an episode ends: that step ignores the
            # action and returns the reset observation with reward 0. It is not a transition, so
            # it is kept out of the update (valid = False) instead of being learned from.
            valid[step] = ~next_is_autoreset
            with torch.inference_mode():
                action, value = agent.get_action_and_value(next_obs)
            values[step], actions[step] = value, action
            obs_np, rewards[step], terminated[step], truncated, infos = envs.step(
                action.cpu().numpy()
            )
            next_is_autoreset = episode_ended[step] = terminated[step] | truncated
            next_obs = torch.as_tensor(obs_np, dtype=torch.float32, device=device)
            for i in np.flatnonzero(infos.get("_episode", [])):
                run.log_episode(infos["episode"]["r"][i], infos["episode"]["l"][i], global_step)

        with torch.inference_mode():
            # After the last step: V(next obs), which is V(final obs) where an episode just ended.
            values[args.num_steps] = agent.get_value(next_obs)
            rewards_t, terminated_t, episode_ended_t = (
                torch.as_tensor(array, device=device)
                for array in (rewards, terminated, episode_ended)
            )
            advantages, returns = compute_gae(
                rewards_t, values, terminated_t, episode_ended_t, args.gamma, args.gae_lambda
            )

        # Flatten the rollout and drop the autoreset steps.
        keep = torch.as_tensor(valid, device=device).reshape(-1)
        b_obs, b_actions, b_advantages, b_returns = (
            tensor.flatten(0, 1)[keep] for tensor in (obs, actions, advantages, returns)
        )

        stats = update(agent, optimizer, args, b_obs, b_actions, b_advantages, b_returns)
        # Logging, the NaN check, the progress bar, checkpoints and stop signals.
        scalars = {f"losses/{key}": value for key, value in stats.items() if key != "finite"}
        scalars["charts/learning_rate"] = optimizer.param_groups[0]["lr"]
        if run.end_iteration(global_step, previous_step, scalars, training_state, stats["finite"]):
            break

        # Stop once solved, judged by the greedy policy on fresh episodes (never the final
        # evaluation's): the training return lags, as sampled actions keep exploring. Every
        # episode must reach the threshold, not only their mean, for the final evaluation to pass.
        check_solved = crossed(args.solved_check_freq, global_step, previous_step)
        if solved_return is not None and check_solved:
            check_seed = args.seed + SOLVED_CHECK_SEED_OFFSET + global_step
            check_returns = evaluate(agent, args.env_id, args.eval_episodes, check_seed, device,
                                     give_up_below=solved_return)  # fmt: skip
            lowest = check_returns.min()
            run.writer.add_scalar("charts/solved_check_min_return", lowest, global_step)
            if lowest >= solved_return:
                solved_at = global_step
                break
    envs.close()

    def final_evaluation(video_folder: str | None) -> tuple[dict[str, np.ndarray], str]:
        """The greedy policy on episodes that neither training nor the solved checks played."""
        eval_seed = args.seed + EVAL_SEED_OFFSET
        returns = evaluate(agent, args.env_id, args.eval_episodes, eval_seed, device,
                           video_folder=video_folder)  # fmt: skip
        solved = f"solved at step {solved_at}; " if solved_at is not None else ""
        return {"eval/episodic_return": returns}, solved + eval_summary(returns)

    # Save, evaluate, summarise; after Ctrl-C or SIGTERM, exit 130 or 143 instead.
    run.finish(training_state(), global_step, final_evaluation)


# ----------------------------------------------------------------------------------------------
# Plumbing: validation, evaluation of a checkpoint, checkpoint files, logging and stop signals.
# A first reading can stop here: nothing below changes what is learned or delivered.
# ----------------------------------------------------------------------------------------------

# Checkpoints name their kind, not the script's file name: a renamed copy still loads its own.
CHECKPOINT_KIND = "a2c-discrete-mlp/3"
# Earlier kinds with the same network: evaluated, but not resumed (their optimiser state differs).
EVALUATED_KINDS = ("a2c-discrete-mlp/2",)
CHECKPOINT_SUFFIX = ".pt"

# Copied from ppo_cartpole.py: EVAL_SEED_OFFSET
EVAL_SEED_OFFSET = 10_000  # evaluation envs get seed + this: episodes that training never saw
# The checks of --stop-when-solved play seed + this + the step: never the final evaluation's.
# Copied from ppo_cartpole.py: SOLVED_CHECK_SEED_OFFSET
SOLVED_CHECK_SEED_OFFSET = 20_000


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
        args, "total_timesteps", "num_envs", "num_steps", "eval_episodes", "log_interval",
        "torch_threads", "solved_check_freq", "learning_rate", "max_grad_norm", "hidden_size",
    )  # fmt: skip
    check_non_negative(args, "checkpoint_freq", "ent_coef", "vf_coef")
    check_seed_room(args, "num_envs", "eval_episodes")
    check_fraction(args, "gamma", "gae_lambda")
    if args.resume and args.eval_checkpoint:
        fail("give either --resume or --eval-checkpoint, not both")
    check_env(args.env_id)


# Copied from ppo_cartpole.py: check_env
def check_env(env_id: str) -> None:
    """Fail with suggestions for an unknown id, and with an explanation for unusable spaces."""
    if env_id not in gym.registry:
        import difflib

        close = difflib.get_close_matches(env_id, list(gym.registry), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        fail(f"unknown environment id {env_id!r}{hint}")
    env = gym.make(env_id)
    observation_space, action_space = env.observation_space, env.action_space
    env.close()
    if not isinstance(action_space, gym.spaces.Discrete):
        fail(
            f"{env_id} has a {type(action_space).__name__} action space; this script needs Discrete"
        )
    if not isinstance(observation_space, gym.spaces.Box) or len(observation_space.shape) != 1:
        fail(f"{env_id} observations are {observation_space}; this script needs a 1-D Box")


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


# Copied from ppo_cartpole.py: newest_checkpoint
def newest_checkpoint(folder: str) -> str:
    """The checkpoint of the latest step in `folder` (a stopped run's folder, or its kept ones)."""
    paths = sorted(str(path) for path in Path(folder).glob(f"*{CHECKPOINT_SUFFIX}"))
    if not paths:
        fail(f"{folder} holds no checkpoints (*{CHECKPOINT_SUFFIX}) to resume from")
    return max(paths, key=lambda path: load_checkpoint(path, resume=True)["global_step"])


# Flags that may differ between a run and its resumption (budget, logging, tracking); every other
# setting must match the checkpoint's, or the resumed run would silently be a different experiment.
# Copied from ppo_cartpole.py: RESUME_MAY_CHANGE
RESUME_MAY_CHANGE = {
    "total_timesteps", "resume", "eval_checkpoint", "eval_episodes", "cuda", "torch_threads",
    "track", "wandb_project_name", "wandb_entity", "wandb_group", "capture_video", "save_model",
    "checkpoint_freq", "log_interval", "stop_when_solved", "solved_check_freq", "solved_return",
}  # fmt: skip
# Settings that shape the environment or the network: --eval-checkpoint may not change them.
# Copied from ppo_cartpole.py: MODEL_SETTINGS
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
    """The GPU when asked for and present, else the CPU with a notice; `torch_threads` threads."""
    torch.set_num_threads(torch_threads)
    if want_cuda and torch.cuda.is_available():
        return torch.device("cuda")
    if want_cuda:
        print("note: no CUDA device found, training on the CPU", file=sys.stderr)
    return torch.device("cpu")


# Copied from ppo_cartpole.py: restore
def restore(checkpoint: dict, path: str, **objects) -> None:
    """Load each object's saved state (model=agent, optimizer=...); a mismatch fails in one line."""
    try:
        for key, target in objects.items():
            target.load_state_dict(checkpoint[key])
    except (RuntimeError, ValueError, KeyError) as error:
        fail(f"{path} does not match this network ({str(error).splitlines()[0]})")


# Copied from ppo_cartpole.py: eval_summary
def eval_summary(returns: np.ndarray) -> str:
    return f"eval return {returns.mean():.2f} ± {returns.std():.2f} over {len(returns)} episodes"


# Copied from ppo_cartpole.py: evaluate_checkpoint
def evaluate_checkpoint(args: Args) -> None:
    """--eval-checkpoint: rebuild the agent from the saved settings and run the greedy policy with
    the same evaluation seed as the end of training, so the figures are the same. Given a folder
    (runs/<run>/checkpoints), evaluate each checkpoint in it and draw the curve."""
    import functools

    # Chosen at the first episode, so that bad input is reported before the device notice.
    device = functools.cache(lambda: pick_device(args.cuda, args.torch_threads))
    env = gym.make(args.env_id)
    obs_dim, num_actions = env.observation_space.shape[0], int(env.action_space.n)
    env.close()

    def load(path: str) -> dict:
        checkpoint = load_checkpoint(path)
        check_settings(args, checkpoint["args"], set(checkpoint["args"]) - MODEL_SETTINGS)
        return checkpoint

    def play(checkpoint: dict | None, path: str = "", video: str | None = None) -> dict:
        agent = None  # None: the uniformly random policy
        if checkpoint is not None:
            agent = Agent(obs_dim, num_actions, args.hidden_size).to(device())
            restore(checkpoint, path, model=agent)
        eval_seed = args.seed + EVAL_SEED_OFFSET
        return {"return": evaluate(agent, args.env_id, args.eval_episodes, eval_seed, device(),
                                   video_folder=video)}  # fmt: skip

    if Path(args.eval_checkpoint).is_dir():
        evaluate_checkpoint_folder(
            args.eval_checkpoint, load, play, CHECKPOINT_SUFFIX, "environment steps"
        )
        return
    checkpoint = load(args.eval_checkpoint)
    video = f"videos/{checkpoint['run_name']}/eval-checkpoint" if args.capture_video else None
    returns = play(checkpoint, args.eval_checkpoint, video)["return"]
    print(f"{eval_summary(returns)} ({args.eval_checkpoint})")


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
