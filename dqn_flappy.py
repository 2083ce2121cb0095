"""Deep Q-learning (Double DQN, replay buffer, target network) on Flappy Bird.

Trains a DQN agent on `FlappyBird-v0` from flappy-bird-gymnasium, or on any gymnasium
environment with a Discrete action space and a 1-D Box observation (`--obs-type features`). Three
observation types:
  - `features` (default): the game's 12-number state (positions of the next three pipes, the
    bird's height, speed and rotation), an MLP. It is the default because it is the only mode
    that learns to pass pipes on a CPU in minutes: the state is exact, the env runs at ~50k
    steps/s, and an MLP update costs milliseconds, so the budget goes into learning.
  - `lidar`: the 180-ray lidar scan the game provides, an MLP (more inputs, slower to learn).
  - `pixels`: the classic setting. Each step renders the game (512x288 rgb), which is cropped
    above the ground, turned to grayscale and resized to 84x84 uint8 with OpenCV; 4 frames are
    stacked and fed to the Nature CNN. Rendering caps it at a few hundred steps/s on a CPU, and it
    needs millions of steps: a GPU run.

The DQN details: a preallocated NumPy replay buffer that stores each frame once (the four stacked
frames of an observation and of the next one are read back from consecutive slots), uniform
sampling, a target network (hard copy every N steps, or Polyak averaging with --tau < 1), the
Huber loss, a linear epsilon schedule, learning starts, a train frequency, global gradient
clipping, and Double DQN on by default. Terminations stop the bootstrap, truncations (the
`--max-episode-steps` time limit) do not, and gymnasium's autoreset step never becomes a
transition. Evaluation is greedy and reports the pipes passed (the game's score) with the return.

Run:
    python dqn_flappy.py                          # features, train, evaluate, save the checkpoint
    python dqn_flappy.py --resume runs/<run>/dqn_flappy.pt        # continue after Ctrl-C / SIGTERM
    python dqn_flappy.py --eval-checkpoint runs/<run>/dqn_flappy.pt --capture-video
    python dqn_flappy.py --obs-type pixels --total-timesteps 2000000 --batch-size 32 \
        --learning-rate 1e-4 --target-network-frequency 1000 --train-frequency 4
    tensorboard --logdir runs

Expect (features, default args, on a 2-core CPU): 250k steps, the periodic greedy evaluations
and the final one take 90-100 s of CPU time (~2,700 steps/s alone, two runs at once ~1,900).
DQN stays unstable on this game: the greedy score swings from one stretch of training to the next,
so every 20k steps the greedy policy plays 10 fresh episodes and the best network so far is kept;
the run delivers that one and reports the last network beside it. Pipes passed, mean of the 10
final evaluation episodes, delivered (best) network / last network:
    seed 42: 40.7 / 40.7 (best at 250k)    seed 123: 236.9 / 15.8 (220k)    seed 456: 33.2 / 10.5 (180k)
    seed 1:  15.3 / 15.3 (250k)            seed 2:    55.3 / 43.9 (160k)
every seed passes 10 or more pipes with the delivered network, median 40.7 (last network: 15.8).
The discount matters most: with gamma 0.99 (and the other defaults) seed 1 reached only 7.2 pipes
after 150k steps, and neither a lower learning rate (5e-4 or 2.5e-4) nor a slower or
Polyak-averaged target network helped (0 to 3.3 pipes at the end of 150k to 300k steps).
Pixels: rendering and the CNN make it a GPU run (the command above is a
starting point, not a tuned setting). On this CPU a 4k-step pixels run (batch 32, one update
per 8 steps) ran at 29 steps/s and passed no pipe: far too short to learn anything.
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

import cv2
import flappy_bird_gymnasium  # noqa: F401  (registers FlappyBird-v0)
import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

# Checkpoints say what they hold by this kind, not by the file name, so a renamed copy of this
# script still loads its own checkpoints.
CHECKPOINT_KIND = "dqn/3"
# Older kinds of this script whose networks still evaluate (their weights are saved the same way),
# and why a run cannot be resumed from them.
EVALUATED_KINDS = {
    "dqn/2": "its best network does not record the evaluation episodes it was scored on",
}


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
    # Measured on a busy 2-core CPU, one thread against two: a 12-256-256-2 MLP acts in 0.14 ms
    # against 2.3 ms and updates in 4.7 ms against 71 ms; the Nature CNN acts for 8 envs in 31 ms
    # against 172 ms and updates on 32 samples in 0.48 s against 2.5 s. Threads only wait here.
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
    """record the evaluation episodes (the game's own frames) as mp4 under videos/<run_name>/"""
    save_model: bool = True
    """save the checkpoint runs/<run_name>/<exp_name>.pt (at the end, periodically, on Ctrl-C)"""
    checkpoint_freq: int = 100_000
    """also save a checkpoint every this many environment steps, each kept in
    runs/<run_name>/checkpoints/ with the trained agent at the end (0: none of them)"""
    log_interval: int = 1_000
    """write the loss statistics every this many environment steps"""
    resume: str | None = None
    """path of a checkpoint to continue training from (the replay buffer refills first)"""
    eval_checkpoint: str | None = None
    """path of a checkpoint to evaluate for --eval-episodes episodes, then exit"""
    eval_episodes: int = 10
    """episodes of the final greedy evaluation (and of --eval-checkpoint and each periodic one)"""
    # DQN's greedy policy swings between good and bad from one stretch of training to the next on
    # this game (a seed passed 11.7 pipes at 175k steps, 0 at 200k, 17.0 at 225k), so the network
    # the run delivers is the best one seen, as SB3's EvalCallback keeps it, not whichever one the
    # budget happened to end on. Both are evaluated at the end, and both figures are reported.
    eval_freq: int = 20_000
    """every this many environment steps, play --eval-episodes greedy episodes on fresh seeds (never
    the final evaluation's) and keep the network with the best mean return (0: deliver the last)"""

    env_id: str = "FlappyBird-v0"
    """a gymnasium environment with a Discrete action space (FlappyBird-v0 for lidar/pixels)"""
    obs_type: Literal["features", "lidar", "pixels"] = "features"
    """what the agent sees: the game's state vector, its lidar scan, or stacked 84x84 frames"""
    total_timesteps: int = 250_000
    """environment steps to train for (summed over the vectorised envs)"""
    max_episode_steps: int = 10_000
    """time limit of an episode (a truncation: the target still bootstraps); ~270 pipes"""
    num_envs: int = 8
    """number of environments stepped in parallel (one forward pass acts for all of them)"""
    learning_rate: float = 1e-3
    """Adam learning rate"""
    buffer_size: int = 100_000
    """replay buffer capacity in transitions (pixels: 100k frames of 84x84 take 0.7 GB)"""
    # 0.97 (a horizon of ~33 frames) rather than 0.99: the death that follows a bad flap comes
    # within about a second, and the shorter horizon took seed 1 from 7 to 55 pipes.
    gamma: float = 0.97
    """discount factor"""
    tau: float = 1.0
    """target network update rate: 1 copies the online network, < 1 is Polyak averaging"""
    target_network_frequency: int = 200
    """environment steps between target network updates"""
    batch_size: int = 256
    """transitions sampled from the replay buffer per gradient step"""
    # Low on purpose: a random action flaps half the time, which lifts the bird into the top of
    # the first pipe within a second, and such episodes teach little: the greedy policy's own
    # mistakes explore better.
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

    @property
    def num_iterations(self) -> int:
        """Vector steps: each one advances every env by one step."""
        return max(1, self.total_timesteps // self.num_envs)

    @property
    def exploration_steps(self) -> int:
        return max(1, int(self.exploration_fraction * self.total_timesteps))

    @property
    def stack(self) -> int:
        return self.frame_stack if self.obs_type == "pixels" else 1


def env_kwargs(env_id: str, obs_type: str) -> dict:
    """FlappyBird chooses between its state vector and its lidar scan at construction."""
    return {"use_lidar": obs_type == "lidar"} if env_id.startswith("FlappyBird") else {}


class PixelObservation(gym.ObservationWrapper):
    """Replace the observation with the rendered frame: cropped, grayscale, 84x84, uint8.

    The bottom 21% of a Flappy Bird frame is the ground, the same stripe in every frame; cropping
    it before resizing spends the 84 rows on the sky the bird flies in.
    """

    def __init__(self, env: gym.Env, size: int = 84, keep_rows: float = 0.79):
        super().__init__(env)
        self.size, self.keep_rows = size, keep_rows
        self.observation_space = gym.spaces.Box(0, 255, (size, size), np.uint8)

    def observation(self, observation):
        frame = self.env.render()
        frame = frame[: int(frame.shape[0] * self.keep_rows)]
        gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        # INTER_AREA averages the pixels it merges: thin pipe edges survive the 5x shrink.
        return cv2.resize(gray, (self.size, self.size), interpolation=cv2.INTER_AREA)


def make_env(
    args: Args, render: bool = False, video_folder: str | None = None, video_prefix: str = "rl-video"
) -> gym.Env:
    """One env: the chosen observation type, the time limit, episode statistics, maybe video of
    its first episode."""
    pixels = args.obs_type == "pixels"
    env = gym.make(
        args.env_id,
        render_mode="rgb_array" if pixels or render or video_folder else None,
        max_episode_steps=args.max_episode_steps,
        **env_kwargs(args.env_id, args.obs_type),
    )
    if video_folder:
        # Records env.render(): the game's own 512x288 frames, not the 84x84 the agent sees.
        env = gym.wrappers.RecordVideo(
            env, video_folder, name_prefix=video_prefix, disable_logger=True,
            episode_trigger=lambda episode: episode == 0,
        )  # fmt: skip
    env = gym.wrappers.RecordEpisodeStatistics(env)
    if pixels:
        env = PixelObservation(env)
        # "reset" padding repeats an episode's first frame; ReplayBuffer stacks the same way.
        env = gym.wrappers.FrameStackObservation(env, args.frame_stack, padding_type="reset")
    else:
        env = gym.wrappers.TransformObservation(
            env,
            lambda obs: np.asarray(obs, dtype=np.float32),
            gym.spaces.Box(-np.inf, np.inf, env.observation_space.shape, np.float32),
        )
    return env


def make_envs(args: Args) -> gym.vector.VectorEnv:
    """Flappy Bird has no vectorised implementation: a SyncVectorEnv steps the envs in a loop.

    It autoresets on the *next* step (gymnasium >= 1.0); `main` stores that step in the replay
    buffer only as the slot holding the final observation and never samples it as a transition.
    """
    return gym.vector.SyncVectorEnv([lambda: make_env(args) for _ in range(args.num_envs)])


class QNetwork(nn.Module):
    """Q-values of every action: the Nature CNN for stacked frames, an MLP for vectors."""

    def __init__(self, obs_shape: tuple[int, ...], num_actions: int, hidden_size: int = 256):
        super().__init__()
        self.pixels = len(obs_shape) == 3
        if self.pixels:
            self.network = nn.Sequential(
                nn.Conv2d(obs_shape[0], 32, 8, stride=4),
                nn.ReLU(),
                nn.Conv2d(32, 64, 4, stride=2),
                nn.ReLU(),
                nn.Conv2d(64, 64, 3, stride=1),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(64 * 7 * 7, 512),
                nn.ReLU(),
                nn.Linear(512, num_actions),
            )
        else:
            self.network = nn.Sequential(
                nn.Linear(obs_shape[0], hidden_size),
                nn.ReLU(),
                nn.Linear(hidden_size, hidden_size),
                nn.ReLU(),
                nn.Linear(hidden_size, num_actions),
            )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        # Frames travel as uint8 (4x less to copy) and are scaled to [0, 1] only here.
        return self.network(obs.float() / 255.0 if self.pixels else obs)


def linear_schedule(start: float, end: float, duration: int, step: int) -> float:
    """Linear from `start` at step 0 to `end` at step `duration`, then constant."""
    return start + (end - start) * min(1.0, step / duration)


def td_targets(
    rewards: torch.Tensor,
    terminated: torch.Tensor,
    next_q_target: torch.Tensor,
    next_q_online: torch.Tensor | None,
    gamma: float,
) -> torch.Tensor:
    """One-step TD targets r + gamma * (1 - terminated) * Q_target(s', a').

    a' = argmax Q_target(s') for DQN (`next_q_online` None), argmax Q_online(s') for Double DQN:
    picking and valuing the action with the same noisy estimate biases the max upwards; the
    online network picks, the target network values. `terminated` only, not truncated: a time
    limit ends the episode but not the game, so the target still bootstraps from s'.
    """
    chooser = next_q_target if next_q_online is None else next_q_online
    next_actions = chooser.argmax(dim=1, keepdim=True)
    next_values = next_q_target.gather(1, next_actions).squeeze(1)
    return rewards + gamma * (1.0 - terminated.float()) * next_values


class ReplayBuffer:
    """Uniform replay over a preallocated NumPy ring with one slot per env per vector step.

    Slot t of env e holds the newest frame of the observation the agent saw at step t, the action
    it took, and the reward and termination that followed. The observation that followed is slot
    t + 1, so every frame is stored once, as the "next" of one transition and the "current" of
    the following one; with frame stacking the k frames of an observation are read back from k
    consecutive slots. For pixels that is 1 frame per transition instead of 2 x 4 in a buffer of
    (obs, next_obs) stacks: 100k transitions of 84x84 frames take 0.7 GB, not 5.6 GB.

    Episode boundaries: with next-step autoreset, the step after an episode ends returns the reset
    observation and ignores its action. That step is stored (its frame is the final observation,
    the "next" of the episode's last transition) but flagged `final`, and sampling never starts a
    transition there, so the autoreset step never becomes training data. The slot after it is an
    episode's `first`, and stacks never reach across it: frames before an episode's first frame
    are that first frame, exactly as FrameStackObservation(padding_type="reset") stacks them.
    """

    def __init__(
        self,
        capacity: int,
        num_envs: int,
        frame_shape: tuple[int, ...],
        frame_dtype: np.dtype,
        stack: int = 1,
        seed: int = 0,
    ):
        self.capacity, self.num_envs, self.stack = capacity, num_envs, stack
        self.frames = np.zeros((capacity, num_envs, *frame_shape), dtype=frame_dtype)
        self.actions = np.zeros((capacity, num_envs), dtype=np.int64)
        self.rewards = np.zeros((capacity, num_envs), dtype=np.float32)
        self.terminated = np.zeros((capacity, num_envs), dtype=np.bool_)
        self.first = np.zeros((capacity, num_envs), dtype=np.bool_)
        self.final = np.zeros((capacity, num_envs), dtype=np.bool_)
        self.pos, self.full = 0, False
        self.next_is_first = np.ones(num_envs, dtype=np.bool_)
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        """Slots written per env (transitions stored, counting the final-observation slots)."""
        return self.capacity if self.full else self.pos

    def add(self, obs, actions, rewards, terminated, final) -> None:
        """Store one vector step: the observation acted on, its actions, rewards, terminations.

        `final[e]` says env e's observation is the last of its episode, so this step of env e is
        the autoreset step: its frame is kept, its action and reward are not a transition.
        """
        self.frames[self.pos] = obs[:, -1] if self.stack > 1 else obs
        self.actions[self.pos] = actions
        self.rewards[self.pos] = rewards
        self.terminated[self.pos] = terminated
        self.first[self.pos] = self.next_is_first
        self.final[self.pos] = final
        self.next_is_first = np.array(final, dtype=np.bool_)
        self.pos = (self.pos + 1) % self.capacity
        self.full = self.full or self.pos == 0

    def _valid(self, t: np.ndarray, e: np.ndarray) -> np.ndarray:
        """Slots that start a real transition whose frames are all still in the buffer."""
        newest = (self.pos - 1) % self.capacity
        valid = ~self.final[t, e] & (t != newest)  # the newest slot has no next observation yet
        if self.full:
            # The oldest stack - 1 slots would stack frames that were overwritten by the newest.
            valid &= (t - self.pos) % self.capacity >= self.stack - 1
        return valid

    def _stacked(self, t: np.ndarray, e: np.ndarray) -> np.ndarray:
        """The observation at slots (t, e): its newest frame and the stack - 1 before it."""
        if self.stack == 1:
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
        next_t = (t + 1) % self.capacity
        return (
            self._stacked(t, e),
            self.actions[t, e],
            self.rewards[t, e],
            self.terminated[t, e],
            self._stacked(next_t, e),
        )


def dqn_update(q_network, target_network, optimizer, rb: ReplayBuffer, args: Args, device) -> dict:
    """One gradient step of the Huber TD loss on a uniform minibatch from the replay buffer."""
    obs, actions, rewards, terminated, next_obs = (
        torch.as_tensor(x, device=device) for x in rb.sample(args.batch_size)
    )
    with torch.no_grad():
        next_q_online = q_network(next_obs) if args.double_dqn else None
        targets = td_targets(rewards, terminated, target_network(next_obs), next_q_online, args.gamma)
    q_values = q_network(obs).gather(1, actions.unsqueeze(1)).squeeze(1)
    # Huber: quadratic for small TD errors, linear for large ones, so a single surprising
    # transition cannot produce a gradient that wrecks the network.
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
    for target_param, param in zip(target_network.parameters(), q_network.parameters(), strict=True):
        target_param.lerp_(param, tau)


def main(args: Args) -> None:
    validate(args)
    if args.eval_checkpoint:
        evaluate_checkpoint(args)
        return
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    # The best network of the periodic greedy evaluations: the agent the run delivers.
    if checkpoint is not None:
        check_settings(args, checkpoint["args"], RESUME_MAY_CHANGE)
        run_name, global_step = checkpoint["run_name"], checkpoint["global_step"]
        best = resumed_best(checkpoint["best"], args, args.resume)
    else:
        run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
        global_step = 0
        best = fresh_best(args)
    # A resumed run reseeds with an offset so it does not replay the random stream of its start.
    seed = args.seed + global_step // args.num_envs
    seed_everything(seed, args.torch_deterministic)
    device = pick_device(args.cuda, args.torch_threads)
    q_network = build_q_network(args, device)
    target_network = build_q_network(args, device)
    target_network.load_state_dict(q_network.state_dict())
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate)
    if checkpoint is not None:
        restore(args.resume, checkpoint, model=q_network, target_model=target_network, optimizer=optimizer)
    run = Run(args, run_name, total_steps=args.num_iterations * args.num_envs, global_step=global_step)
    envs = make_envs(args)  # (after Run: SDL, which renders pixels, must find the signal handlers set)

    def training_state() -> dict:
        # Neither the replay buffer (0.7 GB of frames for pixels: a resumed run refills
        # --learning-starts transitions with the restored policy before it updates again) nor
        # epsilon (a function of global_step and the args) is saved.
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

    frame_shape = (84, 84) if args.obs_type == "pixels" else envs.single_observation_space.shape
    frame_dtype = np.uint8 if args.obs_type == "pixels" else np.float32
    rb = ReplayBuffer(
        args.buffer_size // args.num_envs, args.num_envs, frame_shape, frame_dtype, args.stack, seed
    )
    rng = np.random.default_rng(seed)
    num_actions = int(envs.single_action_space.n)
    obs, _ = envs.reset(seed=seed)
    # True where the env's observation is the last of its episode: its next step is the autoreset.
    final = np.zeros(args.num_envs, dtype=np.bool_)
    stats = {}
    for iteration in range(global_step // args.num_envs + 1, args.num_iterations + 1):
        # Act epsilon-greedily in every env and store the step.
        epsilon = linear_schedule(args.start_epsilon, args.end_epsilon, args.exploration_steps, global_step)
        previous_step, global_step = global_step, global_step + args.num_envs
        explore = rng.random(args.num_envs) < epsilon
        actions = rng.integers(0, num_actions, args.num_envs)
        if not explore.all():  # early on every action is random: skip the forward pass
            with torch.inference_mode():
                greedy = q_network(torch.as_tensor(obs, device=device)).argmax(dim=1).cpu().numpy()
            actions = np.where(explore, actions, greedy)
        next_obs, rewards, terminated, truncated, infos = envs.step(actions)
        rb.add(obs, actions, rewards, terminated, final)
        final = terminated | truncated
        obs = next_obs
        log_episodes(run, infos, global_step)

        # Learn from replayed transitions: one gradient step per --train-frequency env steps, and
        # move the target network every --target-network-frequency env steps.
        if len(rb) > 1 and len(rb) * args.num_envs >= args.learning_starts:
            for _ in range(global_step // args.train_frequency - previous_step // args.train_frequency):
                stats = dqn_update(q_network, target_network, optimizer, rb, args, device)
                run.stop_if_not_finite(stats["finite"], training_state, global_step)
            if crossed(args.target_network_frequency, global_step, previous_step):
                update_target(target_network, q_network, args.tau)

        # Keep the best greedy network, judged on episodes of its own.
        if crossed(args.eval_freq, global_step, previous_step) or iteration == args.num_iterations:
            keep_if_best(best, q_network, args, global_step, device, run)

        if crossed(args.log_interval, global_step, previous_step) or iteration == args.num_iterations:
            losses = {f"losses/{key}": stats[key] for key in ("td_loss", "q_values") if key in stats}
            run.log(
                {"charts/epsilon": epsilon, "charts/learning_rate": args.learning_rate, **losses}, global_step
            )
            run.advance(global_step)
        run.checkpoint(training_state, global_step, previous_step)
        if run.stop.requested:
            break
    envs.close()
    run.end_training(training_state(), global_step)

    # The final evaluation, on episodes no periodic evaluation played: the delivered (best)
    # network, and the last one beside it, so that what keeping the best bought is in plain view.
    video_folder = f"videos/{run_name}/eval" if args.capture_video else None
    eval_seed = args.seed + EVAL_SEED_OFFSET
    last_returns, last_scores = evaluate(q_network, args, args.eval_episodes, eval_seed, device)
    load_delivered(q_network, best)
    returns, scores = evaluate(q_network, args, args.eval_episodes, eval_seed, device, video_folder)
    for prefix, (episode_returns, episode_scores) in (
        ("eval", (returns, scores)),
        ("eval/last_network", (last_returns, last_scores)),
    ):
        for episode, (episode_return, score) in enumerate(zip(episode_returns, episode_scores, strict=True)):
            run.log({f"{prefix}/episodic_return": episode_return}, episode)
            if not np.isnan(score):
                run.log({f"{prefix}/episodic_score": score}, episode)
    delivered = f"best network (step {best['step']})" if best["model"] is not None else "last network"
    result = f"{delivered}: {describe_eval(returns, scores)}; last network: {describe_eval(last_returns, last_scores)}"
    run.finish(global_step, result)


# ----------------------------------------------------------------------------------------------
# Plumbing: validation, evaluation of a checkpoint, checkpoint files, logging and stop signals.
# A first reading can stop here: nothing below changes what the algorithm computes.
# ----------------------------------------------------------------------------------------------

# Copied from ppo_cartpole.py: EVAL_SEED_OFFSET
EVAL_SEED_OFFSET = 10_000  # evaluation envs get seed + this: episodes that training never saw
# Periodic evaluations play seed + this + the step: never the final evaluation's episodes.
PERIODIC_EVAL_SEED_OFFSET = 20_000


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
        "max_episode_steps",
        "num_envs",
        "buffer_size",
        "batch_size",
        "target_network_frequency",
        "train_frequency",
        "eval_episodes",
        "frame_stack",
        "torch_threads",
    ):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("checkpoint_freq", "learning_starts", "log_interval", "eval_freq"):
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("learning_rate", "max_grad_norm", "hidden_size"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("gamma", "start_epsilon", "end_epsilon"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            fail(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    for name in ("tau", "exploration_fraction"):
        if not 0.0 < getattr(args, name) <= 1.0:
            fail(f"--{name.replace('_', '-')} must be in (0, 1], got {getattr(args, name)}")
    if args.buffer_size < args.batch_size:
        fail(f"--buffer-size {args.buffer_size} is smaller than --batch-size {args.batch_size}")
    if args.buffer_size // args.num_envs <= args.stack + 1:
        fail(
            f"--buffer-size {args.buffer_size} leaves {args.buffer_size // args.num_envs} slots"
            f" per env; it needs more than frame_stack + 1 = {args.stack + 1}"
        )
    if args.resume and args.eval_checkpoint:
        fail("give either --resume or --eval-checkpoint, not both")
    check_env(args.env_id, args.obs_type)


def check_env(env_id: str, obs_type: str) -> None:
    """Fail with suggestions for an unknown id, and with an explanation for unusable spaces."""
    if env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, list(gym.registry), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        fail(f"unknown environment id {env_id!r}{hint}")
    if obs_type == "lidar" and not env_id.startswith("FlappyBird"):
        fail(f"--obs-type lidar needs a FlappyBird environment, not {env_id}; use --obs-type features")
    env = gym.make(env_id, **env_kwargs(env_id, obs_type))
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


def older_checkpoint(path: str) -> dict | None:
    """The checkpoint at `path` if it is of one of EVALUATED_KINDS, else None: then
    load_checkpoint reads it, or refuses it in one line that says what is wrong."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # missing, truncated, not a checkpoint: load_checkpoint says which
        return None
    kind = checkpoint.get("kind") if isinstance(checkpoint, dict) else None
    if isinstance(kind, str) and kind in EVALUATED_KINDS and "args" in checkpoint:
        return checkpoint
    return None


def parse_command_line(argv: list[str] | None = None) -> Args:
    """parse_args, after a look at a checkpoint of an older kind, which parse_args refuses (it
    reads this kind only): --eval-checkpoint of it takes its saved settings as parse_args does,
    --resume of it fails in one line that says why."""
    given = tyro.cli(Args, args=argv)
    path = given.resume or given.eval_checkpoint
    older = older_checkpoint(path) if path else None
    if older is None:
        return parse_args(argv)
    if given.resume:
        fail(
            f"{path} is a {older['kind']} checkpoint, which cannot be resumed: "
            f"{EVALUATED_KINDS[older['kind']]}; evaluate it with --eval-checkpoint"
        )
    known = {field.name for field in fields(Args)}
    defaults = Args(**{name: value for name, value in older["args"].items() if name in known})
    defaults.resume = defaults.eval_checkpoint = None
    return tyro.cli(Args, args=argv, default=defaults)


# What an explicit flag may change when resuming: the budget, logging, tracking, where it runs.
RESUME_MAY_CHANGE = {
    "total_timesteps",
    "resume",
    "eval_checkpoint",
    "eval_episodes",
    "cuda",
    "torch_threads",
    "track",
    "wandb_project_name",
    "wandb_entity",
    "wandb_group",
    "capture_video",
    "save_model",
    "checkpoint_freq",
    "log_interval",
    "eval_freq",
}
# What shapes the environment or the network: --eval-checkpoint may not change these.
MODEL_SETTINGS = {"env_id", "obs_type", "hidden_size", "frame_stack", "max_episode_steps"}


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


def build_q_network(args: Args, device: torch.device) -> QNetwork:
    """The network for this env and observation type (shapes read from a throwaway env)."""
    env = gym.make(args.env_id, **env_kwargs(args.env_id, args.obs_type))
    num_actions = int(env.action_space.n)
    obs_shape = (args.frame_stack, 84, 84) if args.obs_type == "pixels" else env.observation_space.shape
    env.close()
    return QNetwork(tuple(obs_shape), num_actions, args.hidden_size).to(device)


def restore(path: str, checkpoint: dict, **states) -> None:
    """Load each saved state dict (`model=q_network`, ...) into its object; fail with one line."""
    try:
        for key, target in states.items():
            target.load_state_dict(checkpoint[key])
    except (RuntimeError, ValueError, KeyError) as error:
        fail(f"{path} does not hold a usable network and optimizer ({str(error).splitlines()[0]})")


def log_episodes(run: Run, infos: dict, global_step: int) -> None:
    """Log the training episodes that ended at this step, with Flappy Bird's pipes passed."""
    for env_index in np.flatnonzero(infos.get("_episode", [])):
        run.log_episode(
            float(infos["episode"]["r"][env_index]), int(infos["episode"]["l"][env_index]), global_step
        )
        if "score" in infos:
            run.log({"charts/episodic_score": int(infos["score"][env_index])}, global_step)


@torch.inference_mode()
def evaluate(
    q_network: QNetwork,
    args: Args,
    episodes: int,
    seed: int,
    device: torch.device,
    video_folder: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Play one greedy episode in each of `episodes` envs at once (env i seeded seed + i); return
    their returns and scores. One batched forward pass per step keeps the periodic evaluations
    cheap. The score is the game's own count of pipes passed (`info["score"]`), NaN without one.
    """

    def make_evaluation_env(index: int) -> Callable[[], gym.Env]:
        def thunk() -> gym.Env:
            if video_folder is None:
                return make_env(args)
            # The recorders after the first find the folder the first one made: their warning
            # about overwriting it would be about their siblings.
            with warnings.catch_warnings():
                if index > 0:
                    warnings.filterwarnings("ignore", message=".*Overwriting existing videos")
                return make_env(args, video_folder=video_folder, video_prefix=f"env-{index}")

        return thunk

    envs = gym.vector.SyncVectorEnv([make_evaluation_env(index) for index in range(episodes)])
    obs, _ = envs.reset(seed=seed)
    returns, scores = np.zeros(episodes), np.full(episodes, np.nan)
    playing = np.ones(episodes, dtype=bool)
    while playing.any():
        actions = q_network(torch.as_tensor(obs, device=device)).argmax(dim=1).cpu().numpy()
        obs, rewards, terminated, truncated, infos = envs.step(actions)
        returns += rewards * playing  # an env whose episode has ended plays on, uncounted
        ended = playing & (terminated | truncated)
        if "score" in infos:
            scores[ended] = infos["score"][ended]
        playing &= ~ended
    envs.close()
    return returns, scores


def keep_if_best(best: dict, q_network: QNetwork, args: Args, global_step: int, device, run: Run) -> None:
    """A periodic greedy evaluation: keep a copy of the network in `best` if it beats the best."""
    if args.eval_freq == 0:
        return
    episodes = periodic_eval_episodes(args)
    seed = episodes["seed_base"] + global_step
    returns, scores = evaluate(q_network, args, episodes["episodes"], seed, device)
    greedy = {"charts/greedy_return": returns.mean()}
    if not np.isnan(scores).any():
        greedy["charts/greedy_score"] = scores.mean()
    run.log(greedy, global_step)
    if returns.mean() > best["mean_return"]:
        model = {name: tensor.detach().clone() for name, tensor in q_network.state_dict().items()}
        best.update(mean_return=float(returns.mean()), step=global_step, model=model)


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


def resumed_best(saved_best: dict, args: Args, path: str) -> dict:
    """The best network a resumed run goes on from: the checkpoint's when this run's periodic
    evaluations play the episodes it was scored on, else a fresh start, said in a note on stderr.
    --eval-freq 0 promises the last network, so it drops the saved best too."""
    best = fresh_best(args)
    if saved_best["model"] is None:
        return best
    saved = f"the best network of {path} (step {saved_best['step']})"
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


def load_delivered(q_network: QNetwork, best: dict) -> None:
    """The network the run delivers: the best of the periodic evaluations, if there were any."""
    if best["model"] is not None:
        q_network.load_state_dict(best["model"])


def describe_eval(returns: np.ndarray, scores: np.ndarray) -> str:
    """`eval return <mean> ± <std> over <n> episodes`, plus the pipes passed where the game counts."""
    text = f"eval return {returns.mean():.2f} ± {returns.std():.2f} over {len(returns)} episodes"
    if not np.isnan(scores).any():
        text += f", pipes {scores.mean():.1f} ± {scores.std():.1f}"
    return text


def evaluate_checkpoint(args: Args) -> None:
    """--eval-checkpoint: rebuild the network from the saved args and run the greedy policy with
    the seed of the end-of-training evaluation, so that both print the same figures."""
    # A checkpoint of an older kind evaluates too: its networks are saved as they are today.
    checkpoint = older_checkpoint(args.eval_checkpoint) or load_checkpoint(args.eval_checkpoint)
    check_settings(args, checkpoint["args"], may_change=set(checkpoint["args"]) - MODEL_SETTINGS)
    device = pick_device(args.cuda, args.torch_threads)
    q_network = build_q_network(args, device)
    restore(args.eval_checkpoint, checkpoint, model=q_network)
    load_delivered(q_network, checkpoint["best"])  # the network the run delivers
    video_folder = f"videos/{checkpoint['run_name']}/eval-checkpoint" if args.capture_video else None
    returns, scores = evaluate(
        q_network, args, args.eval_episodes, args.seed + EVAL_SEED_OFFSET, device, video_folder
    )
    delivered = (
        f"best network (step {checkpoint['best']['step']})"
        if checkpoint["best"]["model"] is not None
        else "last network"
    )
    print(f"{delivered}: {describe_eval(returns, scores)}; checkpoint {args.eval_checkpoint}")


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
    main(parse_command_line())
    # Spare the interpreter's exit a garbage collection over the ~170k objects torch created at
    # import (~0.4 s): the process ends, and the OS frees its memory all at once.
    gc.freeze()
