"""Tabular Q-learning on a discretised, vectorised CartPole-v1, in NumPy alone.

Cuts each observation dimension into a few bins between clipping bounds (flags), keeps one
Q-value per (cell, action) in a NumPy table, and learns it with the one-step Q-learning update
r + gamma * max_a' Q(s', a') from many CartPole environments stepped together. Exploration is
epsilon-greedy with a linear decay; the step size decays linearly too, so that the table settles
instead of chasing the noise of a discretised, hence partly observed, state. An optional small
experience replay re-applies the update to past transitions. Any gymnasium environment with a
1-D Box observation and a Discrete action space works, given one bin count and one pair of bounds
per observation dimension.

Run:
    python qlearning_cartpole.py                # train, evaluate, save runs/<run>/qlearning_cartpole.npz
    python qlearning_cartpole.py --eval-checkpoint runs/<run>/qlearning_cartpole.npz --capture-video
    python qlearning_cartpole.py --resume runs/<run>/qlearning_cartpole.npz   # continue a stopped run
    tensorboard --logdir runs

Expect: with the defaults and seed 1 the greedy policy balances the pole for the full 500 steps
after 2M environment steps (128 envs): evaluation return 500 ± 0 over the default 10 episodes,
and over 100 (`--eval-episodes 100`); over 100 episodes seeds 2-6 gave 481, 500, 500, 500 and
498. That is about 10 s of CPU time (15-35 s wall on a busy 2-core laptop-class CPU), at
60k-140k steps/s and 600-1,900 episodes/s.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import random
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NoReturn

import gymnasium as gym
import numpy as np
import tyro
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.text.summary_v2 import text_pb
from tensorboard.summary.writer import event_file_writer
from tqdm import tqdm

# Checkpoints say what they hold by this kind, not by the file name, so that a renamed copy of
# this script still loads its own checkpoints.
CHECKPOINT_KIND = "q-table/1"
# A bigger table would not fit in memory, and could never be filled with experience anyway.
MAX_TABLE_CELLS = 50_000_000


@dataclass
class Args:
    exp_name: str = Path(__file__).stem
    """name of this experiment (part of the run name and of the checkpoint file name)"""
    seed: int = 1
    """seed of random, NumPy and the environments"""
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
    """save the checkpoint runs/<run_name>/<exp_name>.npz (at the end, periodically, on Ctrl-C)"""
    checkpoint_freq: int = 500_000
    """also save a checkpoint every this many environment steps, each kept in
    runs/<run_name>/checkpoints/ with the trained agent at the end (0: none of them)"""
    log_interval: int = 10_000
    """write the learning rate, epsilon, SPS and TD statistics every this many environment steps"""
    resume: str | None = None
    """path of a checkpoint to continue training from, with its settings"""
    eval_checkpoint: str | None = None
    """path of a checkpoint to evaluate for --eval-episodes episodes, then exit"""
    eval_episodes: int = 10
    """episodes of the final greedy evaluation (and of --eval-checkpoint)"""

    env_id: str = "CartPole-v1"
    """a gymnasium environment with a 1-D Box observation and a Discrete action space"""
    total_timesteps: int = 2_000_000
    """environment steps to train for (summed over the vectorised envs)"""
    num_envs: int = 128
    """environments stepped together (one NumPy call costs about the same for 1 or 128 envs)"""
    bins: tuple[int, ...] = (3, 3, 8, 10)
    """bins per observation dimension (CartPole: cart position and velocity, pole angle and rate)"""
    obs_low: tuple[float, ...] = (-2.4, -1.5, -0.21, -1.5)
    """lower clipping bound per observation dimension: anything below falls in the first bin"""
    obs_high: tuple[float, ...] = (2.4, 1.5, 0.21, 1.5)
    """upper clipping bound per observation dimension: anything above falls in the last bin"""
    learning_rate: float = 0.5
    """step size alpha of the Q update at the start (decayed linearly to --end-learning-rate)"""
    end_learning_rate: float = 0.01
    """step size alpha at the end of training"""
    gamma: float = 0.99
    """discount factor"""
    start_epsilon: float = 1.0
    """probability of a random action at the start"""
    end_epsilon: float = 0.0
    """probability of a random action after the exploration phase"""
    exploration_fraction: float = 0.5
    """fraction of --total-timesteps over which epsilon decays linearly from start to end"""
    replay_size: int = 0
    """capacity of an optional experience replay of past transitions (0 disables it)"""
    replay_batch_size: int = 128
    """transitions drawn from the replay and updated again after every vector step"""

    @property
    def num_iterations(self) -> int:
        return max(1, self.total_timesteps // self.num_envs)

    @property
    def num_states(self) -> int:
        return int(np.prod(self.bins))


def make_envs(env_id: str, num_envs: int) -> gym.vector.VectorEnv:
    """Vectorised envs with episode statistics, through the fastest implementation available.

    CartPole has a pure-NumPy vector implementation (`vector_entry_point`) whose step costs about
    the same for 1 or 128 envs, so many envs give many transitions per Python-level step; other
    envs are stepped in a loop. Either way the env autoresets on the *next* step (gymnasium >=
    1.0), which `main` masks out of the updates.
    """
    mode = "vector_entry_point" if gym.spec(env_id).vector_entry_point else "sync"
    envs = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode=mode)
    return gym.wrappers.vector.RecordEpisodeStatistics(envs)


# --- the Q-table -----------------------------------------------------------------------------


def discretize(obs: np.ndarray, low: np.ndarray, high: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Map (N, D) observations to N flat cell indices of a table with `bins[d]` cells in dimension d.

    Dimension d is cut into `bins[d]` equal-width bins between `low[d]` and `high[d]`; a value on
    an inner edge belongs to the bin above it. Values outside [low, high] are clipped into the
    first or last bin however far out they are (CartPole leaves its velocities unbounded, and a
    coarse table cannot afford bins for rare extremes). The per-dimension indices are flattened
    in C order: cell = ((i0 * bins[1] + i1) * bins[2] + i2) * ...
    """
    scaled = np.clip((obs - low) / (high - low) * bins, 0, bins - 1)
    return np.ravel_multi_index(np.floor(scaled).astype(np.int64).T, bins)


