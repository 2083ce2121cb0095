"""Tests of experiments/curves.py: the whole tool on tiny budgets, bad input, failures, reruns."""

from __future__ import annotations

import csv
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import HEADLESS_ENV, ROOT, read_scalars

CURVES = ROOT / "experiments" / "curves.py"


def load_curves():
    spec = importlib.util.spec_from_file_location("curves", CURVES)
    module = importlib.util.module_from_spec(spec)
    sys.modules["curves"] = module  # (its dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def run_tool(*argv: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CURVES), *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **HEADLESS_ENV},
        timeout=600,
    )


def read_rows(out) -> list[dict]:
    with open(out / "results.csv") as file:
        return list(csv.DictReader(file))


def reported_final_step(workdir) -> int:
    """The step of the summary line a finished run prints last: `done: <step> steps in <s>s (`."""
    stdout = (workdir / "stdout.log").read_text()
    steps = re.findall(r"^done: (\d+) steps in [0-9.]+s \(", stdout, re.MULTILINE)
    assert len(steps) == 1, stdout[-2000:]
    return int(steps[0])


def assert_steps_per_second(row: dict, steps: int) -> None:
    assert float(row["steps_per_s"]) == pytest.approx(steps / float(row["wall_s"]), rel=0.02)


def test_two_scripts_two_seeds_and_the_peer_are_plotted_and_tabled_from_their_scalars(tmp_path):
    out = tmp_path / "out"
    result = run_tool(
        "--scripts", "ppo_cartpole", "qlearning_cartpole", "--seeds", "1", "2",
        "--total-timesteps", "2048", "--peers", "--jobs", "2", "--out", str(out), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "ppo_cartpole.png").stat().st_size > 10_000
    assert (out / "qlearning_cartpole.png").stat().st_size > 10_000
    rows = read_rows(out)
    scripts = ("ppo_cartpole", "qlearning_cartpole", "sb3_ppo")
    runs = [(script, seed) for script in scripts for seed in ("1", "2")]
    assert sorted((row["script"], row["seed"]) for row in rows) == sorted(runs)
    for row in rows:
        # The table's figures are the run's own TensorBoard scalars and summary line, read here
        # independently.
        workdir = out / "runs" / row["script"] / f"seed-{row['seed']}"
        scalars = read_scalars(workdir / "runs")
        returns = [value for _, value in scalars["eval/episodic_return"]]
        assert float(row["eval_return"]) == pytest.approx(np.mean(returns))
        assert float(row["eval_return_std"]) == pytest.approx(np.std(returns))
        final_step = reported_final_step(workdir)
        assert int(row["steps"]) == final_step
        assert_steps_per_second(row, final_step)
        assert row["error"] == ""
    ours = [row for row in rows if row["script"] == "ppo_cartpole"]
    assert all(int(row["steps"]) == 2048 for row in ours)  # the budget given on the command line
    table = (out / "results.md").read_text()
    per_seed = [float(row["eval_return"]) for row in ours]
    summary = f"| ppo_cartpole | {np.mean(per_seed):.1f} ± {np.std(per_seed):.1f} |"
    assert summary in table and "| sb3_ppo |" in table
    assert "![ppo_cartpole](ppo_cartpole.png)" in table


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--scripts", "ppo_cartpol"], "unknown script 'ppo_cartpol'"),
        (["--seeds"], "--seeds is empty"),
        (["--scripts"], "--scripts is empty"),
        (["--jobs", "0"], "--jobs must be positive"),
        (["--scripts", "actor_critic", "actor_critic"], "--scripts repeats a script"),
        (["--out", "a-file/curves"], "cannot write to --out a-file/curves"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, argv, message):
    (tmp_path / "a-file").write_text("not a folder")
    result = run_tool(*argv, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "curves").exists()


