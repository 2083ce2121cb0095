"""The scripts share no code, so a function two of them need is carried by both: the copy is marked
`# Copied from <script>.py: <name>` on the line above it, and must stay identical to its source,
character for character (the way the transformers library keeps its copies from drifting).

These tests find every marker in the top-level scripts, check that it names a definition that
exists in the source script and is not itself a copy, and that the two texts are the same. They
also check that no script imports another.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(path.name for path in ROOT.glob("*.py"))
MARKER = re.compile(r"^# Copied from (?P<script>[\w.]+\.py): (?P<name>\w+)\s*$")


def top_level_definitions(source: str) -> dict[str, tuple[int, int]]:
    """name -> (first line, last line), 1-based, of each top-level def, class or assignment;
    the first line includes decorators."""
    definitions = {}
    for node in ast.parse(source).body:
        first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            definitions[node.name] = (first, node.end_lineno)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    definitions[target.id] = (first, node.end_lineno)
    return definitions


def marked_copies(source: str) -> list[tuple[int, str, str]]:
    """(marker line, source script, name) for each `# Copied from` marker."""
    copies = []
    for number, line in enumerate(source.splitlines(), start=1):
        match = MARKER.match(line)
        if match:
            copies.append((number, match["script"], match["name"]))
    return copies


def copy_problems(sources: dict[str, str]) -> list[str]:
    """Every way in which the marked copies in `sources` (file name -> text) fall short."""
    problems = []
    for script, source in sources.items():
        lines = source.splitlines()
        definitions = top_level_definitions(source)
        starts = {first: name for name, (first, _) in definitions.items()}
        for marker_line, origin, name in marked_copies(source):
            where = f"{script}:{marker_line}"
            below = starts.get(marker_line + 1)
            if below != name:
                problems.append(
                    f"{where}: the marker names {name} but the definition below it is {below}"
                )
                continue
            if origin == script:
                problems.append(f"{where}: {name} is marked as a copy of itself")
                continue
            if origin not in sources:
                problems.append(f"{where}: {origin} does not exist")
                continue
            origin_source = sources[origin]
            origin_definitions = top_level_definitions(origin_source)
            if name not in origin_definitions:
                problems.append(f"{where}: {origin} has no top-level {name}")
                continue
            origin_first, origin_last = origin_definitions[name]
            origin_lines = origin_source.splitlines()
            if origin_first >= 2 and MARKER.match(origin_lines[origin_first - 2]):
                problems.append(f"{where}: {origin}'s {name} is itself a copy; name the original")
                continue
            first, last = definitions[name]
            copy_text = lines[first - 1 : last]
            origin_text = origin_lines[origin_first - 1 : origin_last]
            if copy_text != origin_text:
                differing = next(
                    (
                        i
                        for i, (a, b) in enumerate(zip(copy_text, origin_text, strict=False))
                        if a != b
                    ),
                    min(len(copy_text), len(origin_text)),
                )
                problems.append(
                    f"{where}: {name} differs from {origin}:{origin_first} "
                    f"at line {first + differing} of the copy "
                    f"({len(copy_text)} vs {len(origin_text)} lines)"
                )
    return problems


def read_scripts() -> dict[str, str]:
    return {script: (ROOT / script).read_text() for script in SCRIPTS}


def test_every_marked_copy_is_identical_to_its_source():
    problems = copy_problems(read_scripts())
    assert not problems, "\n".join(problems)


def test_the_scripts_carry_marked_copies():
    """The check above passes vacuously without markers; the scripts do share functions."""
    sources = read_scripts()
    marked = {script for script, source in sources.items() if marked_copies(source)}
    assert len(marked) >= 5, f"only {sorted(marked)} carry '# Copied from' markers"


def test_no_script_imports_another():
    modules = {Path(script).stem for script in SCRIPTS}
    for script, source in read_scripts().items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                imported = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported = {node.module.split(".")[0]}
            else:
                continue
            assert not imported & (modules - {Path(script).stem}), (
                f"{script} imports {imported & modules}"
            )


ORIGIN = '''import sys


def fail(message: str) -> None:
    """One line on stderr, exit 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


