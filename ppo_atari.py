"""Proximal Policy Optimisation (clipped surrogate, GAE) on Atari from pixels.

Trains the Nature-CNN PPO agent of the Atari literature on any ale-py game (ALE/Pong-v5 by
default), stepping the games with ale-py's native multi-threaded vector environment, which does
the DeepMind preprocessing in C++: 84x84 grayscale, frame skip 4 with max-pooling over the last two
frames, a stack of the last 4 frames, up to 30 no-op starts and FIRE on reset. The loss of a life
ends an episode for learning (not for the logged returns), rewards are clipped to their sign for
learning, and the logged returns are the true game scores. Observations stay uint8 until the
network, which scales them to [0, 1] itself.

Run:
    python ppo_atari.py --env-id ALE/Pong-v5 --track   # train, evaluate, save runs/<run>/ppo_atari.pt
    python ppo_atari.py --env-id BreakoutNoFrameskip-v4   # the older id style: no sticky actions
    python ppo_atari.py --eval-checkpoint runs/<run>/ppo_atari.pt --capture-video
    tensorboard --logdir runs

Expect: the published result of these hyper-parameters on Pong is a return of about +20 after
10M frames (2.5M agent steps; the default --total-timesteps of 10M agent steps is 40M frames).
This script has not been trained that far yet: on a 2-core CPU it runs at a few hundred agent
steps per second at best (a full run takes days), so train on a GPU (--cuda, the default, uses
one when present). Evaluation samples the policy; --eval-greedy takes the most probable action.
"""

from __future__ import annotations

import difflib
import os
import random
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import ale_py
import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from ale_py.vector_env import AtariVectorEnv
from torch.distributions import Categorical
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

SCRIPT = Path(__file__).stem
# Importing ale_py registers its ids with gymnasium; this call only makes that dependency explicit.
gym.register_envs(ale_py)
# The two id styles this script accepts: the ALE v5 ids (sticky actions on) and the classic
# NoFrameskip-v4 ids of the DQN/PPO papers (sticky actions off).
ATARI_ID = re.compile(r"^(ALE/(?P<v5>[A-Za-z]+)-v5|(?P<v4>[A-Za-z]+)NoFrameskip-v4)$")
# 108,000 frames = 30 minutes of play, the standard cap of an Atari episode (a truncation).
MAX_EPISODE_FRAMES = 108_000


