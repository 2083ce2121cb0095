"""Tabular Q-learning on a discretised, vectorised CartPole-v1, in NumPy alone.

Each observation dimension is cut into a few bins between clipping bounds; a NumPy table holds one
Q-value per (cell, action), learnt with the one-step update r + gamma max_a' Q(s', a') from many
envs stepped together, exploring epsilon-greedily, optionally replaying past transitions. Any
gymnasium env with a 1-D Box observation and Discrete actions works, given bins and bounds for it.

Run:
    python qlearning_cartpole.py                                            # train, evaluate, save
    python qlearning_cartpole.py --resume runs/<run>/qlearning_cartpole.npz  # continue a run
    python qlearning_cartpole.py --eval-checkpoint runs/<run>/qlearning_cartpole.npz --capture-video
    python qlearning_cartpole.py --eval-checkpoint runs/<run>/checkpoints    # the evaluation curve

Expect: the pole balanced for all 500 steps of every evaluation episode after the default 2M
steps, in seconds on a CPU; README.md has the measured results over several seeds.
"""

from __future__ import annotations

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


@dataclass
class Args:
    exp_name: str = Path(__file__).stem
    """name of this experiment (part of the run name and of the checkpoint file name)"""
    seed: int = 1
    """seed of random, NumPy and the environments (env i gets seed + i)"""
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
    total_timesteps: int = 2_000_000
    """environment steps to train for (summed over the vectorised envs)"""
    num_envs: int = 128
    """number of environments stepped together"""
    bins: tuple[int, ...] = (3, 3, 8, 10)
    """bins per observation dimension (CartPole: cart position, velocity, pole angle, its rate)"""
    obs_low: tuple[float, ...] = (-2.4, -1.5, -0.21, -1.5)
    """lower clipping bound per observation dimension: anything below is in the first bin"""
    obs_high: tuple[float, ...] = (2.4, 1.5, 0.21, 1.5)
    """upper clipping bound per observation dimension: anything above is in the last bin"""
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

    # The run around the algorithm: checkpoints, resuming, logging, evaluation.
    wandb_group: str | None = None
    """W&B group, so the seeds of one experiment plot together (default: --exp-name)"""
    save_model: bool = True
    """save the checkpoint runs/<run_name>/<exp_name>.npz (at the end, periodically, on a signal)"""
    checkpoint_freq: int = 500_000
    """also checkpoint every this many env steps, each kept in runs/<run>/checkpoints/ (0: off)"""
    log_interval: int = 10_000
    """write the learning rate, epsilon, SPS and TD statistics every this many env steps"""
    resume: str | None = None
    """path of a checkpoint to continue training from (with the checkpoint's settings)"""
    eval_checkpoint: str | None = None
    """a checkpoint to evaluate, or a folder of them to draw the evaluation curve of; then exit"""
    eval_episodes: int = 10
    """episodes of the final greedy evaluation and of --eval-checkpoint"""

    @property
    def num_iterations(self) -> int:
        return max(1, self.total_timesteps // self.num_envs)


def make_envs(env_id: str, num_envs: int) -> gym.vector.VectorEnv:
    """Vectorised envs with episode statistics (CartPole's NumPy vector env steps 128 envs about as
    fast as 1; other envs step in a loop), autoresetting on the *next* step, which `main` masks."""
    mode = "vector_entry_point" if gym.spec(env_id).vector_entry_point else "sync"
    envs = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode=mode)
    return gym.wrappers.vector.RecordEpisodeStatistics(envs)