LIMIT = 3
'''


def copy_of(body: str, name: str = "fail") -> str:
    return f"import os\n\n\n# Copied from a.py: {name}\n{body}"


FAIL_BODY = ORIGIN.split("\n\n\n")[1].rstrip("\n") + "\n"


@pytest.mark.parametrize(
    ("copy", "expected"),
    [
        (copy_of(FAIL_BODY), None),
        (copy_of(FAIL_BODY.replace("exit(2)", "exit(1)")), "differs from a.py"),
        (
            copy_of(FAIL_BODY.replace('    """One line on stderr, exit 2."""\n', "")),
            "differs from a.py",
        ),
        (copy_of(FAIL_BODY + "    return None\n"), "differs from a.py"),
        (copy_of(FAIL_BODY, name="missing"), "the marker names missing"),
        (copy_of(FAIL_BODY).replace("a.py", "nowhere.py"), "nowhere.py does not exist"),
        (copy_of("def missing():\n    pass\n", name="missing"), "a.py has no top-level missing"),
        (copy_of("LIMIT = 3\n", name="LIMIT"), None),
        (copy_of("LIMIT = 4\n", name="LIMIT"), "differs from a.py"),
    ],
)
def test_the_copy_check_catches_drift(copy, expected):
    problems = copy_problems({"a.py": ORIGIN, "b.py": copy})
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and expected in problems[0], problems


def test_the_copy_check_refuses_a_copy_of_a_copy():
    copy = copy_of(FAIL_BODY)
    problems = copy_problems({"a.py": ORIGIN, "b.py": copy, "c.py": copy.replace("a.py", "b.py")})
    assert len(problems) == 1 and "is itself a copy" in problems[0], problems


def fix_copies(sources: dict[str, str]) -> dict[str, str]:
    """`sources` with every marked copy replaced by its origin's current text (copies of copies and
    markers that name nothing are left for the check to report)."""
    fixed = {}
    for script, source in sources.items():
        lines = source.splitlines()
        definitions = top_level_definitions(source)
        starts = {first: name for name, (first, _) in definitions.items()}
        # From the bottom up, so that replacing one copy does not move the lines of those above it.
        for marker_line, origin, name in reversed(marked_copies(source)):
            if starts.get(marker_line + 1) != name or origin == script or origin not in sources:
                continue
            origin_definitions = top_level_definitions(sources[origin])
            if name not in origin_definitions:
                continue
            origin_first, origin_last = origin_definitions[name]
            first, last = definitions[name]
            lines[first - 1 : last] = sources[origin].splitlines()[origin_first - 1 : origin_last]
        fixed[script] = "\n".join(lines) + "\n"
    return fixed


def test_fix_copies_makes_drifted_copies_identical():
    drifted = copy_of(FAIL_BODY.replace("exit(2)", "exit(1)"))
    fixed = fix_copies({"a.py": ORIGIN, "b.py": drifted})
    assert copy_problems(fixed) == []
    assert fixed["b.py"] == copy_of(FAIL_BODY)


if __name__ == "__main__":
    # `python tests/test_copies.py --fix [SCRIPT ...]`: rewrite the marked copies (in the scripts
    # named, or in all) from their origins, as transformers' `make fix-copies` does.
    import sys

    if sys.argv[1:2] != ["--fix"]:
        sys.exit("usage: python tests/test_copies.py --fix [SCRIPT ...]")
    chosen = set(sys.argv[2:]) or set(SCRIPTS)
    for script, text in fix_copies(read_scripts()).items():
        if script in chosen and text != (ROOT / script).read_text():
            (ROOT / script).write_text(text)
            print(f"rewrote the marked copies in {script}")