def discretisation(obs_low, obs_high, bins) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The bounds and bin counts as arrays, as `discretize` takes them."""
    return np.array(obs_low, dtype=np.float64), np.array(obs_high, dtype=np.float64), np.array(bins)


def linear_schedule(start: float, end: float, duration: float, t: float) -> float:
    """`start` at t = 0, moving linearly to `end` at t = duration, then staying at `end`."""
    if duration <= 0:
        return end
    return start + (end - start) * min(1.0, t / duration)


def epsilon_greedy(q_values: np.ndarray, epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """For (N, A) action values: the greedy action, replaced by a uniform one with probability epsilon."""
    greedy = q_values.argmax(axis=1)
    explore = rng.random(len(q_values)) < epsilon
    return np.where(explore, rng.integers(0, q_values.shape[1], len(q_values)), greedy)


def q_learning_update(
    q_table: np.ndarray,
    states: np.ndarray,
    actions: np.ndarray,
    rewards: np.ndarray,
    next_states: np.ndarray,
    terminated: np.ndarray,
    learning_rate: float,
    gamma: float,
) -> np.ndarray:
    """Apply one Q-learning update to `q_table` (in place) from a batch of transitions.

    target = r + gamma * max_a' Q(s', a'), without the second term where the episode
    *terminated*: nothing follows a terminal state. A *truncated* episode (time limit) is not
    terminal, and its caller passes the final observation as s', so it is bootstrapped from.
    All targets are computed from the table before the update. Several transitions of one batch
    can hit the same (s, a) cell (many envs pass through the upright state at once); summing
    their updates would multiply the step size, so a cell hit k times moves towards the mean of
    its targets by 1 - (1 - alpha)^k, which is exactly what k updates in a row would do if their
    targets agreed. Returns the TD errors target - Q(s, a) of the transitions.
    """
    bootstrap = np.where(terminated, 0.0, q_table[next_states].max(axis=1))
    targets = rewards + gamma * bootstrap
    td_errors = targets - q_table[states, actions]
    cells = states * q_table.shape[1] + actions
    unique_cells, which, counts = np.unique(cells, return_inverse=True, return_counts=True)
    mean_targets = np.bincount(which, weights=targets) / counts
    flat = q_table.reshape(-1)  # a view: writing it writes the table
    step = 1.0 - (1.0 - learning_rate) ** counts
    flat[unique_cells] += step * (mean_targets - flat[unique_cells])
    return td_errors


def new_replay(size: int) -> dict[str, np.ndarray]:
    """An empty ring buffer of `size` discretised transitions, with its write position and fill."""
    return {
        "states": np.zeros(size, dtype=np.int64),
        "actions": np.zeros(size, dtype=np.int64),
        "rewards": np.zeros(size),
        "next_states": np.zeros(size, dtype=np.int64),
        "terminated": np.zeros(size, dtype=bool),
        "position": np.array(0),
        "count": np.array(0),
    }


def replay_update(q_table, replay, batch, args, learning_rate, rng) -> np.ndarray:
    """Store the new transitions in the replay ring buffer, then update a uniform sample of it."""
    keys = ("states", "actions", "rewards", "next_states", "terminated")
    size, position = args.replay_size, int(replay["position"])
    slots = (position + np.arange(len(batch[0]))) % size  # validate() keeps size >= num_envs
    for key, values in zip(keys, batch, strict=True):
        replay[key][slots] = values
    replay["position"] = np.array((position + len(batch[0])) % size)
    replay["count"] = np.array(min(size, int(replay["count"]) + len(batch[0])))
    sample = rng.integers(0, int(replay["count"]), args.replay_batch_size)
    replayed = [replay[key][sample] for key in keys]
    return q_learning_update(q_table, *replayed, learning_rate, args.gamma)


def update(q_table, replay, batch, args, learning_rate, rng) -> tuple[np.ndarray, np.ndarray]:
    """One vector step's learning: the Q-learning update on the new transitions `batch`, then,
    with a replay, on a sample of past ones. Returns the TD errors of every transition updated
    and the values Q(s, a) of the new transitions right after their update."""
    td_errors = q_learning_update(q_table, *batch, learning_rate, args.gamma)
    q_values = q_table[batch[0], batch[1]]  # a copy: the replay's update does not change it
    if args.replay_size:
        td_errors = np.concatenate(
            [td_errors, replay_update(q_table, replay, batch, args, learning_rate, rng)]
        )
    return td_errors, q_values


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
    run = Run(args, run_name, total_steps=args.num_iterations * args.num_envs, global_step=global_step)
    # A resumed run reseeds with an offset, so that it does not replay the random stream of its start.
    seed = args.seed + global_step // args.num_envs
    rng = seed_everything(seed)
    envs = make_envs(args.env_id, args.num_envs)
    low, high, bins = discretisation(args.obs_low, args.obs_high, args.bins)
    # Zeros are a fair start for CartPole's +1 rewards: every tried action looks better than an
    # untried one, and epsilon-greedy exploration, not optimism, visits the rest.
    q_table = np.zeros((args.num_states, int(envs.single_action_space.n)))
    replay = new_replay(args.replay_size)
    if checkpoint is not None:
        q_table, replay = restore(checkpoint, q_table, replay)

    def training_state() -> dict:
        return {
            "kind": CHECKPOINT_KIND,
            "env_id": args.env_id,
            "run_name": run_name,
            "args": asdict(args),
            "global_step": global_step,
            "q_table": q_table,
            "replay": replay,
        }

    obs, _ = envs.reset(seed=seed)
    states = discretize(obs, low, high, bins)
    # True where the env's previous step ended an episode: its next step is the autoreset step.
    next_is_autoreset = np.zeros(args.num_envs, dtype=bool)
    td_squares, td_count, q_sum, q_count = 0.0, 0, 0.0, 0
    exploration_steps = args.exploration_fraction * args.total_timesteps
    for iteration in range(global_step // args.num_envs + 1, args.num_iterations + 1):
        epsilon = linear_schedule(args.start_epsilon, args.end_epsilon, exploration_steps, global_step)
        alpha = linear_schedule(args.learning_rate, args.end_learning_rate, args.total_timesteps, global_step)
        previous_step, global_step = global_step, global_step + args.num_envs

        actions = epsilon_greedy(q_table[states], epsilon, rng)
        obs, rewards, terminated, truncated, infos = envs.step(actions)
        next_states = discretize(obs, low, high, bins)
        # Gymnasium >= 1.0 autoresets on the step *after* an episode ends: that step ignores the
        # action and returns the reset observation with reward 0. It is not a transition, so it
        # is left out of the update. The step that ends an episode does return the episode's
        # final observation, so a truncated episode is bootstrapped from its real last state.
        valid = ~next_is_autoreset
        batch = (states[valid], actions[valid], rewards[valid], next_states[valid], terminated[valid])
        td_errors, q_values = update(q_table, replay, batch, args, alpha, rng)
        next_is_autoreset, states = terminated | truncated, next_states
        td_squares, td_count = td_squares + float(np.square(td_errors).sum()), td_count + len(td_errors)
        q_sum, q_count = q_sum + float(q_values.sum()), q_count + len(q_values)

        if "episode" in infos:
            ended = infos["_episode"]
            run.log_episodes(infos["episode"]["r"][ended], infos["episode"]["l"][ended], global_step)
        run.stop_if_not_finite(bool(np.isfinite(td_squares)), training_state, global_step)
        if crossed(args.log_interval, global_step, previous_step) or iteration == args.num_iterations:
            td_loss, mean_q = td_squares / max(td_count, 1), q_sum / max(q_count, 1)
            run.log({"charts/learning_rate": alpha, "charts/epsilon": epsilon}, global_step)
            run.log({"losses/td_loss": td_loss, "losses/q_values": mean_q}, global_step)
            run.advance(global_step)
            td_squares, td_count, q_sum, q_count = 0.0, 0, 0.0, 0
        run.checkpoint(training_state, global_step, previous_step)
        if run.stop.requested:
            break
    envs.close()
    run.end_training(training_state(), global_step)  # exits 130/143 after a stop signal
    episodes_per_second = run.episodes / max(time.time() - run.start_time, 1e-6)

    video_folder = f"videos/{run_name}/eval" if args.capture_video else None
    returns = evaluate(
        q_table, low, high, bins, args.env_id, args.eval_episodes, args.seed + EVAL_SEED_OFFSET, video_folder
    )
    for episode, episode_return in enumerate(returns):
        run.log({"eval/episodic_return": episode_return}, episode)
    run.finish(
        global_step,
        f"eval return {returns.mean():.2f} ± {returns.std():.2f} over {len(returns)} episodes "
        f"({episodes_per_second:.0f} episodes/s in training)",
    )


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
    for name in ("total_timesteps", "num_envs", "eval_episodes", "replay_batch_size", "log_interval"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("checkpoint_freq", "replay_size"):
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("learning_rate", "end_learning_rate"):
        if not 0.0 < getattr(args, name) <= 1.0:
            fail(f"--{name.replace('_', '-')} must be in (0, 1], got {getattr(args, name)}")
    for name in ("gamma", "start_epsilon", "end_epsilon", "exploration_fraction"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            fail(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if 0 < args.replay_size < args.num_envs:
        fail(
            f"--replay-size {args.replay_size} cannot hold one step of {args.num_envs} envs; "
            f"use 0 (no replay) or at least --num-envs"
        )
    if args.resume and args.eval_checkpoint:
        fail("give either --resume or --eval-checkpoint, not both")
    observation_dims, num_actions = check_env(args.env_id)
    if args.resume or args.eval_checkpoint:
        return  # the discretisation is the checkpoint's, and check_settings refuses other values
    if not len(args.bins) == len(args.obs_low) == len(args.obs_high):
        fail(
            f"--bins, --obs-low and --obs-high need one value per observation dimension; got "
            f"{len(args.bins)}, {len(args.obs_low)} and {len(args.obs_high)} values"
        )
    if len(args.bins) != observation_dims:
        fail(
            f"{args.env_id} observations have {observation_dims} dimensions but --bins gives "
            f"{len(args.bins)}; pass --bins, --obs-low and --obs-high with {observation_dims} values each"
        )
    if min(args.bins) < 1:
        fail(f"--bins must all be positive, got {' '.join(map(str, args.bins))}")
    for dim, (low, high) in enumerate(zip(args.obs_low, args.obs_high, strict=True)):
        if not (np.isfinite(low) and np.isfinite(high) and low < high):
            fail(f"dimension {dim}: --obs-low {low} must be finite and below --obs-high {high}")
    cells = args.num_states * num_actions
    if cells > MAX_TABLE_CELLS:
        fail(f"a Q-table of {cells:,} cells is too large (at most {MAX_TABLE_CELLS:,}); use fewer --bins")


def check_env(env_id: str) -> tuple[int, int]:
    """Fail with suggestions for an unknown id or unusable spaces; return (obs size, actions)."""
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
    return observation_space.shape[0], int(action_space.n)


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


# Flags that may differ between a run and its resumption; every other setting must match the
# checkpoint's, or the resumed run would silently be a different experiment.
RESUME_MAY_CHANGE = {
    "total_timesteps", "resume", "eval_checkpoint", "eval_episodes", "track", "wandb_project_name",
    "wandb_entity", "wandb_group", "capture_video", "save_model", "checkpoint_freq", "log_interval",
}  # fmt: skip
# What shapes the env and the table: --eval-checkpoint refuses other values of these.
MODEL_SETTINGS = {"env_id", "bins", "obs_low", "obs_high"}


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


def seed_everything(seed: int) -> np.random.Generator:
    """Seed `random` and NumPy's global stream; return the generator the training loop draws from."""
    random.seed(seed)
    np.random.seed(seed)
    return np.random.default_rng(seed)


