"""Short fault-injection runs through the real engine: the simulation is deterministic, every
target reports valid under the default fault set, and a weakened protocol is caught."""

from __future__ import annotations

import filecmp
import json
import os

import pytest

from engine.chaos.runner import RunConfig, run
from engine.cli import main as sixfold


def test_sim_same_seed_gives_byte_identical_history(tmp_path):
    cfg = RunConfig(target="sim", seed=11, duration_s=2.0, ops_max=1500)
    a = run(cfg, str(tmp_path / "a"))
    b = run(cfg, str(tmp_path / "b"))
    assert filecmp.cmp(tmp_path / "a" / "history.jsonl", tmp_path / "b" / "history.jsonl", shallow=False)
    assert filecmp.cmp(tmp_path / "a" / "plan.json", tmp_path / "b" / "plan.json", shallow=False)
    assert a.overall == b.overall == "valid"
    assert a.counts["ok"] > 100


def test_sim_other_seed_gives_another_history(tmp_path):
    run(RunConfig(target="sim", seed=1, duration_s=1.0, ops_max=500), str(tmp_path / "a"))
    run(RunConfig(target="sim", seed=2, duration_s=1.0, ops_max=500), str(tmp_path / "b"))
    assert not filecmp.cmp(tmp_path / "a" / "history.jsonl", tmp_path / "b" / "history.jsonl", shallow=False)


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_sim_default_faults_valid(tmp_path, seed):
    result = run(RunConfig(target="sim", seed=seed, duration_s=3.0, ops_max=2500), str(tmp_path))
    assert result.overall == "valid", result.report()
    names = {v.name: v.result for v in result.verdicts}
    assert names["replicas-converge"] == "valid" and names["no-lost-writes"] == "valid"
    assert result.stats["faults_applied"] > 0


def test_embedded_default_faults_valid(tmp_path):
    result = run(RunConfig(target="embedded", seed=7, duration_s=8.0), str(tmp_path))
    assert result.overall == "valid", result.report()
    assert result.counts["ok"] > 500
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["overall"] == "valid" and report["config"]["seed"] == 7


def test_weakened_read_quorum_is_caught(tmp_path):
    """Reading from any single segment, complete or not, must produce a stale read the checker sees."""
    caught = []
    for seed in range(1, 6):
        result = run(RunConfig(target="sim", seed=seed, duration_s=3.0, weaken="read-any", ops_max=2500), str(tmp_path / str(seed)))
        if result.overall == "invalid":
            caught.append(seed)
            break
    assert caught, "a protocol that reads incomplete segments went unnoticed for 5 seeds"


def test_weakened_write_quorum_is_caught(tmp_path):
    """Acknowledging at 2 of 6 segments must lose an acknowledged write under kills and writer crashes."""
    caught = []
    for seed in range(1, 13):
        result = run(
            RunConfig(target="sim", seed=seed, duration_s=3.0, weaken="write-quorum-2", faults=("kill", "az", "az+1", "writer-crash"), ops_max=2500),
            str(tmp_path / str(seed)),
        )
        if result.overall == "invalid":
            caught.append(seed)
            break
    assert caught, "a protocol that acknowledges at 2 of 6 went unnoticed for 12 seeds"


def test_cli_chaos_sim_exit_codes_and_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert sixfold(["chaos", "--target", "sim", "--seed", "3", "--duration", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "linearizable" in printed and "valid" in printed
    assert {"plan.json", "history.jsonl", "report.json"} <= set(os.listdir(out))
    assert sixfold(["chaos", "--target", "sim", "--seed", "3", "--duration", "2", "--weaken", "read-any",
                    "--out", str(tmp_path / "weak")]) in (0, 1)
