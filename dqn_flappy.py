"""Deep Q-learning (Double DQN, replay buffer, target network) on Flappy Bird.

For FlappyBird-v0 or any gymnasium env with a Discrete action space, seeing the game's state
(--obs-type features, an MLP), its lidar scan (lidar) or 4 stacked 84x84 frames (pixels, the
Nature CNN, with defaults of its own). The run delivers the best network of its greedy evaluations.

Run:
    python dqn_flappy.py                                             # train, evaluate, save
    python dqn_flappy.py --resume runs/<run>/dqn_flappy.pt           # continue a stopped run
    python dqn_flappy.py --eval-checkpoint runs/<run>/dqn_flappy.pt --capture-video
    python dqn_flappy.py --eval-checkpoint runs/<run>/checkpoints      # the evaluation curve
    python dqn_flappy.py --obs-type pixels                           # learn from the screen

Expect (defaults): 10+ pipes per greedy episode after 250k steps, 1-2 min on a CPU; from pixels,
10+ after ~420k steps, about an hour on a 2-core CPU (seed 1). See README.md.
"""

from __future__ import annotations

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

import cv2
import flappy_bird_gymnasium  # noqa: F401  (registers FlappyBird-v0)
import gymnasium as gym
import numpy as np
import pygame
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
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
    """use a GPU when one is present (worth it for --obs-type pixels only)"""
    # One for the MLPs (more threads would wait for each other); the CNN's convolutions use two.
    torch_threads: int | None = None
    """CPU threads for torch (default 1; pixels 2)"""
    track: bool = False
    """log the run to Weights & Biases (works offline with WANDB_MODE=offline)"""
    wandb_project_name: str = "rl-scripts"
    """the W&B project"""
    wandb_entity: str | None = None
    """the W&B entity (team or user); None uses your default"""
    capture_video: bool = False
    """record the evaluation episodes as mp4 in videos/<run_name>/ (pixels: what the agent sees)"""

    env_id: str = "FlappyBird-v0"
    """a gymnasium environment with a Discrete action space (FlappyBird-v0 for lidar/pixels)"""
    obs_type: Literal["features", "lidar", "pixels"] = "features"
    """what the agent sees: the game's state vector, its lidar scan, or stacked 84x84 frames"""
    total_timesteps: int | None = None
    """environment steps to train for, summed over the envs (default 250k; pixels 500k)"""
    max_episode_steps: int = 10_000
    """time limit of an episode (a truncation: the target still bootstraps); ~270 pipes"""
    num_envs: int = 8
    """number of environments stepped in parallel (one forward pass acts for all of them)"""
    learning_rate: float | None = None
    """Adam learning rate (default 1e-3; pixels 2.5e-4)"""
    buffer_size: int = 100_000
    """replay buffer capacity in transitions (pixels: 100k frames of 84x84 take 0.7 GB)"""
    # 0.97 (a horizon of ~33 frames) rather than 0.99: a bad flap's death comes within a second.
    gamma: float = 0.97
    """discount per game frame (an agent step of N repeated frames discounts by gamma ** N)"""
    tau: float = 1.0
    """target network update rate: 1 copies the online network, < 1 is Polyak averaging"""
    target_network_frequency: int | None = None
    """environment steps between target network updates (default 200; pixels 1000)"""
    batch_size: int | None = None
    """transitions sampled from the replay buffer per gradient step (default 256; pixels 32)"""
    # Low on purpose: a random action flaps half the time, which lifts the bird into the first
    # pipe within a second; such episodes teach little, the greedy policy's own mistakes more.
    start_epsilon: float = 0.1
    """epsilon (probability of a random action) at the start"""
    end_epsilon: float = 0.001
    """epsilon at the end of the exploration phase and after it"""
    exploration_fraction: float = 0.1
    """fraction of --total-timesteps over which epsilon decays linearly from start to end"""
    learning_starts: int = 2_000
    """environment steps stored in the buffer before the first gradient step"""
    train_frequency: int = 8
    """environment steps between gradient steps (8: one update per step of the 8 envs)"""
    max_grad_norm: float = 10.0
    """global gradient-norm clipping threshold"""
    double_dqn: bool = True
    """pick the next action with the online network and value it with the target (Double DQN)"""
    hidden_size: int = 128
    """width of the two hidden layers of the MLP (features and lidar)"""
    frame_stack: int = 4
    """frames stacked into one observation (pixels only)"""
    action_repeat: int | None = None
    """game frames per agent step: the action repeats, rewards add up (default 1; pixels 2)"""
    background: Literal["day", "night", "plain"] | None = None
    """the scenery behind FlappyBird (default day; pixels plain: no scenery to learn around)"""
    bf16: bool = True
    """run the pixel CNN in bfloat16 where the hardware has native bf16 (see QNetwork)"""
    # DQN's greedy score swings from one stretch of training to the next on this game, so the run
    # delivers the best network seen (as SB3's EvalCallback keeps it), not the one it ended on.
    eval_freq: int = 20_000
    """env steps between greedy evaluations on fresh seeds that keep the best network (0: none)"""

    # The run around the algorithm: checkpoints, resuming, logging, evaluation.
    wandb_group: str | None = None
    """W&B group, so the seeds of one experiment plot together (default: --exp-name)"""
    save_model: bool = True
    """save the checkpoint runs/<run_name>/<exp_name>.pt (at the end, periodically, on a signal)"""
    checkpoint_freq: int = 100_000
    """also checkpoint every this many env steps, each kept in runs/<run>/checkpoints/ (0: off)"""
    log_interval: int = 1_000
    """write the loss statistics every this many environment steps"""
    resume: str | None = None
    """path of a checkpoint to continue training from (the replay buffer refills first)"""
    eval_checkpoint: str | None = None
    """a checkpoint to evaluate, or a folder of them to draw the evaluation curve of; then exit"""
    eval_episodes: int = 10
    """episodes of the final evaluation, of --eval-checkpoint and of each periodic evaluation"""

    def __post_init__(self):  # the fields left at None take their mode's default
        apply_mode_defaults(self)

    @property
    def stack(self) -> int | None:  # frames per observation; None: a vector, no stack axis
        return self.frame_stack if self.obs_type == "pixels" else None


