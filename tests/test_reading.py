"""The scripts are teaching references: each reads top to bottom as the algorithm first, the
plumbing after one banner. These tests hold the shape that CONTRIBUTING.md asks of every script."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BANNER = "# Plumbing:"
# The most lines a script may have above its banner: its docstring, imports, Args, env, network,
# the algorithm's pure parts and `main`, and whatever changes what is learned or delivered.
ABOVE_BANNER = {
    "ppo_cartpole.py": 485,
    "actor_critic.py": 435,
    "dqn_flappy.py": 670,
    "qlearning_cartpole.py": 280,
    "ppo_atari.py": 605,
    "ppo_drone.py": 620,
}
MAX_COLUMNS = 100


def lines_above_banner(source: str) -> int:
    """The number of lines down to the end of the banner's text (the file's first lines, then the
    dashed rule and the banner's comment lines, before its closing dashed rule)."""
    lines = source.splitlines()
    (banner,) = [number for number, line in enumerate(lines) if line.startswith(BANNER)]
    assert re.fullmatch(r"# -+", lines[banner - 1]), "the banner opens with a dashed rule"
    closing = next(n for n in range(banner, len(lines)) if re.fullmatch(r"# -+", lines[n]))
    return closing


def args_field_docstrings(source: str) -> dict[str, str]:
    """field name -> the docstring under it, for every field of the dataclass Args."""
    (args,) = [
        node
        for node in ast.parse(source).body
        if isinstance(node, ast.ClassDef) and node.name == "Args"
    ]
    docstrings = {}
    for field, following in zip(args.body, args.body[1:], strict=False):
        if isinstance(field, ast.AnnAssign) and isinstance(following, ast.Expr):
            docstrings[field.target.id] = following.value.value
    return docstrings


@pytest.mark.parametrize("script", sorted(ABOVE_BANNER))
def test_the_part_above_the_banner_stays_within_its_length(script):
    above = lines_above_banner((ROOT / script).read_text())
    assert above <= ABOVE_BANNER[script], f"{script}: {above} lines above the banner"


@pytest.mark.parametrize("script", sorted(ABOVE_BANNER))
def test_every_args_field_has_a_one_line_docstring(script):
    source = (ROOT / script).read_text()
    docstrings = args_field_docstrings(source)
    fields = [
        node.target.id
        for node in next(n for n in ast.parse(source).body if getattr(n, "name", "") == "Args").body
        if isinstance(node, ast.AnnAssign)
    ]
    assert sorted(docstrings) == sorted(fields), set(fields) - set(docstrings)
    for name, docstring in docstrings.items():
        assert "\n" not in docstring, f"{script}: --{name}'s docstring spans lines"
        assert len(docstring) + 10 <= MAX_COLUMNS, f"{script}: --{name}'s docstring is too long"


@pytest.mark.parametrize("script", sorted(ABOVE_BANNER))
def test_the_module_docstring_is_short_and_nothing_runs_at_exit(script):
    source = (ROOT / script).read_text()
    docstring = ast.get_docstring(ast.parse(source), clean=False)
    assert len(docstring.splitlines()) <= 15, f"{script}: {len(docstring.splitlines())} lines"
    assert "gc.freeze" not in source


def test_the_line_count_sees_the_banner():
    source = "a = 1\n\n# ---\n# Plumbing: below\n# more\n# ---\nb = 2\n"
    assert lines_above_banner(source) == 5
    with pytest.raises(ValueError):
        lines_above_banner("a = 1\n")


# What the part above the banner may use from below it: plumbing that changes neither what is
# learned nor what is delivered. Anything else a definition above the banner uses (evaluations
# that stop training or pick the delivered network, the env's construction, observation
# normalisation, the gradient all-reduce) must be defined above the banner too.
PLUMBING = {
    # validation, checkpoints, logging, stop signals, devices, seeds
    "fail", "validate", "evaluate_checkpoint", "restore", "Run", "MainRun", "RankRun", "Ranks",
    "CHECKPOINT_KIND", "training_state", "pick_device", "pick_jax_device", "seed_everything",
    "training_seed", "EVAL_SEED_OFFSET", "SOLVED_CHECK_SEED_OFFSET", "PERIODIC_EVAL_SEED_OFFSET",
    "RANK_SEED_OFFSET", "explained_variance", "eval_summary", "describe_eval", "tracking_summary",
    "delivered_network", "FlightStats", "log_episodes", "collection_paused",
    # a dtype decided by the hardware, said in a comment where it is used
    "native_bf16",
    # what a recorded evaluation video shows
    "AgentView",
}  # fmt: skip
# Scripts whose `evaluate` only reports on the final network: it decides nothing.
FINAL_EVALUATION_ONLY = {"ppo_atari.py", "ppo_drone.py", "qlearning_cartpole.py"}
# qlearning_cartpole uses `crossed` only to time its logging.
LOGGING_ONLY = {"qlearning_cartpole.py": {"crossed"}}


@pytest.mark.parametrize("script", sorted(ABOVE_BANNER))
def test_the_part_above_the_banner_uses_only_plumbing_from_below_it(script):
    source = (ROOT / script).read_text()
    banner_line = lines_above_banner(source)
    body = ast.parse(source).body
    defined_below = set()
    for node in body:
        if node.lineno <= banner_line:
            continue
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            defined_below.add(node.name)
        elif isinstance(node, ast.Assign):
            defined_below |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    used = set()
    for node in body:
        if node.lineno < banner_line and isinstance(node, ast.FunctionDef | ast.ClassDef):
            used |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    allowed = PLUMBING | LOGGING_ONLY.get(script, set())
    if script in FINAL_EVALUATION_ONLY:
        allowed = allowed | {"evaluate"}
    assert (used & defined_below) - allowed == set(), f"{script} uses them from below its banner"


@pytest.mark.parametrize("script", sorted(ABOVE_BANNER))
def test_the_banner_says_nothing_below_changes_what_is_learned_or_delivered(script):
    source = (ROOT / script).read_text()
    assert "nothing below changes what is learned or delivered" in source
