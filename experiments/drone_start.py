"""Where ppo_drone's tracking RMSE comes from: the start of each flight, and how low it could go.

    python experiments/drone_start.py                                    # the ideal bound alone
    python experiments/drone_start.py --checkpoint runs/<run>/ppo_drone.pt  # and a trained policy

crazyflow's figure-eight env starts every drone away from the reference point: position uniform in
[-0.1, 0.1] x [-0.1, 0.1] x [1.1, 1.3] m, velocity uniform in [-0.5, 0.5] m/s per axis, while the
reference starts at (0, 0, 1) m and moves off at ~0.9 m/s. The full-episode RMSE that ppo_drone
reports (`eval/tracking_rmse`) counts those first steps with the rest.

- The bound: an ideal point mass with the drone's thrust limit (|a + g| <= 4 x thrust_max x
  cmd_f_coef / mass, ~15 m/s^2, the thrust pointed anywhere at once: no attitude dynamics),
  controlled at the env's 50 Hz from the same random starts. Per start, the accelerations that
  minimise the sum of squared distances over the first `--horizon` steps are found by projected
  gradient descent (FISTA); every later step is taken as on the reference. The RMSE of that flight
  over the whole episode is a lower bound for any policy flying the real drone, which must also tilt
  to turn its thrust. Printed: its median over the starts, and the mean distance at each of the
  first steps.
- `--checkpoint`: the checkpoint's deterministic policy flies `--drones` evaluation drones (the
  seed of its final evaluation, its own observation statistics); printed: the mean distance at each
  of the first steps and the median over drones of the RMSE over the whole flight and without its
  first k steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GRAVITY = 9.81
FREQ = 50  # Hz: ppo_drone's default control frequency
EPISODE_STEPS = 500  # a 10 s episode at 50 Hz
# crazyflow's cf2x_L250 (so_rpy dynamics): thrust_max 0.12 N per motor, cmd_f_coef, mass 0.0328 kg.
MAX_THRUST_ACCELERATION = 4 * 0.12 * 1.023224599403443 / 0.0328


def figure_eight(steps: int = EPISODE_STEPS) -> np.ndarray:
    """crazyflow's reference points, one per env step: x = sin t, y = 0, z = 1 + 0.5 sin 2t."""
    t = np.linspace(0, 2 * np.pi, steps)
    return np.stack([np.sin(t), np.zeros_like(t), 1 + 0.5 * np.sin(2 * t)], axis=-1)