# What the fields left at None default to, by observation type: a network that sees the screen
# learns from a smaller batch at a lower rate, for longer (the settings of the Atari DQN), and
# acts every other frame, which halves the gradient steps, the costliest part, per game second.
MODE_DEFAULTS = {
    "vectors": dict(
        total_timesteps=250_000, learning_rate=1e-3, target_network_frequency=200,
        batch_size=256, background="day", torch_threads=1, action_repeat=1,
    ),
    "pixels": dict(
        total_timesteps=500_000, learning_rate=2.5e-4, target_network_frequency=1000,
        batch_size=32, background="plain", torch_threads=2, action_repeat=2,
    ),
}  # fmt: skip


def apply_mode_defaults(args: Args) -> None:
    """Fill the fields left at None with the defaults of --obs-type (Args.__post_init__)."""
    defaults = MODE_DEFAULTS["pixels" if args.obs_type == "pixels" else "vectors"]
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def env_kwargs(args: Args) -> dict:
    """FlappyBird's options: its state vector or its lidar scan, and the scenery it draws."""
    if not args.env_id.startswith("FlappyBird"):
        return {}
    background = None if args.background == "plain" else args.background
    return {"use_lidar": args.obs_type == "lidar", "background": background}


# The network's input: square grayscale frames of this many pixels a side (the Nature DQN's).
FRAME_SIZE = 84


class PixelObservation(gym.ObservationWrapper):
    """Replace the observation with the screen: cropped, grayscale, FRAME_SIZE square, uint8. The
    bottom 21% of a frame is the ground, the same in every frame: cropping it spends the rows on
    the sky the bird flies in."""

    def __init__(self, env: gym.Env, keep_rows: float = 0.79):
        super().__init__(env)
        self.keep_rows = keep_rows
        self.observation_space = gym.spaces.Box(0, 255, (FRAME_SIZE, FRAME_SIZE), np.uint8)

    def observation(self, observation):
        game = self.env.unwrapped
        if hasattr(game, "_draw_surface"):
            # FlappyBird: shrink its own drawing surface straight to the network's size. render()
            # would first copy and transpose the whole 288x512 screen, most of a step's time.
            game._draw_surface(show_score=False, show_rays=False)
            width, height = game._surface.get_size()
            sky = game._surface.subsurface((0, 0, width, int(height * self.keep_rows)))
            small = pygame.transform.smoothscale(sky, (FRAME_SIZE, FRAME_SIZE))  # averages pixels
            frame = pygame.surfarray.array3d(small).transpose(1, 0, 2)
            return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
        frame = self.env.render()
        frame = frame[: int(frame.shape[0] * self.keep_rows)]
        gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        # INTER_AREA averages the pixels it merges: thin pipe edges survive the 5x shrink.
        return cv2.resize(gray, (FRAME_SIZE, FRAME_SIZE), interpolation=cv2.INTER_AREA)


class ActionRepeat(gym.Wrapper):
    """Play each action for `repeat` game frames (fewer, if the episode ends first) and return the
    sum of their rewards with the last frame's observation and info: one agent step."""

    def __init__(self, env: gym.Env, repeat: int):
        super().__init__(env)
        self.repeat = repeat

    def step(self, action):
        total_reward = 0.0
        for _ in range(self.repeat):
            observation, reward, terminated, truncated, info = self.env.step(action)
            total_reward += float(reward)
            if terminated or truncated:
                break
        return observation, total_reward, terminated, truncated, info


