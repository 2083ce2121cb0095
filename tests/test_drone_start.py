"""Tests of experiments/drone_start.py: ideal point-mass flights, then the tool on a checkpoint."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import HEADLESS_ENV, ROOT

TOOL = ROOT / "experiments" / "drone_start.py"
spec = importlib.util.spec_from_file_location("drone_start", TOOL)
drone_start = importlib.util.module_from_spec(spec)
spec.loader.exec_module(drone_start)


def test_projection_keeps_the_thrust_within_its_limit_and_feasible_accelerations_as_they_are():
    rng = np.random.default_rng(0)
    accelerations = rng.normal(0, 20, (500, 3))
    projected = drone_start.project_to_thrust_limit(accelerations)
    thrust = np.linalg.norm(projected + [0, 0, drone_start.GRAVITY], axis=-1)
    assert thrust.max() <= drone_start.MAX_THRUST_ACCELERATION + 1e-9
    feasible = np.linalg.norm(accelerations + [0, 0, drone_start.GRAVITY], axis=-1) <= 15.0
    assert 0 < feasible.sum() < len(accelerations)
    np.testing.assert_allclose(projected[feasible], accelerations[feasible])
    # An infeasible one moves to the boundary along the thrust's own direction.
    outside = ~feasible
    np.testing.assert_allclose(thrust[outside], drone_start.MAX_THRUST_ACCELERATION)
    before = accelerations[outside] + [0, 0, drone_start.GRAVITY]
    after = projected[outside] + [0, 0, drone_start.GRAVITY]
    cosine = (
        (before * after).sum(-1) / np.linalg.norm(before, axis=-1) / np.linalg.norm(after, axis=-1)
    )
    np.testing.assert_allclose(cosine, 1.0)


def test_a_start_already_flying_the_reference_path_stays_on_it():
    """Started one step behind the reference, with its velocity, the point mass can fly the path
    exactly (the figure-eight needs ~4 m/s^2 at most): the optimised distances vanish."""
    dt = 1.0 / drone_start.FREQ
    omega = 2 * np.pi / ((drone_start.EPISODE_STEPS - 1) * dt)  # the reference's t per second
    t = -omega * dt
    position = np.array([[np.sin(t), 0.0, 1 + 0.5 * np.sin(2 * t)]])
    velocity = np.array([[omega * np.cos(t), 0.0, omega * np.cos(2 * t)]])
    distances, _ = drone_start.ideal_flights(position, velocity, horizon=30)
    assert distances.max() < 2e-3


def test_the_ideal_flights_respect_the_limit_and_beat_flying_straight_on():
    positions, velocities = drone_start.random_starts(40, seed=3)
    distances, accelerations = drone_start.ideal_flights(positions, velocities, horizon=40)
    thrust = np.linalg.norm(accelerations + [0, 0, drone_start.GRAVITY], axis=-1)
    assert thrust.max() <= drone_start.MAX_THRUST_ACCELERATION + 1e-9
    coasting, _ = drone_start.ideal_flights(positions, velocities, horizon=40, iterations=0)
    assert ((distances**2).sum(1) < (coasting**2).sum(1)).all()
    # The starts are crazyflow's: 0.1-0.3 m above the reference's first point, so never on it.
    assert distances[:, 0].min() > 0.05
    rmse = drone_start.episode_rmse(distances)
    assert (rmse > 0).all() and (rmse < drone_start.episode_rmse(coasting)).all()
    # Later steps at a distance d add (500 - 40) d^2 to the sum of squares.
    np.testing.assert_allclose(
        drone_start.episode_rmse(distances, 0.01) ** 2 * 500, (distances**2).sum(1) + 460 * 0.01**2
    )


def run_tool(*argv: str, cwd, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOL), *argv], cwd=cwd, capture_output=True, text=True,
        env={**os.environ, **HEADLESS_ENV, **(env or {})}, timeout=600,
    )  # fmt: skip


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--drones", "0"), "must be >= 1"),
        (("--horizon", "501"), "within 1..500"),
        (("--checkpoint", "x.pt"), "no checkpoint"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, argv, message):
    result = run_tool(*argv, cwd=tmp_path)
    assert (
        result.returncode == 2
        and message in result.stderr
        and len(result.stderr.strip().splitlines()) == 1
    )


def test_a_checkpoint_flies_its_evaluation_drones_beside_the_bound(run_script, tmp_path):
    cache = {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    shape = (
        "--num-envs",
        "16",
        "--num-steps",
        "16",
        "--num-minibatches",
        "4",
        "--update-epochs",
        "2",
    )
    trained = run_script(
        "ppo_drone.py", "--total-timesteps", "512", *shape, "--num-eval-envs", "16",
        "--eval-episodes", "3", "--max-episode-time", "0.5", env=cache,
    )  # fmt: skip
    assert trained.returncode == 0, trained.describe()
    (checkpoint,) = trained.checkpoints()
    result = run_tool(
        "--checkpoint", str(checkpoint), "--drones", "16", "--starts", "20", cwd=tmp_path, env=cache
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rmses = {
        int(k): float(v)
        for k, v in re.findall(
            r"without the first +(\d+) steps, median over drones ([\d.]+) m", result.stdout
        )
    }
    assert sorted(rmses) == [0, 5, 10, 20]  # a 0.5 s episode has 25 steps
    bound = float(re.search(r"full-episode RMSE, median ([\d.]+) m", result.stdout).group(1))
    # A policy trained for 512 steps flies far worse than the ideal point mass.
    assert 0 < bound < rmses[0]
    first_steps = re.findall(r"mean distance after steps 1-20 \(m\): (.*)", result.stdout)
    assert len(first_steps) == 2 and all(len(line.split()) == 20 for line in first_steps)