def test_a_failing_run_is_reported_and_the_others_still_plot(tmp_path, monkeypatch, capsys):
    curves = load_curves()
    real_command = curves.command_for

    def command_for(args, script, seed, workdir):
        if seed == 2:  # this run dies, as a crash would
            return [
                sys.executable,
                "-c",
                "import sys; print('boom: seed 2 broke', file=sys.stderr); sys.exit(3)",
            ]
        return real_command(args, script, seed, workdir)

    monkeypatch.setattr(curves, "command_for", command_for)
    out = tmp_path / "out"
    code = curves.main(
        [
            "--scripts",
            "qlearning_cartpole",
            "--seeds",
            "1",
            "2",
            "--total-timesteps",
            "2000",
            "--out",
            str(out),
        ]
    )
    assert code == 1
    assert (
        "error: qlearning_cartpole seed 2 failed (exit status 3: boom: seed 2 broke)"
        in capsys.readouterr().err
    )
    assert (out / "qlearning_cartpole.png").stat().st_size > 10_000
    rows = {row["seed"]: row for row in read_rows(out)}
    assert rows["2"]["error"].startswith("exit status 3") and rows["1"]["error"] == ""
    assert float(rows["1"]["eval_return"]) > 0
    assert "2: failed" in (out / "results.md").read_text()


def test_steps_are_the_final_step_each_run_reports_not_its_last_logged_scalar(tmp_path):
    curves = load_curves()
    out = tmp_path / "out"
    argv = ["--scripts", "actor_critic", "--seeds", "1", "--total-timesteps", "2000"]
    argv += ["--out", str(out)]
    assert curves.main([*argv, "--", "--eval-episodes", "2"]) == 0
    workdir = out / "runs" / "actor_critic" / "seed-1"
    final_step = reported_final_step(workdir)
    scalars = read_scalars(workdir / "runs")
    charts = [points for key, points in scalars.items() if key.startswith("charts/")]
    assert max(points[-1][0] for points in charts) < final_step  # its last charts/ came earlier
    (row,) = read_rows(out)
    assert int(row["steps"]) == final_step
    assert_steps_per_second(row, final_step)


def test_a_run_without_its_summary_line_has_no_steps_and_says_so(tmp_path, monkeypatch, capsys):
    curves = load_curves()
    silent = [sys.executable, "-c", "print('trained, but no summary line')"]
    monkeypatch.setattr(curves, "command_for", lambda args, script, seed, workdir: silent)
    out = tmp_path / "out"
    assert curves.main(["--scripts", "qlearning_cartpole", "--seeds", "1", "--out", str(out)]) == 0
    (row,) = read_rows(out)
    assert row["steps"] == "" and row["steps_per_s"] == "" and row["error"] == ""
    err = capsys.readouterr().err
    assert "qlearning_cartpole seed 1 printed no `done: <step> steps` line" in err, err
    assert "steps not reported: seed 1" in (out / "results.md").read_text()


def test_a_rerun_into_the_same_out_replaces_the_earlier_run_and_says_so(tmp_path, capsys):
    curves = load_curves()
    out = tmp_path / "out"
    argv = ["--scripts", "qlearning_cartpole", "--seeds", "1", "--total-timesteps", "2000"]
    argv += ["--out", str(out)]
    assert curves.main([*argv, "--", "--eval-episodes", "3"]) == 0
    assert "replacing" not in capsys.readouterr().out
    assert curves.main([*argv, "--", "--eval-episodes", "2"]) == 0
    printed = capsys.readouterr().out

    # The table is the second run's evaluation alone (2 episodes, not 3 + 2), read here from the
    # events of the one run left in the folder.
    (row,) = read_rows(out)
    runs = out / "runs" / "qlearning_cartpole" / "seed-1" / "runs"
    events = sorted(runs.rglob("events.out.tfevents.*"))
    assert len(events) == 1, events
    returns = [value for _, value in read_scalars(events[0].parent)["eval/episodic_return"]]
    assert len(returns) == 2
    assert float(row["eval_return"]) == pytest.approx(np.mean(returns))
    assert float(row["eval_return_std"]) == pytest.approx(np.std(returns))
    assert "replacing the earlier run in --out of qlearning_cartpole seed 1" in printed, printed


def read_scalars_record(path) -> dict[str, list[tuple[int, float]]]:
    scalars: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as file:
        for row in csv.DictReader(file):
            scalars.setdefault(row["tag"], []).append((int(row["step"]), float(row["value"])))
    return scalars