def make_env(args: Args, render: bool = False) -> gym.Env:
    """One env: the chosen observation type, the time limit and episode statistics."""
    pixels = args.obs_type == "pixels"
    env = gym.make(args.env_id, render_mode="rgb_array" if pixels or render else None,
                   max_episode_steps=args.max_episode_steps, **env_kwargs(args))  # fmt: skip
    env = gym.wrappers.RecordEpisodeStatistics(env)  # beneath the repeat: lengths in frames
    if args.action_repeat > 1:
        # Pixels hold each action 2 frames (15 decisions a second). The bird moves at most ~10
        # pixels a frame and a gap is 100 high, so a flap timed to 2 frames still passes it.
        env = ActionRepeat(env, args.action_repeat)
    if pixels:
        env = PixelObservation(env)  # drawn once per agent step, after the repeated frames
        # "reset" padding repeats an episode's first frame; ReplayBuffer stacks the same way.
        env = gym.wrappers.FrameStackObservation(env, args.frame_stack, padding_type="reset")
    else:  # float32, the network's dtype (FlappyBird's state is float64)
        box = gym.spaces.Box(-np.inf, np.inf, env.observation_space.shape, np.float32)
        env = gym.wrappers.TransformObservation(env, lambda obs: np.asarray(obs, np.float32), box)
    return env


def make_envs(args: Args) -> gym.vector.VectorEnv:
    """Flappy Bird has no vectorised implementation: a SyncVectorEnv steps the envs in a loop. It
    autoresets on the *next* step (gymnasium >= 1.0), a step the replay buffer never samples."""
    return gym.vector.SyncVectorEnv([lambda: make_env(args) for _ in range(args.num_envs)])


class QNetwork(nn.Module):
    """Q-values of every action: the Nature CNN for stacked frames, an MLP for vectors."""

    def __init__(self, obs_shape, num_actions: int, hidden_size: int = 256, bf16: bool = False):
        super().__init__()
        self.pixels, self.bf16 = len(obs_shape) == 3, bf16
        if self.pixels:
            self.network = nn.Sequential(
                nn.Conv2d(obs_shape[0], 32, 8, stride=4), nn.ReLU(),
                nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
                nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(),
                nn.Flatten(), nn.Linear(64 * 7 * 7, 512), nn.ReLU(),
                nn.Linear(512, num_actions),
            )  # fmt: skip
        else:
            self.network = nn.Sequential(
                nn.Linear(obs_shape[0], hidden_size), nn.ReLU(),
                nn.Linear(hidden_size, hidden_size), nn.ReLU(),
                nn.Linear(hidden_size, num_actions),
            )  # fmt: skip

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if not self.pixels:
            return self.network(obs)
        # Frames travel as uint8 (4x less to copy), scaled to [0, 1] here. Channels-last and bf16
        # speed up the CPU convolutions; the Q head stays fp32 (bf16 blurs values 0.4% apart).
        frames = obs.float().div_(255.0).contiguous(memory_format=torch.channels_last)
        with torch.autocast(frames.device.type, torch.bfloat16, enabled=self.bf16):
            hidden = self.network[:-1](frames)
        return self.network[-1](hidden.float())


def build_q_network(args: Args, device: torch.device) -> QNetwork:
    """The network for this env and observation type (shapes read from a throwaway env)."""
    env = gym.make(args.env_id, **env_kwargs(args))
    num_actions = int(env.action_space.n)
    pixels = args.obs_type == "pixels"
    frames = (args.frame_stack, FRAME_SIZE, FRAME_SIZE)
    obs_shape = frames if pixels else env.observation_space.shape
    env.close()
    # native_bf16 (below the banner) decides the CNN's dtype: bf16 only where the CPU has it.
    q_network = QNetwork(tuple(obs_shape), num_actions, args.hidden_size,
                         bf16=pixels and args.bf16 and native_bf16(device))  # fmt: skip
    return q_network.to(
        device, memory_format=torch.channels_last if pixels else torch.preserve_format
    )


def linear_schedule(start: float, end: float, duration: int, step: int) -> float:
    """Linear from `start` at step 0 to `end` at step `duration`, then constant."""
    return start + (end - start) * min(1.0, step / duration)


def td_targets(rewards, terminated, next_q_target, next_q_online, gamma: float) -> torch.Tensor:
    """One-step TD targets r + gamma * (1 - terminated) * Q_target(s', a').

    a' = argmax Q_target(s') for DQN (`next_q_online` None), argmax Q_online(s') for Double DQN:
    one noisy estimate that picks and values the action biases the max upwards. `terminated`
    only, not truncated: a time limit ends the episode, not the game; the target bootstraps.
    """
    chooser = next_q_target if next_q_online is None else next_q_online
    next_actions = chooser.argmax(dim=1, keepdim=True)
    next_values = next_q_target.gather(1, next_actions).squeeze(1)
    return rewards + gamma * (1.0 - terminated.float()) * next_values