def random_starts(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions and velocities drawn as crazyflow's figure-eight env draws them on reset."""
    rng = np.random.default_rng(seed)
    positions = rng.uniform([-0.1, -0.1, 1.1], [0.1, 0.1, 1.3], (count, 3))
    velocities = rng.uniform(-0.5, 0.5, (count, 3))
    return positions, velocities


def project_to_thrust_limit(accelerations: np.ndarray) -> np.ndarray:
    """Nearest accelerations a with |a + g| <= MAX_THRUST_ACCELERATION (gravity along -z)."""
    thrust = accelerations + np.array([0.0, 0.0, GRAVITY])
    norm = np.linalg.norm(thrust, axis=-1, keepdims=True)
    scale = np.minimum(1.0, MAX_THRUST_ACCELERATION / np.maximum(norm, 1e-12))
    return thrust * scale - np.array([0.0, 0.0, GRAVITY])


def ideal_flights(
    positions: np.ndarray, velocities: np.ndarray, horizon: int, iterations: int = 3000
) -> tuple[np.ndarray, np.ndarray]:
    """Distances to the reference after each of the first `horizon` steps of the best point-mass
    flights (shape starts x horizon), and their accelerations (starts x horizon x 3).

    After env step k (1-based) crazyflow measures the distance to reference point k - 1. With the
    acceleration a_j held over step j, the position after step k is
    p0 + v0 k dt + sum_{j<k} (k - j - 1/2) dt^2 a_j: linear in the accelerations, so the squared
    distances are a convex quadratic and the thrust limit a convex set.
    """
    dt = 1.0 / FREQ
    reference = figure_eight()[:horizon]
    k = np.arange(1, horizon + 1)[:, None]
    j = np.arange(horizon)[None, :]
    effect = np.where(j < k, dt**2 * (k - j - 0.5), 0.0)  # position after step k per a_j
    drift = positions[:, None] + velocities[:, None] * (k * dt) - reference  # with no acceleration
    step_size = 1.0 / (2 * np.linalg.norm(effect, 2) ** 2)  # 1 / Lipschitz constant of the gradient
    accelerations = np.zeros((len(positions), horizon, 3))
    momentum_point, t = accelerations, 1.0
    for _ in range(iterations):
        errors = drift + effect @ momentum_point
        following = project_to_thrust_limit(momentum_point - step_size * 2 * (effect.T @ errors))
        t_next = (1 + np.sqrt(1 + 4 * t * t)) / 2
        momentum_point = following + (t - 1) / t_next * (following - accelerations)
        accelerations, t = following, t_next
    distances = np.linalg.norm(drift + effect @ accelerations, axis=-1)
    return distances, accelerations


def episode_rmse(first_distances: np.ndarray, later_distance: float = 0.0) -> np.ndarray:
    """RMSE over a whole episode of the given first distances, every later step at
    `later_distance`."""
    later_steps = EPISODE_STEPS - first_distances.shape[1]
    return np.sqrt(((first_distances**2).sum(1) + later_steps * later_distance**2) / EPISODE_STEPS)


def fly_checkpoint(path: str, drones: int) -> np.ndarray:
    """Distances after every step of the checkpoint's deterministic evaluation flights (steps x
    drones; NaN once a drone's episode has ended)."""
    import torch

    sys.path.insert(0, str(ROOT))
    import ppo_drone

    args = ppo_drone.parse_args(
        ["--eval-checkpoint", path, "--num-eval-envs", str(drones), "--no-cuda"]
    )
    checkpoint = ppo_drone.load_checkpoint(path)
    device = ppo_drone.pick_device(False, args.torch_threads)
    envs = ppo_drone.make_envs(args, drones, ppo_drone.pick_jax_device(device), device)
    envs.freeze(checkpoint["obs_rms"])
    obs_dim, action_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    agent = ppo_drone.Agent(obs_dim, action_dim, args.hidden_size).to(device)
    agent.load_state_dict(checkpoint["model"])
    distances = []
    with torch.inference_mode():
        obs, _ = envs.reset(seed=args.seed + ppo_drone.EVAL_SEED_OFFSET)
        flying = torch.ones(drones, dtype=torch.bool)
        while flying.any():
            obs, _, terminated, truncated, info = envs.step(agent.deterministic_action(obs))
            distances.append(torch.where(flying, info["tracking_error"], float("nan")).numpy())
            flying &= ~(terminated | truncated)
    envs.close()
    return np.array(distances)


def first_steps(mean_distances: np.ndarray) -> str:
    return "  mean distance after steps 1-20 (m): " + " ".join(
        f"{d:.3f}" for d in mean_distances[:20]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a ppo_drone.py checkpoint (figure-eight) to fly")
    parser.add_argument(
        "--drones", type=int, default=64, help="evaluation drones the checkpoint flies"
    )
    parser.add_argument("--starts", type=int, default=1000, help="random starts of the ideal bound")
    parser.add_argument("--horizon", type=int, default=50, help="steps the ideal flights optimise")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the ideal bound's random starts"
    )
    args = parser.parse_args(argv)
    if args.drones < 1 or args.starts < 1 or not 1 <= args.horizon <= EPISODE_STEPS:
        parser.exit(2, "error: --drones and --starts must be >= 1, --horizon within 1..500\n")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        parser.exit(2, f"error: no checkpoint at {args.checkpoint}\n")

    distances, _ = ideal_flights(*random_starts(args.starts, args.seed), args.horizon)
    print(
        f"ideal point mass (|a + g| <= {MAX_THRUST_ACCELERATION:.1f} m/s^2), "
        f"{args.starts} random starts:"
    )
    print(f"  full-episode RMSE, median {np.median(episode_rmse(distances)):.4f} m")
    print(first_steps(distances.mean(0)))
    if not args.checkpoint:
        return
    flown = fly_checkpoint(args.checkpoint, args.drones)
    print(f"{args.checkpoint}, {args.drones} evaluation drones:")
    print(first_steps(np.nanmean(flown, 1)))
    for skipped in [skipped for skipped in (0, 5, 10, 20, 50) if skipped < len(flown)]:
        rmse = np.sqrt(np.nanmean(flown[skipped:] ** 2, axis=0))
        print(
            f"  RMSE without the first {skipped:2d} steps, "
            f"median over drones {np.median(rmse):.4f} m"
        )


if __name__ == "__main__":
    main()