def discretize(obs: np.ndarray, low: np.ndarray, high: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Map (N, D) observations to N flat cell indices: dimension d cut into `bins[d]` equal bins
    between `low[d]` and `high[d]` (a value on an inner edge is in the bin above it), values outside
    clipped into the first or last bin (CartPole's velocities are unbounded, and a coarse table
    cannot afford bins for rare extremes), flattened in C order: ((i0 * bins[1] + i1) * bins[2]...
    """
    scaled = np.clip((obs - low) / (high - low) * bins, 0, bins - 1)
    return np.ravel_multi_index(np.floor(scaled).astype(np.int64).T, bins)


def linear_schedule(start: float, end: float, duration: float, t: float) -> float:
    """`start` at t = 0, moving linearly to `end` at t = duration, then staying at `end`."""
    if duration <= 0:
        return end
    return start + (end - start) * min(1.0, t / duration)


def epsilon_greedy(q_values: np.ndarray, epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """For (N, A) action values: the greedy action, or with probability epsilon a uniform one."""
    greedy = q_values.argmax(axis=1)
    explore = rng.random(len(q_values)) < epsilon
    return np.where(explore, rng.integers(0, q_values.shape[1], len(q_values)), greedy)


def q_learning_update(q_table, states, actions, rewards, next_states, terminated,
                      learning_rate: float, gamma: float) -> np.ndarray:  # fmt: skip
    """One Q-learning update of `q_table`, in place, from a batch of transitions; returns their TD
    errors target - Q(s, a). target = r + gamma * max_a' Q(s', a'), without the bootstrap where the
    episode *terminated*; a *truncated* one (time limit) is bootstrapped from its final observation.
    Every target comes from the table before the update. A cell hit k times in one batch (many envs
    pass the upright state at once) moves towards the mean of its targets by 1 - (1 - alpha)^k, as
    k updates in a row would if their targets agreed: a sum would multiply the step size."""
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


def update(q_table, replay, batch, args, learning_rate, rng) -> tuple[np.ndarray, np.ndarray]:
    """One vector step's learning: the Q-learning update on the new transitions `batch`; with a
    replay, they go into its ring buffer and a uniform sample of it is updated too. Returns the TD
    errors of every transition updated and Q(s, a) of the new ones right after their update."""
    td_errors = q_learning_update(q_table, *batch, learning_rate, args.gamma)
    q_values = q_table[batch[0], batch[1]]  # a copy: the replay's update does not change it
    if not args.replay_size:
        return td_errors, q_values
    keys = ("states", "actions", "rewards", "next_states", "terminated")
    size, position = args.replay_size, int(replay["position"])
    slots = (position + np.arange(len(batch[0]))) % size  # validate() keeps size >= num_envs
    for key, values in zip(keys, batch, strict=True):
        replay[key][slots] = values
    replay["position"] = np.array((position + len(batch[0])) % size)
    replay["count"] = np.array(min(size, int(replay["count"]) + len(batch[0])))
    sample = rng.integers(0, int(replay["count"]), args.replay_batch_size)
    replayed = [replay[key][sample] for key in keys]
    replayed_td_errors = q_learning_update(q_table, *replayed, learning_rate, args.gamma)
    return np.concatenate([td_errors, replayed_td_errors]), q_values


def main(args: Args) -> None:
    validate(args)
    if args.eval_checkpoint:
        return evaluate_checkpoint(args)
    # The run's name, loggers, progress bar and stop signals; with --resume, the saved state.
    run = Run(args, total_steps=args.num_iterations * args.num_envs)
    global_step = run.start_step
    # A resumed run reseeds with an offset so it does not replay the random stream of its start.
    seed = training_seed(args.seed, global_step // args.num_envs, args.num_envs)
    rng = seed_everything(seed)
    envs = make_envs(args.env_id, args.num_envs)
    low, high, bins = np.array(args.obs_low), np.array(args.obs_high), np.array(args.bins)
    # Zeros are a fair start for CartPole's +1 rewards: every tried action looks better than an
    # untried one, and epsilon-greedy exploration, not optimism, visits the rest.
    q_table = np.zeros((int(np.prod(args.bins)), int(envs.single_action_space.n)))
    replay = new_replay(args.replay_size)
    run.restore(q_table=q_table, replay=replay)  # with --resume

    def training_state() -> dict:
        return {
            "kind": CHECKPOINT_KIND,
            "env_id": args.env_id,
            "run_name": run.name,
            "args": asdict(args),
            "global_step": global_step,
            "q_table": q_table,
            "replay": replay,
        }

    states = discretize(envs.reset(seed=seed)[0], low, high, bins)
    # True where the env's previous step ended an episode: its next step is the autoreset step.
    next_is_autoreset = np.zeros(args.num_envs, dtype=bool)
    # Sums since the last log, of which losses/td_loss and losses/q_values are the means.
    td_squares, td_count, q_sum, q_count = 0.0, 0, 0.0, 0
    training_episodes = 0  # for the summary's episodes per second
    explore_steps = args.exploration_fraction * args.total_timesteps
    for _ in range(global_step // args.num_envs, args.num_iterations):
        previous_step = global_step
        epsilon = linear_schedule(args.start_epsilon, args.end_epsilon, explore_steps, global_step)
        alpha = linear_schedule(
            args.learning_rate, args.end_learning_rate, args.total_timesteps, global_step
        )
        global_step += args.num_envs

        actions = epsilon_greedy(q_table[states], epsilon, rng)
        obs, rewards, terminated, truncated, infos = envs.step(actions)
        next_states = discretize(obs, low, high, bins)
        # Gymnasium >= 1.0 autoresets on the step *after* an episode ends: that step ignores the
        # action and returns the reset observation with reward 0. It is not a transition, so it
        # is left out of the update. The step that ends an episode does return the episode's
        # final observation, so a truncated episode is bootstrapped from its real last state.
        valid = ~next_is_autoreset
        batch = tuple(array[valid] for array in (states, actions, rewards, next_states, terminated))
        td_errors, q_values = update(q_table, replay, batch, args, alpha, rng)
        next_is_autoreset, states = terminated | truncated, next_states
        td_squares, td_count = td_squares + np.square(td_errors).sum(), td_count + len(td_errors)
        q_sum, q_count = q_sum + q_values.sum(), q_count + len(q_values)
        training_episodes += log_episodes(run, infos, global_step)

        # Logging, the NaN check, the progress bar, checkpoints and stop signals.
        td_loss, mean_q = td_squares / max(td_count, 1), q_sum / max(q_count, 1)
        scalars = {"losses/td_loss": td_loss, "losses/q_values": mean_q}
        scalars |= {"charts/learning_rate": alpha, "charts/epsilon": epsilon}
        finite = bool(np.isfinite(td_squares))
        if run.end_iteration(global_step, previous_step, scalars, training_state, finite):
            break
        if crossed(args.log_interval, global_step, previous_step):  # logged: new sums begin
            td_squares, td_count, q_sum, q_count = 0.0, 0, 0.0, 0
    envs.close()

    def final_evaluation(video_folder: str | None) -> tuple[dict[str, np.ndarray], str]:
        """The greedy policy on episodes that training never played."""
        episodes_per_second = training_episodes / max(time.time() - run.start_time, 1e-6)
        eval_seed = args.seed + EVAL_SEED_OFFSET
        returns = evaluate(
            q_table, low, high, bins, args.env_id, args.eval_episodes, eval_seed, video_folder
        )
        summary = f"{eval_summary(returns)} ({episodes_per_second:.0f} episodes/s in training)"
        return {"eval/episodic_return": returns}, summary

    # Save, evaluate, summarise; after Ctrl-C or SIGTERM, exit 130 or 143 instead.
    run.finish(training_state(), global_step, final_evaluation)


# ----------------------------------------------------------------------------------------------
# Plumbing: validation, evaluation of a checkpoint, checkpoint files, logging and stop signals.
# A first reading can stop here: nothing below changes what is learned or delivered.
# ----------------------------------------------------------------------------------------------

# Checkpoints say what they hold by this kind, not by the script's file name, so a renamed copy of
# this script still loads its own checkpoints.
CHECKPOINT_KIND = "q-table/1"
# Earlier kinds that are evaluated but not resumed: none, the table's file has not changed yet.
EVALUATED_KINDS: tuple[str, ...] = ()
CHECKPOINT_SUFFIX = ".npz"

# Copied from ppo_cartpole.py: EVAL_SEED_OFFSET
EVAL_SEED_OFFSET = 10_000  # evaluation envs get seed + this: episodes that training never saw


# Copied from ppo_cartpole.py: training_seed
def training_seed(seed: int, resume_offset: int, num_envs: int) -> int:
    """The training envs' seed (env i gets it + i). A resumed run starts its stream at an offset so
    as not to replay its start's, taken modulo so that every training env's seed stays below
    seed + EVAL_SEED_OFFSET whatever the budget: training never plays an evaluation's episodes."""
    return seed + resume_offset % (EVAL_SEED_OFFSET - num_envs + 1)


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


# A bigger table would not fit in memory, and could never be filled with experience anyway.
MAX_TABLE_CELLS = 50_000_000


def validate(args: Args) -> None:
    """Check every knob before any heavy work, so a typo costs a second, not a run."""
    check_positive(
        args, "total_timesteps", "num_envs", "eval_episodes", "replay_batch_size", "log_interval",
        "learning_rate", "end_learning_rate",
    )  # fmt: skip
    check_non_negative(args, "checkpoint_freq", "replay_size")
    check_seed_room(args, "num_envs", "eval_episodes")
    check_fraction(
        args, "learning_rate", "end_learning_rate", "gamma", "start_epsilon", "end_epsilon",
        "exploration_fraction",
    )  # fmt: skip
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
            f"{len(args.bins)}; pass --bins, --obs-low and --obs-high with {observation_dims} "
            "values each"
        )
    if min(args.bins) < 1:
        fail(f"--bins must all be positive, got {' '.join(map(str, args.bins))}")
    for dim, (low, high) in enumerate(zip(args.obs_low, args.obs_high, strict=True)):
        if not (np.isfinite(low) and np.isfinite(high) and low < high):
            fail(f"dimension {dim}: --obs-low {low} must be finite and below --obs-high {high}")
    cells = int(np.prod(args.bins)) * num_actions
    if cells > MAX_TABLE_CELLS:
        fail(
            f"a Q-table of {cells:,} cells is too large (at most {MAX_TABLE_CELLS:,}); "
            "use fewer --bins"
        )


def check_env(env_id: str) -> tuple[int, int]:
    """Fail with suggestions for an unknown id or unusable spaces; return (obs size, actions)."""
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
    return observation_space.shape[0], int(action_space.n)


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


# Flags that may differ between a run and its resumption (budget, logging, tracking); every other
# setting must match the checkpoint's, or the resumed run would silently be a different experiment.
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
    """Seed `random` and NumPy's global stream; return the generator the training loop draws from
    (the torch scripts' version also seeds torch and returns nothing)."""
    random.seed(seed)
    np.random.seed(seed)
    return np.random.default_rng(seed)


def restore(checkpoint: dict, path: str, **objects) -> None:
    """Copy each saved array into the fresh one of its name, in place (q_table=..., or replay=...
    for a dict of arrays); an array that is missing or of another shape fails in one line."""
    for name, target in objects.items():
        pairs = target.items() if isinstance(target, dict) else [(None, target)]
        for key, array in pairs:
            saved = checkpoint[name] if key is None else checkpoint[name].get(key)
            if saved is None or saved.shape != array.shape:
                what = name if key is None else f"{name} {key}"
                fail(f"{path} does not match this run: its {what} is not of shape {array.shape}")
            array[...] = saved


def greedy_action(q_table: np.ndarray, obs: np.ndarray, low, high, bins) -> int:
    """The action of highest value in the cell of ONE observation (ties: the first action)."""
    return int(q_table[discretize(obs[None], low, high, bins)[0]].argmax())


def evaluate(
    q_table: np.ndarray | None,
    low: np.ndarray,
    high: np.ndarray,
    bins: np.ndarray,
    env_id: str,
    episodes: int,
    seed: int,
    video_folder: str | None = None,
) -> np.ndarray:
    """Run the greedy policy of `q_table` (None: the uniformly random policy) for `episodes` full
    episodes; return their undiscounted returns."""
    env = gym.make(env_id, render_mode="rgb_array" if video_folder else None)
    env.action_space.seed(seed)  # for the random policy
    if video_folder:
        env = gym.wrappers.RecordVideo(
            env, video_folder, episode_trigger=lambda _: True, disable_logger=True
        )
    returns = []
    for episode in range(episodes):
        # Seed the first reset only: later episodes continue the env's random stream.
        obs, _ = env.reset(seed=seed if episode == 0 else None)
        episode_return, done = 0.0, False
        while not done:
            if q_table is None:
                action = env.action_space.sample()
            else:
                action = greedy_action(q_table, obs, low, high, bins)
            obs, reward, terminated, truncated, _ = env.step(action)
            episode_return += float(reward)
            done = terminated or truncated
        returns.append(episode_return)
    env.close()
    return np.array(returns)


# Copied from ppo_cartpole.py: eval_summary
def eval_summary(returns: np.ndarray) -> str:
    return f"eval return {returns.mean():.2f} ± {returns.std():.2f} over {len(returns)} episodes"


def evaluate_checkpoint(args: Args) -> None:
    """--eval-checkpoint: the greedy policy of the saved table on the evaluation episodes of the
    end of its training run (the same seed rule), so that both print the same figures. Given a
    folder (runs/<run>/checkpoints), evaluate each checkpoint in it and draw the curve."""
    _, num_actions = check_env(args.env_id)
    low, high, bins = np.array(args.obs_low), np.array(args.obs_high), np.array(args.bins)

    def load(path: str) -> dict:
        checkpoint = load_checkpoint(path)
        check_settings(args, checkpoint["args"], set(checkpoint["args"]) - MODEL_SETTINGS)
        return checkpoint

    def play(checkpoint: dict | None, path: str, video: str | None = None) -> dict:
        q_table = None  # the uniformly random policy
        if checkpoint is not None:
            q_table = np.zeros((int(np.prod(args.bins)), num_actions))
            restore(checkpoint, path, q_table=q_table)
        seed = args.seed + EVAL_SEED_OFFSET
        returns = evaluate(q_table, low, high, bins, args.env_id, args.eval_episodes, seed, video)
        return {"return": returns}

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


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically and durably: the new file reaches the disk before it replaces the old one,
    and the folder's entry after (and a new folder's own entry in its parent), so a crash or a
    power loss leaves one whole checkpoint or the other under the name, never an empty file.

    Only arrays, numbers and strings go in (the args as JSON text, the replay's arrays as
    replay_<name>), so that loading needs no pickle: `np.load(..., allow_pickle=False)` cannot
    run code hidden in a file.
    """
    arrays = {key: value for key, value in state.items() if key not in ("args", "replay")}
    arrays["args"] = json.dumps(state["args"])
    arrays.update({f"replay_{key}": value for key, value in state.get("replay", {}).items()})
    make_folder(path.parent)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        np.savez(file, **arrays)
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


def load_checkpoint(path: str, resume: bool = False) -> dict:
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
    kind = str(arrays["kind"])
    if kind in EVALUATED_KINDS and resume:
        fail(
            f"{path} holds a {kind} checkpoint, which this version cannot continue: "
            "it can be evaluated (--eval-checkpoint), not resumed"
        )
    if kind != CHECKPOINT_KIND and kind not in EVALUATED_KINDS:
        fail(f"{path} holds a {kind} checkpoint; this script trains {CHECKPOINT_KIND}")
    try:
        # JSON has no tuples: the tuple-valued args (bins, bounds) come back as the tuples they were
        saved_args = {
            name: tuple(value) if isinstance(value, list) else value
            for name, value in json.loads(str(arrays["args"])).items()
        }
        checkpoint = {
            "kind": kind,
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
        fail(f"{path} does not say how it discretised observations: not this script's checkpoint")
    return checkpoint


class SummaryWriter:
    """What Run needs of torch's SummaryWriter, on tensorboard's own event writer: this script
    does without torch. The event writer class is looked up when the writer is built, after
    `wandb.init`, so that W&B's `sync_tensorboard` patch of that class sees the run folder."""

    def __init__(self, logdir: str):
        # A long queue: episodes end by the hundred per second, and a full queue blocks the loop.
        self._writer = event_file_writer.EventFileWriter(logdir, max_queue_size=1000)

    def _add(self, summary: summary_pb2.Summary, step: int) -> None:
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.add_scalars([(tag, value)], step)

    def add_scalars(self, pairs: list[tuple[str, float]], step: int) -> None:
        """Several (tag, value) pairs at one step in ONE event: the same points in TensorBoard as
        one event each, at a fraction of the cost."""
        values = [summary_pb2.Summary.Value(tag=tag, simple_value=float(v)) for tag, v in pairs]
        self._add(summary_pb2.Summary(value=values), int(step))

    def add_text(self, tag: str, text: str, step: int = 0) -> None:
        self._add(text_pb(tag, text), step)

    def close(self) -> None:
        self._writer.close()


def log_episodes(run: Run, infos: dict, global_step: int) -> int:
    """Run.log_episode for all the training episodes that ended at one step, in ONE event: they
    end by the hundred per second, and two events per episode would double the time of a default
    run. Returns how many ended."""
    if "episode" not in infos:
        return 0
    ended = infos["_episode"]
    returns, lengths = infos["episode"]["r"][ended], infos["episode"]["l"][ended]
    run.writer.add_scalars(
        [("charts/episodic_return", r) for r in returns]
        + [("charts/episodic_length", n) for n in lengths],
        global_step,
    )
    run.recent_returns.extend(returns.tolist())
    return len(returns)


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