def restore(checkpoint: dict, q_table: np.ndarray, replay: dict) -> tuple[np.ndarray, dict]:
    """The checkpoint's table and replay, once their shapes are checked against the fresh ones."""
    saved_table, saved_replay = checkpoint["q_table"], checkpoint["replay"]
    if saved_table.shape != q_table.shape:
        fail(f"the checkpoint holds a Q-table of shape {saved_table.shape}, not {q_table.shape}")
    if any(
        key not in saved_replay or saved_replay[key].shape != value.shape for key, value in replay.items()
    ):
        fail("the checkpoint's replay does not match --replay-size; not a checkpoint of this run")
    return saved_table.astype(np.float64), {key: saved_replay[key].copy() for key in replay}


def greedy_action(q_table: np.ndarray, obs: np.ndarray, low, high, bins) -> int:
    """The action of highest value in the cell of ONE observation (ties: the first action)."""
    return int(q_table[discretize(obs[None], low, high, bins)[0]].argmax())


def evaluate(
    q_table: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    bins: np.ndarray,
    env_id: str,
    episodes: int,
    seed: int,
    video_folder: str | None = None,
) -> np.ndarray:
    """Run the greedy policy for `episodes` full episodes; return their undiscounted returns."""
    env = gym.make(env_id, render_mode="rgb_array" if video_folder else None)
    if video_folder:
        env = gym.wrappers.RecordVideo(env, video_folder, episode_trigger=lambda _: True, disable_logger=True)
    returns = []
    for episode in range(episodes):
        # Seed the first reset only: later episodes continue the env's random stream.
        obs, _ = env.reset(seed=seed if episode == 0 else None)
        episode_return, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(greedy_action(q_table, obs, low, high, bins))
            episode_return += float(reward)
            done = terminated or truncated
        returns.append(episode_return)
    env.close()
    return np.array(returns)