class ReplayBuffer:
    """Uniform replay over a preallocated NumPy ring with one slot per env per vector step.

    Slot t of env e holds the newest frame of the observation seen at step t, the action taken,
    and the reward and termination that followed; the next observation is slot t + 1. Each frame
    is stored once (not 2 x 4 times in (obs, next_obs)); a stack is read from consecutive slots.
    The autoreset step after an episode is stored (its frame is the final observation) but flagged
    `autoreset`: no transition starts there. The slot after it is `first`: stacks never reach back
    across it but repeat it, as FrameStackObservation(padding="reset") does.
    """

    def __init__(self, capacity, num_envs, frame_shape, frame_dtype, stack: int | None, seed=0):
        self.capacity, self.num_envs, self.stack = capacity, num_envs, stack
        self.frames_per_obs = stack or 1
        self.frames = np.zeros((capacity, num_envs, *frame_shape), dtype=frame_dtype)
        self.actions = np.zeros((capacity, num_envs), dtype=np.int64)
        self.rewards = np.zeros((capacity, num_envs), dtype=np.float32)
        self.terminated = np.zeros((capacity, num_envs), dtype=np.bool_)
        self.first = np.zeros((capacity, num_envs), dtype=np.bool_)
        self.autoreset = np.zeros((capacity, num_envs), dtype=np.bool_)
        self.pos, self.full = 0, False
        self.next_is_first = np.ones(num_envs, dtype=np.bool_)
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        """Slots written per env (transitions stored, counting the final-observation slots)."""
        return self.capacity if self.full else self.pos

    def add(self, obs, actions, rewards, terminated, autoreset) -> None:
        """Store one vector step: the observations acted on, the actions, rewards, terminations.
        `autoreset[e]`: env e's observation ended its episode, so this is its autoreset step."""
        self.frames[self.pos] = obs if self.stack is None else obs[:, -1]
        self.actions[self.pos] = actions
        self.rewards[self.pos] = rewards
        self.terminated[self.pos] = terminated
        self.first[self.pos] = self.next_is_first
        self.autoreset[self.pos] = autoreset
        self.next_is_first = np.array(autoreset, dtype=np.bool_)
        self.pos = (self.pos + 1) % self.capacity
        self.full = self.full or self.pos == 0

    def _valid(self, t: np.ndarray, e: np.ndarray) -> np.ndarray:
        """Slots that start a real transition whose frames are all still in the buffer."""
        newest = (self.pos - 1) % self.capacity
        valid = ~self.autoreset[t, e] & (t != newest)  # the newest slot has no next observation yet
        if self.full:
            # The oldest stack - 1 slots would stack frames that were overwritten by the newest.
            valid &= (t - self.pos) % self.capacity >= self.frames_per_obs - 1
        return valid

    def _stacked(self, t: np.ndarray, e: np.ndarray) -> np.ndarray:
        """The observation at slots (t, e): its newest frame and the stack - 1 before it."""
        if self.stack is None:  # vectors: no stack axis
            return self.frames[t, e]
        index = np.empty((len(t), self.stack), dtype=np.int64)
        index[:, -1] = current = t
        for k in range(self.stack - 2, -1, -1):
            # Step back one slot unless the current one starts its episode: then repeat it.
            current = np.where(self.first[current, e], current, (current - 1) % self.capacity)
            index[:, k] = current
        return self.frames[index, e[:, None]]

    def sample(self, batch_size: int) -> tuple[np.ndarray, ...]:
        """Uniform transitions: (obs, actions, rewards, terminated, next_obs) as NumPy arrays."""
        t = self.rng.integers(0, len(self), batch_size)
        e = self.rng.integers(0, self.num_envs, batch_size)
        invalid = ~self._valid(t, e)
        while invalid.any():  # redraw the few that hit an autoreset or an incomplete slot
            count = int(invalid.sum())
            t[invalid] = self.rng.integers(0, len(self), count)
            e[invalid] = self.rng.integers(0, self.num_envs, count)
            invalid[invalid] = ~self._valid(t[invalid], e[invalid])
        obs, next_obs = self._stacked(t, e), self._stacked((t + 1) % self.capacity, e)
        return obs, self.actions[t, e], self.rewards[t, e], self.terminated[t, e], next_obs


def dqn_update(q_network, target_network, optimizer, rb: ReplayBuffer, args: Args, device) -> dict:
    """One gradient step of the Huber TD loss on a uniform minibatch from the replay buffer."""
    batch = (torch.as_tensor(array, device=device) for array in rb.sample(args.batch_size))
    obs, actions, rewards, terminated, next_obs = batch
    with torch.no_grad():
        next_q_target = target_network(next_obs)
        next_q_online = q_network(next_obs) if args.double_dqn else None
        # The discount of one agent step: gamma per game frame, over its repeated frames.
        gamma = args.gamma**args.action_repeat
        targets = td_targets(rewards, terminated, next_q_target, next_q_online, gamma)
    q_values = q_network(obs).gather(1, actions.unsqueeze(1)).squeeze(1)
    # Huber: linear for large TD errors, so one surprising transition cannot wreck the network.
    loss = F.smooth_l1_loss(q_values, targets)
    if not torch.isfinite(loss):
        return {"finite": False}
    optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(q_network.parameters(), args.max_grad_norm)
    optimizer.step()
    return {"finite": True, "td_loss": loss.item(), "q_values": q_values.mean().item()}


@torch.no_grad()
def update_target(target_network: nn.Module, q_network: nn.Module, tau: float) -> None:
    """target <- tau * online + (1 - tau) * target (tau = 1: a hard copy)."""
    for target, online in zip(target_network.parameters(), q_network.parameters(), strict=True):
        target.lerp_(online, tau)


