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
    python dqn_flappy.py --eval-checkpoint runs/<run>/dqn_flappy.pt --capture-video
    python dqn_flappy.py --obs-type pixels --total-timesteps 2000000 --batch-size 32 \
        --learning-rate 1e-4 --target-network-frequency 1000 --train-frequency 4
    tensorboard --logdir runs

Expect (features, default args, on a 2-core CPU): 250k steps and the evaluation take about 130 s
of CPU time (~2000 steps/s). Seed 1 then passes 55.1 pipes on average over 10 greedy evaluation episodes
(2 to 206; return 260), seed 2 passes 11.8 (1 to 37). The discount matters most: with
gamma 0.99 (and the other defaults) seed 1 reached only 7.2 pipes after 150k steps, and neither a
lower learning rate (5e-4 or 2.5e-4) nor a slower or Polyak-averaged target network helped
(0 to 3.3 pipes at the end of 150k to 300k steps). DQN stays unstable on this game: the greedy score
still swings between checkpoints (seed 1: 11.7 pipes at 175k, 0 at 200k, 17.0 at 225k; seed 2:
14.5 at 125k, 1.6 at 175k, 35.2 at 200k), so evaluate the periodic checkpoints of longer runs.
Pixels: rendering and the CNN make it a GPU run (the command above is a
starting point, not a tuned setting). On this CPU a 4k-step pixels run (batch 32, one update
per 8 steps) ran at 29 steps/s and passed no pipe: far too short to learn anything.
"""

from __future__ import annotations

import difflib
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

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

SCRIPT = Path(__file__).stem


@dataclass
class Args:
    exp_name: str = SCRIPT
    """name of this experiment (part of the run name and of the checkpoint file name)"""
    seed: int = 1
    """seed of random, NumPy, torch and the environments (env i gets seed + i)"""
    torch_deterministic: bool = True
    """make cuDNN deterministic (cudnn.deterministic=True, cudnn.benchmark=False)"""
    cuda: bool = True
    """use a GPU when one is present (worth it for --obs-type pixels only)"""
    track: bool = False
    """log the run to Weights & Biases (works offline with WANDB_MODE=offline)"""
    wandb_project_name: str = "rl-scripts"
    """the W&B project"""
    wandb_entity: str | None = None
    """the W&B entity (team or user); None uses your default"""
    capture_video: bool = False
    """record the evaluation episodes (the game's own frames) as mp4 under videos/<run_name>/"""
    save_model: bool = True
    """save the checkpoint runs/<run_name>/<exp_name>.pt (at the end, periodically, on Ctrl-C)"""
    checkpoint_freq: int = 100_000
    """also save a checkpoint every this many environment steps (0 disables periodic saves)"""
    resume: str | None = None
    """path of a checkpoint to continue training from (the replay buffer refills first)"""
    eval_checkpoint: str | None = None
    """path of a checkpoint to evaluate for --eval-episodes episodes, then exit"""
    eval_episodes: int = 10
    """episodes of the final greedy evaluation (and of --eval-checkpoint)"""

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
    start_e: float = 0.1
    """epsilon (probability of a random action) at the start"""
    end_e: float = 0.001
    """epsilon at the end of the exploration phase and after it"""
    exploration_fraction: float = 0.1
    """fraction of --total-timesteps over which epsilon decays linearly from start_e to end_e"""
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


def fail(message: str) -> None:
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
    ):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("checkpoint_freq", "learning_starts"):
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("learning_rate", "max_grad_norm", "hidden_size"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("gamma", "start_e", "end_e"):
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


def env_kwargs(env_id: str, obs_type: str) -> dict:
    """FlappyBird chooses between its state vector and its lidar scan at construction."""
    return {"use_lidar": obs_type == "lidar"} if env_id.startswith("FlappyBird") else {}


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


def make_env(args: Args, render: bool = False, video_folder: str | None = None) -> gym.Env:
    """One env: the chosen observation type, the time limit, episode statistics, maybe video."""
    pixels = args.obs_type == "pixels"
    env = gym.make(
        args.env_id,
        render_mode="rgb_array" if pixels or render or video_folder else None,
        max_episode_steps=args.max_episode_steps,
        **env_kwargs(args.env_id, args.obs_type),
    )
    if video_folder:
        # Records env.render(): the game's own 512x288 frames, not the 84x84 the agent sees.
        env = gym.wrappers.RecordVideo(env, video_folder, episode_trigger=lambda _: True, disable_logger=True)
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


@torch.inference_mode()
def evaluate(
    q_network: QNetwork,
    args: Args,
    episodes: int,
    seed: int,
    device: torch.device,
    video_folder: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run the greedy policy for `episodes` episodes; return their returns and scores.

    The score is the game's own count of pipes passed (`info["score"]`); for an environment
    without one it is NaN.
    """
    env = make_env(args, video_folder=video_folder)
    returns, scores = [], []
    obs, _ = env.reset(seed=seed)
    for episode in range(episodes):
        if episode > 0:  # (no reset after the last one: RecordVideo would start an empty video)
            obs, _ = env.reset()
        episode_return, done, info = 0.0, False, {}
        while not done:
            q_values = q_network(torch.as_tensor(np.asarray(obs), device=device).unsqueeze(0))
            obs, reward, terminated, truncated, info = env.step(int(q_values.argmax()))
            episode_return += float(reward)
            done = terminated or truncated
        returns.append(episode_return)
        scores.append(float(info.get("score", np.nan)))
    env.close()
    return np.array(returns), np.array(scores)


def describe_eval(returns: np.ndarray, scores: np.ndarray) -> str:
    """`return <mean> ± <std> over <n> episodes`, plus the pipes passed where the game counts."""
    text = f"return {returns.mean():.2f} ± {returns.std():.2f} over {len(returns)} episodes"
    if not np.isnan(scores).any():
        text += f", pipes {scores.mean():.1f} ± {scores.std():.1f}"
    return text


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
    np.random.seed(seed)  # noqa: NPY002  (for any library that still draws from it)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic
    torch.backends.cudnn.benchmark = not torch_deterministic


def pick_device(want_cuda: bool) -> torch.device:
    if want_cuda and torch.cuda.is_available():
        return torch.device("cuda")
    if want_cuda:
        print("note: no CUDA device found, training on the CPU", file=sys.stderr)
    # Measured on a busy 2-core CPU, one thread against two: a 12-256-256-2 MLP acts in 0.14 ms
    # against 2.3 ms and updates in 4.7 ms against 71 ms; the Nature CNN acts for 8 envs in 31 ms
    # against 172 ms and updates on 32 samples in 0.48 s against 2.5 s. Threads only wait here.
    torch.set_num_threads(1)
    return torch.device("cpu")


def build_q_network(args: Args, device: torch.device) -> QNetwork:
    """The network for this env and observation type (shapes read from a throwaway env)."""
    env = gym.make(args.env_id, **env_kwargs(args.env_id, args.obs_type))
    num_actions = int(env.action_space.n)
    obs_shape = (args.frame_stack, 84, 84) if args.obs_type == "pixels" else env.observation_space.shape
    env.close()
    return QNetwork(tuple(obs_shape), num_actions, args.hidden_size).to(device)


def saved_args(checkpoint: dict, args: Args) -> Args:
    """These args with the network-shaping ones taken from the checkpoint."""
    saved = checkpoint["args"]
    return Args(
        **{
            **asdict(args),
            **{
                key: saved[key]
                for key in ("obs_type", "hidden_size", "frame_stack", "max_episode_steps")
                if key in saved
            },
        }
    )


def evaluate_checkpoint(args: Args) -> None:
    """--eval-checkpoint: rebuild the network from the saved args and run the greedy policy."""
    checkpoint = load_checkpoint(args.eval_checkpoint, args.env_id)
    args = saved_args(checkpoint, args)
    device = pick_device(args.cuda)
    q_network = build_q_network(args, device)
    try:
        q_network.load_state_dict(checkpoint["model"])
    except (RuntimeError, KeyError) as error:
        fail(f"{args.eval_checkpoint} does not hold a usable network ({str(error).splitlines()[0]})")
    video_folder = f"videos/{checkpoint['run_name']}/eval-checkpoint" if args.capture_video else None
    returns, scores = evaluate(q_network, args, args.eval_episodes, args.seed, device, video_folder)
    print(f"eval: {describe_eval(returns, scores)} ({args.eval_checkpoint})")


class InterruptFlag:
    """First Ctrl-C asks the loop to stop after the current step (and save); a second aborts."""

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
    device = pick_device(args.cuda)

    envs = make_envs(args)
    q_network = build_q_network(args, device)
    target_network = build_q_network(args, device)
    target_network.load_state_dict(q_network.state_dict())
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate)
    if checkpoint is not None:
        try:
            q_network.load_state_dict(checkpoint["model"])
            target_network.load_state_dict(checkpoint["target_model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            fail(f"{args.resume} does not match these args ({str(error).splitlines()[0]})")

    def training_state(iteration: int) -> dict:
        # The replay buffer is not saved (0.7 GB of frames for pixels): a resumed run refills
        # --learning-starts transitions with the restored policy before it updates again.
        return {
            "script": SCRIPT,
            "env_id": args.env_id,
            "run_name": run_name,
            "args": asdict(args),
            "global_step": global_step,
            "iteration": iteration,
            "epsilon": linear_schedule(args.start_e, args.end_e, args.exploration_steps, global_step),
            "model": q_network.state_dict(),
            "target_model": target_network.state_dict(),
            "optimizer": optimizer.state_dict(),
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

    recent_returns: list[float] = []
    stats = None
    interrupt = InterruptFlag()
    start_time = time.time()
    start_step = global_step
    log_every = 1_000
    progress = tqdm(
        total=args.num_iterations * args.num_envs,
        initial=global_step,
        unit="step",
        dynamic_ncols=True,
    )
    iteration = start_iteration - 1
    for iteration in range(start_iteration, args.num_iterations + 1):
        epsilon = linear_schedule(args.start_e, args.end_e, args.exploration_steps, global_step)
        global_step += args.num_envs
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

        if "episode" in infos:
            for env_index in np.flatnonzero(infos["_episode"]):
                episode_return = float(infos["episode"]["r"][env_index])
                writer.add_scalar("charts/episodic_return", episode_return, global_step)
                writer.add_scalar(
                    "charts/episodic_length", int(infos["episode"]["l"][env_index]), global_step
                )
                if "score" in infos:
                    writer.add_scalar("charts/episodic_score", int(infos["score"][env_index]), global_step)
                recent_returns = (recent_returns + [episode_return])[-20:]

        previous_step = global_step - args.num_envs
        if len(rb) > 1 and len(rb) * args.num_envs >= args.learning_starts:
            for _ in range(global_step // args.train_frequency - previous_step // args.train_frequency):
                stats = dqn_update(q_network, target_network, optimizer, rb, args, device)
                if not stats["finite"]:
                    nan_path = run_dir / f"{args.exp_name}_nan.pt"
                    save_checkpoint(nan_path, training_state(iteration))
                    progress.close()
                    print(
                        f"error: loss became non-finite at step {global_step}; state saved to {nan_path}",
                        file=sys.stderr,
                    )
                    sys.exit(1)
            if global_step // args.target_network_frequency != previous_step // args.target_network_frequency:
                update_target(target_network, q_network, args.tau)

        if global_step // log_every != previous_step // log_every or iteration == args.num_iterations:
            sps = int((global_step - start_step) / (time.time() - start_time))
            writer.add_scalar("charts/SPS", sps, global_step)
            writer.add_scalar("charts/epsilon", epsilon, global_step)
            writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
            if stats is not None:
                writer.add_scalar("losses/td_loss", stats["td_loss"], global_step)
                writer.add_scalar("losses/q_values", stats["q_values"], global_step)
            progress.update(global_step - progress.n)
            if recent_returns:
                progress.set_postfix(sps=sps, ret=f"{np.mean(recent_returns):.1f}", refresh=False)

        if (
            args.save_model
            and args.checkpoint_freq
            and global_step // args.checkpoint_freq != (previous_step // args.checkpoint_freq)
        ):
            save_checkpoint(checkpoint_path, training_state(iteration))
        if interrupt.requested:
            break
    progress.update(global_step - progress.n)
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
    eval_returns, eval_scores = evaluate(
        q_network, args, args.eval_episodes, args.seed + 10_000, device, video_folder
    )
    for episode, (episode_return, score) in enumerate(zip(eval_returns, eval_scores, strict=True)):
        writer.add_scalar("eval/episodic_return", episode_return, episode)
        if not np.isnan(score):
            writer.add_scalar("eval/episodic_score", score, episode)
    writer.close()
    if args.track:
        import wandb

        wandb.finish()
    elapsed = time.time() - start_time
    saved = f"; checkpoint {checkpoint_path}" if args.save_model else ""
    print(
        f"done: {global_step} steps in {elapsed:.1f}s"
        f" ({(global_step - start_step) / elapsed:.0f} steps/s); "
        f"eval {describe_eval(eval_returns, eval_scores)}{saved}"
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


if __name__ == "__main__":
    main(tyro.cli(Args))