def evaluate_checkpoint(args: Args) -> None:
    """--eval-checkpoint: the greedy policy of the saved table, on the same evaluation episodes
    as the end of its training run (same seed rule), so both print the same figures."""
    checkpoint = load_checkpoint(args.eval_checkpoint)
    check_settings(args, checkpoint["args"], may_change=set(checkpoint["args"]) - MODEL_SETTINGS)
    _, num_actions = check_env(args.env_id)
    q_table = checkpoint["q_table"]
    if q_table.shape != (args.num_states, num_actions):
        fail(f"{args.eval_checkpoint} holds a Q-table of shape {q_table.shape}, not one for bins {args.bins}")
    low, high, bins = discretisation(args.obs_low, args.obs_high, args.bins)
    video_folder = f"videos/{checkpoint['run_name']}/eval-checkpoint" if args.capture_video else None
    returns = evaluate(
        q_table, low, high, bins, args.env_id, args.eval_episodes, args.seed + EVAL_SEED_OFFSET, video_folder
    )
    print(
        f"eval return {returns.mean():.2f} ± {returns.std():.2f} over {len(returns)} episodes"
        f" ({args.eval_checkpoint})"
    )


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact.

    Only arrays, numbers and strings go in (the args as JSON text, the replay's arrays as
    replay_<name>), so that loading needs no pickle: `np.load(..., allow_pickle=False)` cannot
    run code hidden in a file.
    """
    arrays = {key: value for key, value in state.items() if key not in ("args", "replay")}
    arrays["args"] = json.dumps(state["args"])
    arrays.update({f"replay_{key}": value for key, value in state.get("replay", {}).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        np.savez(file, **arrays)
    os.replace(temporary, path)


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint of this script's kind; anything else fails with one line."""
    if not Path(path).is_file():
        fail(f"checkpoint {path} does not exist")
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            fail(f"{path} is not a checkpoint of this project")
        with archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as error:  # OSError, ValueError, zipfile.BadZipFile... from a damaged file
        fail(f"{path} is not a readable checkpoint ({type(error).__name__}); it may be truncated")
    if "kind" not in arrays or "args" not in arrays:
        fail(f"{path} is not a checkpoint of this project")
    if str(arrays["kind"]) != CHECKPOINT_KIND:
        fail(f"{path} holds a {arrays['kind']} checkpoint; this script trains {CHECKPOINT_KIND}")
    try:
        # JSON has no tuples: the tuple-valued args (bins, bounds) come back as the tuples they were.
        saved_args = {
            name: tuple(value) if isinstance(value, list) else value
            for name, value in json.loads(str(arrays["args"])).items()
        }
        checkpoint = {
            "kind": CHECKPOINT_KIND,
            "env_id": str(arrays["env_id"]),
            "run_name": str(arrays["run_name"]),
            "args": saved_args,
            "global_step": int(arrays["global_step"]),
            "q_table": arrays["q_table"],
            "replay": {key[7:]: arrays[key] for key in arrays if key.startswith("replay_")},
        }
    except (KeyError, ValueError, TypeError, AttributeError):
        fail(f"{path} is not a checkpoint of this project")
    if not set(saved_args) >= MODEL_SETTINGS:
        fail(f"{path} does not say how it discretised observations; not a checkpoint of this script")
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


