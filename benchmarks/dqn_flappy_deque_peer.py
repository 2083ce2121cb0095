"""dqn_flappy.py with the replay buffer most DQN tutorials use: a deque of transition tuples.

The peer of `bench_dqn_flappy.py`: the same training run, the same CLI, only the buffer differs.
Each transition is appended as `(obs, action, reward, terminated, next_obs)` with its own copies
of the observation and of the next observation (for pixels: two stacks of four 84x84 frames),
and a minibatch is `random.sample` of the deque stacked into arrays. Like the real buffer it skips
the autoreset step, so both runs learn from the same transitions.

    python benchmarks/dqn_flappy_deque_peer.py --total-timesteps 20000   # any dqn_flappy.py flag
"""

from __future__ import annotations

import random
import sys
from collections import deque
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dqn_flappy  # noqa: E402


class DequeReplayBuffer:
    """The same interface as dqn_flappy.ReplayBuffer, stored as a deque of tuples."""

    def __init__(self, capacity, num_envs, frame_shape, frame_dtype, stack=1, seed=0):
        self.memory = deque(maxlen=capacity * num_envs)
        self.pending = [None] * num_envs  # (obs, action, reward, terminated) waiting for next_obs
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.memory) // len(self.pending)

    def add(self, obs, actions, rewards, terminated, final) -> None:
        for e in range(len(self.pending)):
            if self.pending[e] is not None:
                self.memory.append((*self.pending[e], np.array(obs[e])))
            # The autoreset step (final observation) starts no transition.
            self.pending[e] = (
                None if final[e] else (np.array(obs[e]), actions[e], rewards[e], terminated[e])
            )

    def sample(self, batch_size):
        batch = (
            self.rng.sample(self.memory, batch_size)
            if len(self.memory) >= batch_size
            else [self.rng.choice(self.memory) for _ in range(batch_size)]
        )
        obs, actions, rewards, terminated, next_obs = zip(*batch, strict=True)
        return (
            np.stack(obs),
            np.array(actions, dtype=np.int64),
            np.array(rewards, dtype=np.float32),
            np.array(terminated, dtype=np.bool_),
            np.stack(next_obs),
        )


if __name__ == "__main__":
    dqn_flappy.ReplayBuffer = DequeReplayBuffer
    dqn_flappy.main(dqn_flappy.parse_args())
