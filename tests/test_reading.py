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
# the algorithm's pure parts and `main`.
ABOVE_BANNER = {
    "ppo_cartpole.py": 410,
    "actor_critic.py": 360,
    "dqn_flappy.py": 510,
    "qlearning_cartpole.py": 280,
    "ppo_atari.py": 520,
    "ppo_drone.py": 520,
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