def test_add_tables_a_new_seed_with_the_runs_recorded_in_out(tmp_path, monkeypatch):
    """Each seed lands as it ends, on any machine: --add reads the earlier seeds back from the
    records --out keeps beside its figures (runs.json and each run's scalars CSV; runs/ is not
    committed) and tables and plots them with the new one, each with the settings it was given, and
    those of another script beside them; without --add, only the new one."""
    curves = load_curves()
    out = tmp_path / "out"
    argv = ["--scripts", "qlearning_cartpole", "--total-timesteps", "2000", "--out", str(out)]
    assert curves.main([*argv, "--seeds", "1", "--", "--eval-episodes", "2"]) == 0
    first = read_rows(out)
    events = read_scalars(out / "runs" / "qlearning_cartpole" / "seed-1" / "runs")
    recorded = read_scalars_record(out / "qlearning_cartpole_seed-1_scalars.csv")
    assert sorted(recorded) == ["charts/episodic_return", "eval/episodic_return"]
    for tag, points in recorded.items():
        assert [step for step, _ in points] == [step for step, _ in events[tag]]
        assert np.allclose([value for _, value in points], [value for _, value in events[tag]])
    shutil.rmtree(out / "runs")  # as on a fresh clone: the records alone are left

    plotted = {}
    plot_script = curves.plot_script

    def record_plot(script, runs, path):
        plotted.update({run.seed: run.scalars for run in runs})
        plot_script(script, runs, path)

    monkeypatch.setattr(curves, "plot_script", record_plot)
    assert curves.main([*argv, "--seeds", "2", "--add", "--", "--eval-episodes", "3"]) == 0
    rows = {row["seed"]: row for row in read_rows(out)}
    assert sorted(rows) == ["1", "2"]
    assert rows["1"] == first[0]  # the earlier run as it was tabled: steps and wall time included
    workdir = out / "runs" / "qlearning_cartpole" / "seed-2"
    returns = [value for _, value in read_scalars(workdir / "runs")["eval/episodic_return"]]
    assert len(returns) == 3
    assert float(rows["2"]["eval_return"]) == pytest.approx(np.mean(returns))
    assert rows["2"]["settings"] == "--total-timesteps 2000, --eval-episodes 3"
    curve = [(step, value) for step, _, value in plotted[1]["charts/episodic_return"]]
    assert curve == recorded["charts/episodic_return"]
    table = (out / "results.md").read_text()
    assert table.startswith(
        "Seeds 1, 2; default settings and, per run, "
        "qlearning_cartpole seed 1: --total-timesteps 2000, --eval-episodes 2; "
        "qlearning_cartpole seed 2: --total-timesteps 2000, --eval-episodes 3; "
    ), table
    assert "1: " in table and "2: " in table
    # Another script added to the same --out is tabled after them, their rows as they were.
    other = ["--scripts", "actor_critic", "--seeds", "1", "--total-timesteps", "2000"]
    assert curves.main([*other, "--out", str(out), "--add", "--", "--eval-episodes", "2"]) == 0
    tabled = read_rows(out)
    assert [(row["script"], row["seed"]) for row in tabled] == [
        ("qlearning_cartpole", "1"),
        ("qlearning_cartpole", "2"),
        ("actor_critic", "1"),
    ]
    assert tabled[:2] == [rows["1"], rows["2"]]
    table = (out / "results.md").read_text()
    assert "![actor_critic](actor_critic.png)" in table, table
    assert "![qlearning_cartpole](qlearning_cartpole.png)" in table, table
    assert curves.main([*argv, "--seeds", "3", "--", "--eval-episodes", "2"]) == 0
    assert [row["seed"] for row in read_rows(out)] == ["3"]
    assert (
        (out / "results.md")
        .read_text()
        .startswith("Seeds 3; default settings, --total-timesteps 2000, --eval-episodes 2; ")
    )
    assert [path.name for path in out.glob("*_scalars.csv")] == [
        "qlearning_cartpole_seed-3_scalars.csv"
    ]