# Copied from ppo_cartpole.py: crossed
def crossed(every: int, step: int, previous_step: int) -> bool:
    """True when a multiple of `every` lies in (previous_step, step]: periodic work (logging,
    checkpoints) is counted in environment steps, whatever the steps per iteration."""
    return every > 0 and step // every != previous_step // every


@torch.inference_mode()
def evaluate(
    q_network: QNetwork | None,
    args: Args,
    episodes: int,
    seed: int,
    device: torch.device,
    video_folder: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Play one greedy episode in each of `episodes` envs at once (env i seeded seed + i); return
    their returns and scores. One batched forward pass per step keeps the periodic evaluations
    cheap. The score is the game's own count of pipes passed (`info["score"]`), NaN without one.
    `q_network=None` plays uniformly random actions (seeded by `seed`).
    """

    def make_evaluation_env(index: int) -> Callable[[], gym.Env]:
        def thunk() -> gym.Env:
            env = make_env(args, render=video_folder is not None)
            if video_folder is None:
                return env
            import warnings

            # Each env records its first episode (env-<i>-episode-0.mp4): one video per evaluation
            # episode, of the game's own frames, or for pixels of the frames the agent sees. The
            # recorders after the first find the folder the first one made; the warning about
            # overwriting it would be about their siblings, so it is theirs to skip.
            if args.obs_type == "pixels":
                env = AgentView(env)
            with warnings.catch_warnings():
                if index > 0:
                    warnings.filterwarnings("ignore", message=".*Overwriting existing videos")
                return gym.wrappers.RecordVideo(
                    env, video_folder, name_prefix=f"env-{index}", disable_logger=True,
                    episode_trigger=lambda episode: episode == 0,
                )  # fmt: skip

        return thunk

    envs = gym.vector.SyncVectorEnv([make_evaluation_env(index) for index in range(episodes)])
    obs, _ = envs.reset(seed=seed)
    returns, scores = np.zeros(episodes), np.full(episodes, np.nan)
    playing = np.ones(episodes, dtype=bool)
    random_actions = np.random.default_rng(seed)
    while playing.any():
        if q_network is None:
            actions = random_actions.integers(envs.single_action_space.n, size=episodes)
        else:
            actions = q_network(torch.as_tensor(obs, device=device)).argmax(dim=1).cpu().numpy()
        obs, rewards, terminated, truncated, infos = envs.step(actions)
        returns += rewards * playing  # an env whose episode has ended plays on, uncounted
        ended = playing & (terminated | truncated)
        if "score" in infos:
            scores[ended] = infos["score"][ended]
        playing &= ~ended
    envs.close()
    return returns, scores


def periodic_eval_episodes(args: Args) -> dict:
    """What the mean return of a periodic evaluation is a mean over: the env and its time limit,
    the number of episodes and their seeds (episode i of the evaluation at step s is seeded
    seed_base + s + i). Two means decide which network is better only when all of it is equal."""
    return {
        "env_id": args.env_id,
        "max_episode_steps": args.max_episode_steps,
        "episodes": args.eval_episodes,
        "seed_base": args.seed + PERIODIC_EVAL_SEED_OFFSET,
    }


def fresh_best(args: Args) -> dict:
    """No network kept yet (any evaluation beats it), and the episodes the best will be scored on,
    so that a resumed run can tell whether its own evaluations compare with it."""
    return {
        "mean_return": -np.inf,
        "step": 0,
        "model": None,
        "scored_on": periodic_eval_episodes(args),
    }


def resumed_best(checkpoint: dict, args: Args) -> dict:
    """The best network a resumed run goes on from: the checkpoint's when this run's periodic
    evaluations play the episodes it was scored on, else a fresh start, said in a note on stderr.
    --eval-freq 0 promises the last network, so it drops the saved best too."""
    best, saved_best = fresh_best(args), checkpoint["best"]
    if saved_best["model"] is None:
        return best
    saved = f"the best network of {args.resume} (step {saved_best['step']})"
    if args.eval_freq == 0:
        print(f"note: --eval-freq 0 delivers the last network, not {saved}", file=sys.stderr)
        return best
    then, now = saved_best["scored_on"], best["scored_on"]
    changed = ", ".join(
        f"{name} {then.get(name)!r} then, {value!r} now"
        for name, value in now.items()
        if then.get(name) != value
    )
    if changed:
        print(
            f"note: {saved} was scored on other evaluation episodes ({changed}); "
            "this run starts the best afresh",
            file=sys.stderr,
        )
        return best
    return saved_best


def keep_if_best(best: dict, q_network: QNetwork, args: Args, global_step: int, device, writer):
    """A periodic greedy evaluation on fresh episodes (never the final evaluation's): log its
    means, and keep a copy of the network in `best` if it beats the best so far."""
    if args.eval_freq == 0:
        return
    seed = best["scored_on"]["seed_base"] + global_step
    returns, scores = evaluate(q_network, args, args.eval_episodes, seed, device)
    writer.add_scalar("charts/greedy_return", returns.mean(), global_step)
    if not np.isnan(scores).any():
        writer.add_scalar("charts/greedy_score", scores.mean(), global_step)
    if returns.mean() > best["mean_return"]:
        model = {name: tensor.detach().clone() for name, tensor in q_network.state_dict().items()}
        best.update(mean_return=float(returns.mean()), step=global_step, model=model)


def load_delivered(q_network: QNetwork, best: dict) -> None:
    """The network the run delivers: the best of the periodic evaluations, if there were any."""
    if best["model"] is not None:
        q_network.load_state_dict(best["model"])


def final_evaluation(q_network, best: dict, args: Args, device, video_folder: str | None):
    """On episodes no periodic evaluation played: the delivered (best) network, and the last
    one beside it, so that what keeping the best bought is in plain view."""
    episodes, eval_seed = args.eval_episodes, args.seed + EVAL_SEED_OFFSET
    last_returns, last_scores = evaluate(q_network, args, episodes, eval_seed, device)
    load_delivered(q_network, best)
    returns, scores = evaluate(q_network, args, episodes, eval_seed, device, video_folder)
    per_episode = {
        "eval/episodic_return": returns,
        "eval/episodic_score": scores,  # pipes passed (NaN where the env keeps no score)
        "eval/last_network/episodic_return": last_returns,
        "eval/last_network/episodic_score": last_scores,
    }
    last = describe_eval(last_returns, last_scores)
    delivered = f"{delivered_network(best)}: {describe_eval(returns, scores)}"
    return per_episode, f"{delivered}; last network: {last}"


def main(args: Args) -> None:
    validate(args)
    if args.eval_checkpoint:
        return evaluate_checkpoint(args)
    num_iterations = max(1, args.total_timesteps // args.num_envs)  # one step of every env each
    exploration_steps = max(1, int(args.exploration_fraction * args.total_timesteps))
    # The run's name, loggers, progress bar and stop signals; with --resume, the saved state.
    run = Run(args, total_steps=num_iterations * args.num_envs)
    global_step = run.start_step
    # A resumed run reseeds with an offset so it does not replay the random stream of its start.
    seed = training_seed(args.seed, global_step // args.num_envs, args.num_envs)
    seed_everything(seed, args.torch_deterministic)
    device = pick_device(args.cuda, args.torch_threads)

    q_network = build_q_network(args, device)
    target_network = build_q_network(args, device)
    target_network.load_state_dict(q_network.state_dict())
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate)
    run.restore(model=q_network, target_model=target_network, optimizer=optimizer)  # with --resume
    # The best network of the periodic greedy evaluations: the network the run delivers.
    best = resumed_best(run.resumed, args) if run.resumed else fresh_best(args)

    def state() -> dict:  # what a checkpoint holds, read at the moment it is saved
        return training_state(
            args, run.name, global_step, q_network, target_network, optimizer, best
        )

    envs = make_envs(args)
    pixels = args.obs_type == "pixels"
    frame_shape = (FRAME_SIZE, FRAME_SIZE) if pixels else envs.single_observation_space.shape
    frame_dtype = np.uint8 if pixels else np.float32
    rb = ReplayBuffer(
        args.buffer_size // args.num_envs, args.num_envs, frame_shape, frame_dtype, args.stack, seed
    )
    rng = np.random.default_rng(seed)
    obs, _ = envs.reset(seed=seed)
    # True where the env's previous step ended an episode: its next step is the autoreset step.
    next_is_autoreset = np.zeros(args.num_envs, dtype=np.bool_)
    stats = {"finite": True}
    for iteration in range(global_step // args.num_envs + 1, num_iterations + 1):
        # Act epsilon-greedily in every env and store the step.
        epsilon = linear_schedule(args.start_epsilon, args.end_epsilon, exploration_steps,
                                  global_step)  # fmt: skip
        previous_step, global_step = global_step, global_step + args.num_envs
        explore = rng.random(args.num_envs) < epsilon
        random_actions = rng.integers(0, envs.single_action_space.n, args.num_envs)
        with torch.inference_mode():
            greedy = q_network(torch.as_tensor(obs, device=device)).argmax(dim=1).cpu().numpy()
        actions = np.where(explore, random_actions, greedy)
        next_obs, rewards, terminated, truncated, infos = envs.step(actions)
        rb.add(obs, actions, rewards, terminated, next_is_autoreset)
        next_is_autoreset, obs = terminated | truncated, next_obs
        for i in np.flatnonzero(infos.get("_episode", [])):
            run.log_episode(infos["episode"]["r"][i], infos["episode"]["l"][i], global_step)
            if "score" in infos:  # Flappy Bird's pipes passed
                run.writer.add_scalar("charts/episodic_score", infos["score"][i], global_step)

        # Learn from replayed transitions: one gradient step per --train-frequency env steps, and
        # move the target network every --target-network-frequency env steps.
        if len(rb) > 1 and len(rb) * args.num_envs >= args.learning_starts:
            updates = global_step // args.train_frequency - previous_step // args.train_frequency
            for _ in range(updates):
                stats = dqn_update(q_network, target_network, optimizer, rb, args, device)
                if not stats["finite"]:
                    break
            if crossed(args.target_network_frequency, global_step, previous_step):
                update_target(target_network, q_network, args.tau)

        # Keep the best greedy network, judged on episodes of its own; the last one competes too.
        evaluation_due = crossed(args.eval_freq, global_step, previous_step)
        if stats["finite"] and (evaluation_due or iteration == num_iterations):
            keep_if_best(best, q_network, args, global_step, device, run.writer)

        # Logging, the NaN check, the progress bar, checkpoints and stop signals.
        scalars = {f"losses/{key}": value for key, value in stats.items() if key != "finite"}
        scalars["charts/epsilon"] = epsilon
        scalars["charts/learning_rate"] = optimizer.param_groups[0]["lr"]
        if run.end_iteration(global_step, previous_step, scalars, state, stats["finite"]):
            break
    envs.close()

    # Save, evaluate the delivered network, summarise; after Ctrl-C or SIGTERM, exit 130 or 143.
    run.finish(
        state(), global_step, lambda video: final_evaluation(q_network, best, args, device, video)
    )


# ----------------------------------------------------------------------------------------------
# Plumbing: validation, evaluation of a checkpoint, checkpoint files, logging and stop signals.
# A first reading can stop here: nothing below changes what is learned or delivered.
# ----------------------------------------------------------------------------------------------


def training_state(args, run_name, global_step, q_network, target_network, optimizer, best):
    """What a checkpoint holds. Not saved: the replay buffer (0.7 GB of frames for pixels; a
    resumed run refills --learning-starts steps before it updates) and epsilon (it follows from
    the step)."""
    return {
        "kind": CHECKPOINT_KIND,
        "env_id": args.env_id,
        "run_name": run_name,
        "args": asdict(args),
        "global_step": global_step,
        "model": q_network.state_dict(),
        "target_model": target_network.state_dict(),
        "optimizer": optimizer.state_dict(),
        "best": best,
    }


# Checkpoints say what they hold by this kind, not by the script's file name, so a renamed copy of
# this script still loads its own checkpoints.
CHECKPOINT_KIND = "dqn/3"
# Earlier kinds with the same networks: evaluated, not resumed (their best lacks its "scored_on").
EVALUATED_KINDS = ("dqn/2",)
CHECKPOINT_SUFFIX = ".pt"


# Copied from ppo_cartpole.py: EVAL_SEED_OFFSET
EVAL_SEED_OFFSET = 10_000  # evaluation envs get seed + this: episodes that training never saw
# Periodic evaluations play seed + this + the step: never the final evaluation's episodes.
PERIODIC_EVAL_SEED_OFFSET = 20_000


# Copied from ppo_cartpole.py: training_seed
def training_seed(seed: int, resume_offset: int, num_envs: int) -> int:
    """The training envs' seed (env i gets it + i). A resumed run starts its stream at an offset so
    as not to replay its start's, taken modulo so that every training env's seed stays below
    seed + EVAL_SEED_OFFSET whatever the budget: training never plays an evaluation's episodes."""
    return seed + resume_offset % (EVAL_SEED_OFFSET - num_envs + 1)


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
        args, "total_timesteps", "max_episode_steps", "num_envs", "buffer_size", "batch_size",
        "target_network_frequency", "train_frequency", "eval_episodes", "frame_stack",
        "torch_threads", "learning_rate", "max_grad_norm", "hidden_size", "action_repeat",
    )  # fmt: skip
    check_non_negative(args, "checkpoint_freq", "learning_starts", "log_interval", "eval_freq")
    check_seed_room(args, "num_envs", "eval_episodes")
    check_fraction(args, "gamma", "start_epsilon", "end_epsilon")
    for name in ("tau", "exploration_fraction"):
        if not 0.0 < getattr(args, name) <= 1.0:
            fail(f"--{name.replace('_', '-')} must be in (0, 1], got {getattr(args, name)}")
    if args.buffer_size < args.batch_size:
        fail(f"--buffer-size {args.buffer_size} is smaller than --batch-size {args.batch_size}")
    slots, needed = args.buffer_size // args.num_envs, (args.stack or 1) + 1
    if slots <= needed:
        fail(
            f"--buffer-size {args.buffer_size} leaves {slots} slots per env; it needs more than"
            f" frame_stack + 1 = {needed}"
        )
    if args.resume and args.eval_checkpoint:
        fail("give either --resume or --eval-checkpoint, not both")
    check_env(args)


def check_env(args: Args) -> None:
    """Fail with suggestions for an unknown id, and with an explanation for unusable spaces."""
    env_id, obs_type = args.env_id, args.obs_type
    if env_id not in gym.registry:
        import difflib

        close = difflib.get_close_matches(env_id, list(gym.registry), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        fail(f"unknown environment id {env_id!r}{hint}")
    if obs_type == "lidar" and not env_id.startswith("FlappyBird"):
        fail(
            f"--obs-type lidar needs a FlappyBird environment, not {env_id}; "
            "use --obs-type features"
        )
    env = gym.make(env_id, **env_kwargs(args))
    observation_space, action_space = env.observation_space, env.action_space
    render_modes = env.metadata.get("render_modes", [])
    env.close()
    if not isinstance(action_space, gym.spaces.Discrete):
        fail(f"{env_id} has a {type(action_space).__name__} action space; DQN needs Discrete")
    if obs_type == "pixels":
        if "rgb_array" not in render_modes:
            fail(f"{env_id} cannot render rgb_array frames, which --obs-type pixels needs")
    elif not isinstance(observation_space, gym.spaces.Box) or len(observation_space.shape) != 1:
        fail(
            f"{env_id} observations are {observation_space}; --obs-type {obs_type} needs a 1-D Box"
            " (try --obs-type pixels)"
        )


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
RESUME_MAY_CHANGE = {
    "total_timesteps", "resume", "eval_checkpoint", "eval_episodes", "cuda", "torch_threads",
    "track", "wandb_project_name", "wandb_entity", "wandb_group", "capture_video", "save_model",
    "checkpoint_freq", "log_interval", "eval_freq",
}  # fmt: skip
# Settings that shape the environment or the network: --eval-checkpoint may not change them.
MODEL_SETTINGS = {
    "env_id", "obs_type", "hidden_size", "frame_stack", "max_episode_steps", "background",
    "action_repeat",
}  # fmt: skip


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


# Copied from ppo_atari.py: native_bf16
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


class AgentView(gym.Wrapper):
    """render() returns what the agent saw last: the newest of its stacked 84x84 grayscale frames,
    as RGB and 4x larger (336x336), so that a recorded video shows the input the policy acted on."""

    def __init__(self, env: gym.Env, scale: int = 4):
        super().__init__(env)
        self.scale, self.frame = scale, None

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.frame = obs[-1]
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.frame = obs[-1]
        return obs, reward, terminated, truncated, info

    def render(self) -> np.ndarray:
        big = self.frame.repeat(self.scale, axis=0).repeat(self.scale, axis=1)
        return np.stack([big] * 3, axis=-1)


def delivered_network(best: dict) -> str:
    """Which network load_delivered loads, in words."""
    return "last network" if best["model"] is None else f"best network (step {best['step']})"


# Copied from ppo_cartpole.py: eval_summary
def eval_summary(returns: np.ndarray) -> str:
    return f"eval return {returns.mean():.2f} ± {returns.std():.2f} over {len(returns)} episodes"


def describe_eval(returns: np.ndarray, pipes: np.ndarray | None) -> str:
    """eval_summary, plus the pipes passed where the game counts them (not NaN)."""
    if pipes is None or np.isnan(pipes).any():
        return eval_summary(returns)
    return f"{eval_summary(returns)}, pipes {pipes.mean():.1f} ± {pipes.std():.1f}"


def evaluate_checkpoint(args: Args) -> None:
    """--eval-checkpoint: rebuild the network the run delivers from the saved settings and play it
    greedily with the seed of the end-of-training evaluation, so that both print the same figures.
    Given a folder (runs/<run>/checkpoints), evaluate each checkpoint in it and draw the curve."""
    import functools

    # Chosen at the first episode, so that bad input is reported before the device notice.
    device = functools.cache(lambda: pick_device(args.cuda, args.torch_threads))

    def load(path: str) -> dict:
        checkpoint = load_checkpoint(path)
        check_settings(args, checkpoint["args"], set(checkpoint["args"]) - MODEL_SETTINGS)
        return checkpoint

    def play(checkpoint: dict | None, path: str = "", video=None, delivered=True) -> dict:
        q_network = None  # None: the uniformly random policy
        if checkpoint is not None:
            q_network = build_q_network(args, device())
            restore(checkpoint, path, model=q_network)
            if delivered:  # else the network the checkpoint was training at its step
                load_delivered(q_network, checkpoint["best"])
        eval_seed = args.seed + EVAL_SEED_OFFSET
        returns, pipes = evaluate(q_network, args, args.eval_episodes, eval_seed, device(), video)
        # The pipes passed, where the game counts them: the folder's curve gives them a panel.
        return {"return": returns} | ({} if np.isnan(pipes).any() else {"pipes": pipes})

    if Path(args.eval_checkpoint).is_dir():
        # Each checkpoint's own network, so the curve shows how the score swings, and a mark at
        # the network the newest checkpoint delivers (kept files are named in step order).
        kept = sorted(Path(args.eval_checkpoint).glob(f"*{CHECKPOINT_SUFFIX}"))
        best = load(str(kept[-1]))["best"] if kept else {"model": None}
        mark = (
            None
            if best["model"] is None
            else (best["step"], f"delivered: {delivered_network(best)}")
        )
        evaluate_checkpoint_folder(
            args.eval_checkpoint, load, lambda checkpoint, path: play(checkpoint, path,
            delivered=False), CHECKPOINT_SUFFIX, "environment steps", mark,
        )  # fmt: skip
        return
    checkpoint = load(args.eval_checkpoint)
    video = f"videos/{checkpoint['run_name']}/eval-checkpoint" if args.capture_video else None
    metrics = play(checkpoint, args.eval_checkpoint, video)
    summary = describe_eval(metrics["return"], metrics.get("pipes"))
    print(f"{delivered_network(checkpoint['best'])}: {summary}; checkpoint {args.eval_checkpoint}")


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