@dataclass
class Args:
    exp_name: str = SCRIPT
    """name of this experiment (part of the run name and of the checkpoint file name)"""
    seed: int = 1
    """seed of random, NumPy, torch and the environments (env i gets seed + i)"""
    torch_deterministic: bool = True
    """make cuDNN deterministic (cudnn.deterministic=True, cudnn.benchmark=False)"""
    cuda: bool = True
    """use a GPU when one is present"""
    track: bool = False
    """log the run to Weights & Biases (works offline with WANDB_MODE=offline)"""
    wandb_project_name: str = "rl-scripts"
    """the W&B project"""
    wandb_entity: str | None = None
    """the W&B entity (team or user); None uses your default"""
    capture_video: bool = False
    """record the evaluation episodes as mp4 under videos/<run_name>/"""
    save_model: bool = True
    """save the checkpoint runs/<run_name>/<exp_name>.pt (at the end, periodically, on Ctrl-C)"""
    checkpoint_freq: int = 500_000
    """also save a checkpoint every this many agent steps (0 disables periodic saves)"""
    resume: str | None = None
    """path of a checkpoint to continue training from"""
    eval_checkpoint: str | None = None
    """path of a checkpoint to evaluate for --eval-episodes episodes, then exit"""
    eval_episodes: int = 10
    """episodes of the final evaluation (and of --eval-checkpoint), played in parallel"""
    eval_greedy: bool = False
    """evaluate the most probable action instead of sampling the policy (see `evaluate`)"""

    env_id: str = "ALE/Pong-v5"
    """an Atari game: ALE/<Game>-v5 (sticky actions) or <Game>NoFrameskip-v4 (none)"""
    env_backend: Literal["ale", "gymnasium"] = "ale"
    """ale: ale-py's native C++ vector env; gymnasium: SyncVectorEnv of gym.make + wrappers"""
    env_threads: int = 0
    """threads of the native vector env (0: one per CPU core)"""
    torch_threads: int = 1
    """CPU threads of torch (1 was fastest on a shared 2-core machine; raise it on a bigger one)"""
    repeat_action_probability: float | None = None
    """sticky-action probability; None keeps the id's own (0.25 for v5 ids, 0 for v4 ids)"""
    episodic_life: bool = True
    """treat the loss of a life as the end of an episode for learning (not for logged returns)"""
    clip_rewards: bool = True
    """learn from the sign of each reward (the logged returns stay the true scores)"""
    total_timesteps: int = 10_000_000
    """agent steps to train for, summed over the envs (each agent step is 4 game frames)"""
    learning_rate: float = 2.5e-4
    """Adam learning rate (annealed linearly to 0 with --anneal-lr)"""
    num_envs: int = 8
    """number of games played in parallel"""
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
    for name in ("total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.eval_episodes <= 0:
        fail(f"--eval-episodes must be positive, got {args.eval_episodes}")
    if args.torch_threads <= 0:
        fail(f"--torch-threads must be positive, got {args.torch_threads}")
    for name in ("checkpoint_freq", "env_threads"):
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
    if args.repeat_action_probability is not None and not 0.0 <= args.repeat_action_probability <= 1.0:
        fail(f"--repeat-action-probability must be in [0, 1], got {args.repeat_action_probability}")
    for name in ("learning_rate", "clip_coef", "max_grad_norm"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.target_kl is not None and args.target_kl <= 0:
        fail(f"--target-kl must be positive (or omitted), got {args.target_kl}")
    if args.resume and args.eval_checkpoint:
        fail("give either --resume or --eval-checkpoint, not both")
    atari_game(args.env_id)


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


def make_gymnasium_env(env_id: str, sticky: float, video_folder: str | None, index: int) -> gym.Env:
    """One game through gymnasium's wrappers, preprocessed as the native vector env does it."""
    env = gym.make(
        env_id,
        frameskip=1,
        repeat_action_probability=sticky,
        full_action_space=False,
        max_num_frames_per_episode=MAX_EPISODE_FRAMES,
        render_mode="rgb_array" if video_folder else None,
    )
    if video_folder:
        # Recorded below the frame skip: the video shows every frame at the game's 60 fps.
        env = gym.wrappers.RecordVideo(
            env,
            video_folder,
            episode_trigger=lambda episode: episode == 0,
            name_prefix=f"env{index}",
            fps=60,
        )
    env = gym.wrappers.AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84)
    env = FireOnReset(env)
    return gym.wrappers.FrameStackObservation(env, 4)


def make_envs(
    env_id: str,
    num_envs: int,
    sticky: float | None,
    backend: str = "ale",
    threads: int = 0,
    video_folder: str | None = None,
) -> gym.vector.VectorEnv:
    """`num_envs` preprocessed games with episode statistics of the true (unclipped) scores.

    Both backends give (N, 4, 84, 84) uint8 observations, the game's own rewards, the `lives` info
    and next-step autoreset (gymnasium >= 1.0), which `main` masks out of the rollout. The native
    env steps every game in C++ threads, about 4x faster than a Python loop over wrapped envs; the
    gymnasium one can render, so the video of the evaluation episodes goes through it.
    """
    game, default_sticky = atari_game(env_id)
    sticky = default_sticky if sticky is None else sticky
    if backend == "ale" and video_folder is None:
        envs = AtariVectorEnv(
            game,
            num_envs,
            num_threads=threads,
            repeat_action_probability=sticky,
            max_num_frames_per_episode=MAX_EPISODE_FRAMES,
            noop_max=30,
            use_fire_reset=True,
            # Clipped rewards are not the game's score: clip in `main`, log the true return here.
            reward_clipping=False,
            # Ending the episode on a life loss would end the *logged* episode too; instead
            # `main` reads `lives` from the info and ends only the learning episode.
            episodic_life=False,
        )
    else:
        envs = gym.vector.SyncVectorEnv(
            [
                lambda index=index: make_gymnasium_env(env_id, sticky, video_folder, index)
                for index in range(num_envs)
            ]
        )
    return gym.wrappers.vector.RecordEpisodeStatistics(envs)


def layer_init(layer: nn.Module, gain: float = np.sqrt(2), bias: float = 0.0) -> nn.Module:
    """Orthogonal weights and constant bias: keeps activations well-scaled through ReLU layers."""
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.constant_(layer.bias, bias)
    return layer


class Agent(nn.Module):
    """The Nature CNN (3 conv + 512 linear) shared by a policy head and a value head."""

    def __init__(self, num_actions: int):
        super().__init__()
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
        # Channels-last (NHWC) is the layout oneDNN's CPU convolutions run fastest on: the update
        # measured 1.4-1.6x faster than with NCHW on a 2-core Xeon, for the same arithmetic.
        frames = obs.float().div_(255.0).contiguous(memory_format=torch.channels_last)
        hidden = self.trunk(frames)
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
      - `terminated[t]` (the MDP ended, or a life was lost) removes the bootstrap term;
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


def learning_signals(
    rewards: np.ndarray,
    terminated: np.ndarray,
    truncated: np.ndarray,
    lives: np.ndarray,
    previous_lives: np.ndarray,
    autoreset: np.ndarray,
    clip_rewards: bool,
    episodic_life: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the learner sees of one vector step: (reward, terminated, episode_ended).

    Clipping rewards to their sign makes one set of hyper-parameters work across games whose
    scores differ by orders of magnitude. A lost life counts as a terminal state for learning (the
    DeepMind recipe: it teaches that losing a life is bad), though the game goes on; the autoreset
    step restores the lives, which is no loss.
    """
    reward = np.sign(rewards) if clip_rewards else rewards
    life_lost = (lives < previous_lives) & ~autoreset if episodic_life else np.zeros_like(terminated)
    learn_terminated = terminated | life_lost
    return reward.astype(np.float32), learn_terminated, learn_terminated | truncated


def linear_schedule(start: float, iteration: int, num_iterations: int) -> float:
    """Value at 1-based `iteration` of a linear decay from `start` (iteration 1) towards 0."""
    return start * (1.0 - (iteration - 1.0) / num_iterations)


def explained_variance(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """1 - Var(targets - predictions) / Var(targets): 1 is perfect, 0 is no better than a mean."""
    target_variance = targets.var()
    if target_variance == 0:
        return float("nan")
    return float(1.0 - (targets - predictions).var() / target_variance)


@torch.inference_mode()
def evaluate(
    agent: Agent, envs: gym.vector.VectorEnv, seed: int, device: torch.device, greedy: bool = False
) -> np.ndarray:
    """Play one full episode in each of the vector's envs; return their true (unclipped) returns.

    The policy is sampled by default, as the Atari literature scores PPO: an argmax policy can
    freeze in a state it never learnt to leave (Breakout waits for FIRE after a lost life), and
    the episode then runs to the 30-minute cap.
    """
    returns = np.full(envs.num_envs, np.nan)
    obs, _ = envs.reset(seed=seed)
    while np.isnan(returns).any():
        obs = torch.from_numpy(obs).to(device)
        action = agent.greedy_action(obs) if greedy else agent.get_action_and_value(obs)[0]
        obs, _, _, _, infos = envs.step(action.cpu().numpy())
        if "episode" in infos:
            first = infos["_episode"] & np.isnan(returns)
            returns[first] = infos["episode"]["r"][first]
    envs.close()
    return returns


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
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic
    torch.backends.cudnn.benchmark = not torch_deterministic


def pick_device(want_cuda: bool, torch_threads: int) -> torch.device:
    if want_cuda and torch.cuda.is_available():
        return torch.device("cuda")
    if want_cuda:
        print("note: no CUDA device found, training on the CPU", file=sys.stderr)
    # On a 2-core machine shared with the env threads (and other jobs), torch's intra-op threads
    # spin-wait on each other: measured 2-20x slower per forward/backward pass than one thread.
    torch.set_num_threads(torch_threads)
    return torch.device("cpu")


def build_agent(env_id: str, device: torch.device) -> Agent:
    env = gym.make(env_id)
    agent = Agent(int(env.action_space.n))
    env.close()
    return agent.to(device, memory_format=torch.channels_last)


def evaluate_checkpoint(args: Args) -> None:
    """--eval-checkpoint: rebuild the agent from the checkpoint and play --eval-episodes games."""
    checkpoint = load_checkpoint(args.eval_checkpoint, args.env_id)
    device = pick_device(args.cuda, args.torch_threads)
    agent = build_agent(args.env_id, device)
    agent.load_state_dict(checkpoint["model"])
    video_folder = f"videos/{checkpoint['run_name']}/eval-checkpoint" if args.capture_video else None
    sticky = checkpoint["args"]["repeat_action_probability"]
    envs = make_envs(
        args.env_id, args.eval_episodes, sticky, args.env_backend, args.env_threads, video_folder
    )
    returns = evaluate(agent, envs, args.seed, device, args.eval_greedy)
    print(
        f"eval: return {returns.mean():.2f} ± {returns.std():.2f} over {len(returns)} episodes"
        f" ({args.eval_checkpoint})"
    )


class InterruptFlag:
    """First Ctrl-C asks the loop to stop at the end of the iteration (and save); a second aborts."""

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
            resume="allow" if checkpoint else None,
        )
    writer = SummaryWriter(str(run_dir))
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n" + "\n".join(f"|{key}|{value}|" for key, value in vars(args).items()),
    )

    # A resumed run reseeds with an offset so it does not replay the random stream of its start.
    seed = args.seed + (start_iteration - 1)
    seed_everything(seed, args.torch_deterministic)
    device = pick_device(args.cuda, args.torch_threads)

    envs = make_envs(
        args.env_id,
        args.num_envs,
        args.repeat_action_probability,
        args.env_backend,
        args.env_threads,
    )
    agent = build_agent(args.env_id, device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    if checkpoint is not None:
        try:
            agent.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
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
                args.learning_rate, iteration, args.num_iterations
            )

        for step in range(args.num_steps):
            global_step += args.num_envs
            obs[step] = torch.from_numpy(next_obs)
            # Gymnasium >= 1.0 autoresets on the step *after* a game ends: that step ignores the
            # action and returns the reset observation with reward 0. It is not a transition, so
            # it is kept out of the update (valid = False) instead of being learned from.
            valid[step] = ~next_is_autoreset
            with torch.inference_mode():
                action, logprob, _, value = agent.get_action_and_value(obs[step])
            values[step] = value
            actions[step] = action
            logprobs[step] = logprob

            next_obs, reward, term, trunc, infos = envs.step(action.cpu().numpy())
            rewards[step], terminated[step], episode_ended[step] = learning_signals(
                reward,
                term,
                trunc,
                infos["lives"],
                lives,
                next_is_autoreset,
                args.clip_rewards,
                args.episodic_life,
            )
            lives = infos["lives"]
            next_is_autoreset = term | trunc

            if "episode" in infos:
                for env_index in np.flatnonzero(infos["_episode"]):
                    episode_return = float(infos["episode"]["r"][env_index])
                    writer.add_scalar("charts/episodic_return", episode_return, global_step)
                    writer.add_scalar(
                        "charts/episodic_length", int(infos["episode"]["l"][env_index]), global_step
                    )
                    recent_returns = (recent_returns + [episode_return])[-20:]

        with torch.inference_mode():
            # After the last step: V(next obs), which is V(final obs) where a game just ended.
            values[args.num_steps] = agent.get_value(torch.from_numpy(next_obs).to(device))
            advantages, returns = compute_gae(
                torch.from_numpy(rewards).to(device),
                values,
                torch.from_numpy(terminated).to(device),
                torch.from_numpy(episode_ended).to(device),
                args.gamma,
                args.gae_lambda,
            )

        # Flat indices of the real transitions: the autoreset steps are left out, and the
        # uint8 frames are gathered per minibatch rather than copied as a whole.
        keep = torch.from_numpy(np.flatnonzero(valid)).to(device)
        stats = update(
            agent,
            optimizer,
            args,
            keep,
            obs.flatten(0, 1),
            actions.flatten(),
            logprobs.flatten(),
            advantages.flatten(),
            returns.flatten(),
            values[:-1].flatten(),
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
        b_values, b_returns = values[:-1].flatten()[keep], returns.flatten()[keep]
        writer.add_scalar("losses/explained_variance", explained_variance(b_values, b_returns), global_step)
        if iteration % 10 == 1:
            writer.add_histogram("losses/advantages", advantages.flatten()[keep], global_step)

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
    envs.close()

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

    video_folder = f"videos/{run_name}/eval" if args.capture_video else None
    eval_envs = make_envs(
        args.env_id,
        args.eval_episodes,
        args.repeat_action_probability,
        args.env_backend,
        args.env_threads,
        video_folder,
    )
    eval_returns = evaluate(agent, eval_envs, args.seed + 10_000, device, args.eval_greedy)
    for episode, episode_return in enumerate(eval_returns):
        writer.add_scalar("eval/episodic_return", episode_return, episode)
    writer.close()
    if args.track:
        import wandb

        wandb.finish()
    elapsed = time.time() - start_time
    saved = f"; checkpoint {checkpoint_path}" if args.save_model else ""
    print(
        f"done: {global_step} steps in {elapsed:.1f}s ({(global_step - start_step) / elapsed:.0f} steps/s); "
        f"eval return {eval_returns.mean():.2f} ± {eval_returns.std():.2f} over {len(eval_returns)} episodes{saved}"
    )


def update(
    agent, optimizer, args, keep, b_obs, b_actions, b_logprobs, b_advantages, b_returns, b_values
) -> dict:
    """Several epochs of minibatch PPO over the `keep` samples of one rollout; last epoch's stats."""
    clipfracs = []
    stats = {}
    for _epoch in range(args.update_epochs):
        permutation = keep[torch.randperm(len(keep), device=keep.device)]
        for minibatch in permutation.tensor_split(args.num_minibatches):
            _, new_logprob, entropy, new_value = agent.get_action_and_value(
                b_obs[minibatch], b_actions[minibatch]
            )
            log_ratio = new_logprob - b_logprobs[minibatch]
            advantages = b_advantages[minibatch]
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
    # The last step may have broken the weights even though every loss was finite.
    stats["finite"] = all(bool(torch.isfinite(parameter).all()) for parameter in agent.parameters())
    return stats


if __name__ == "__main__":
    main(tyro.cli(Args))
