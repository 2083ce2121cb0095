"""Training never plays an evaluation's episodes, in any script, whatever the budget.

Every script seeds env i of a vector env with `seed + i`. The training envs start at `seed` and a
resumed run starts its stream at an offset (`training_seed`); the final evaluation plays
`seed + EVAL_SEED_OFFSET + i`; the periodic checks (dqn_flappy's best-network evaluations,
the CartPole scripts' solved checks) play `seed + their offset + step + i`. These tests check the
rule over budgets far beyond the defaults, and that each script's `main` seeds its training envs
through it.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT))

SCRIPTS = [
    "ppo_cartpole", "actor_critic", "qlearning_cartpole", "ppo_atari", "ppo_drone", "dqn_flappy",
]  # fmt: skip
# The offsets of the checks played during training, where a script has them.
CHECK_OFFSETS = {
    "ppo_cartpole": "SOLVED_CHECK_SEED_OFFSET",
    "actor_critic": "SOLVED_CHECK_SEED_OFFSET",
    "dqn_flappy": "PERIODIC_EVAL_SEED_OFFSET",
}


def first_training_seeds(module, seed: int, num_envs: int, resume_offsets) -> np.ndarray:
    """The seed of env 0 of the training envs of runs resumed at these offsets (env i: + i)."""
    return np.array([module.training_seed(seed, int(o), num_envs) for o in resume_offsets])


@pytest.mark.parametrize("name", SCRIPTS)
def test_training_seeds_never_meet_the_evaluations(name):
    module = importlib.import_module(name)
    offset = module.EVAL_SEED_OFFSET
    # Resumed at every offset up to 3 times the seed room, then at budgets up to 10^10 steps.
    resumed = np.concatenate([np.arange(1, 3 * offset), np.arange(0, 10**10, 10**7 + 3)])
    for seed in (0, 1, 7):
        for num_envs in sorted({1, 8, module.Args().num_envs, offset}):
            # A fresh run starts where it always did.
            assert module.training_seed(seed, 0, num_envs) == seed
            first = first_training_seeds(module, seed, num_envs, resumed)
            # Envs 0 .. num_envs - 1 all stay below the final evaluation's first seed, so they
            # never meet its seed + offset + i, nor the checks' (at least seed + 2 x offset).
            assert first.min() >= seed and first.max() + num_envs - 1 < seed + offset
            if num_envs < offset:  # a resumed run does move its stream
                assert len(np.unique(first)) > 1
    if name in CHECK_OFFSETS:  # a check at step >= 0 plays seed + its offset + step + i
        assert getattr(module, CHECK_OFFSETS[name]) >= 2 * offset


def test_the_examples_that_met_before():
    """dqn_flappy resumed near step 80,000 and qlearning_cartpole near step 1.27M trained on the
    final evaluation's seeds when the offset was step // num_envs."""
    import dqn_flappy
    import qlearning_cartpole

    examples = (
        (dqn_flappy, range(79_000, 81_000)),
        (qlearning_cartpole, range(1_250_000, 1_290_000, 7)),
    )
    for module, steps in examples:
        args = module.Args()
        first_eval = args.seed + module.EVAL_SEED_OFFSET
        evaluation = set(range(first_eval, first_eval + args.eval_episodes))
        old = {
            args.seed + step // args.num_envs + i for step in steps for i in range(args.num_envs)
        }
        assert old & evaluation  # the rule these tests replace did meet them
        first = first_training_seeds(
            module, args.seed, args.num_envs, [s // args.num_envs for s in steps]
        )
        new = {int(f) + i for f in first for i in range(args.num_envs)}
        assert not new & evaluation


@pytest.mark.parametrize("name", SCRIPTS)
def test_main_seeds_its_training_envs_through_the_rule(name):
    """The seed of `main`'s training envs comes from training_seed; every other seed made there
    from args.seed is an evaluation's or a check's, at one of the script's *_SEED_OFFSET."""
    module = importlib.import_module(name)
    tree = ast.parse(inspect.getsource(module.main))
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "training_seed"
    ]
    assert len(calls) == 1
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and ast.unparse(node.left) == "args.seed":
            assert "_SEED_OFFSET" in ast.unparse(node.right), ast.unparse(node)


@pytest.mark.parametrize("name", SCRIPTS)
def test_too_many_envs_or_episodes_for_the_seed_room_is_refused(name):
    module = importlib.import_module(name)
    too_many = str(module.EVAL_SEED_OFFSET + 1)
    for flag in ("--num-envs", "--eval-episodes"):
        result = subprocess.run(
            [sys.executable, f"{name}.py", flag, too_many],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and f"{flag} must be at most 10,000" in lines[0], result.stderr