class SummaryWriter:
    """What this script needs of torch's SummaryWriter, on tensorboard's own event writer.

    The event writer class is looked up when the writer is built, after `wandb.init`, so that
    W&B's `sync_tensorboard` patch of that class sees the run folder.
    """

    def __init__(self, logdir: str):
        # A long queue: episodes end by the hundred per second, and a full queue blocks the loop.
        self._writer = event_file_writer.EventFileWriter(logdir, max_queue_size=1000)

    def _add(self, summary: summary_pb2.Summary, step: int) -> None:
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.add_scalars([(tag, value)], step)

    def add_scalars(self, pairs: list[tuple[str, float]], step: int) -> None:
        """Several (tag, value) pairs at one step in ONE event: the same points in TensorBoard as
        one event each, at a fraction of the cost when hundreds of episodes end per second."""
        values = [summary_pb2.Summary.Value(tag=tag, simple_value=float(value)) for tag, value in pairs]
        self._add(summary_pb2.Summary(value=values), int(step))

    def add_text(self, tag: str, text: str, step: int = 0) -> None:
        self._add(text_pb(tag, text), step)

    def close(self) -> None:
        self._writer.close()


class Run:
    """What the training loop does besides the algorithm, behind a few calls: TensorBoard (and
    W&B) logging, the progress bar, checkpoint files and the stop flag of Ctrl-C and SIGTERM.

    The torch scripts' Run, save for an .npz checkpoint and `log_episodes`, which logs all the
    episodes that end at one step in one event (their `log_episode` takes them one at a time).
    """

    def __init__(self, args: Args, run_name: str, total_steps: int, global_step: int):
        self.args = args
        self.dir = Path("runs") / run_name
        self.checkpoint_path = self.dir / f"{args.exp_name}.npz"
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
        self.episodes = 0
        self.progress = tqdm(total=total_steps, initial=global_step, unit="step", dynamic_ncols=True)

    def log_episodes(self, returns: np.ndarray, lengths: np.ndarray, global_step: int) -> None:
        """The training episodes that ended at `global_step`, with their true returns, in ONE event:
        hundreds end per second, and one event per episode would slow the loop noticeably."""
        self.writer.add_scalars(
            [("charts/episodic_return", r) for r in returns]
            + [("charts/episodic_length", n) for n in lengths],
            global_step,
        )
        self.recent_returns.extend(returns.tolist())
        self.episodes += len(returns)

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
