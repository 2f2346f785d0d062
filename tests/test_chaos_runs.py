"""Short fault-injection runs through the real engine: the simulation is deterministic, every
target reports valid under the default fault set, and a weakened protocol is caught."""

from __future__ import annotations

import filecmp
import json
import os

import pytest

from engine.chaos.plan import FaultEvent, FaultPlan
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
    """Acknowledging at 2 of 6 segments loses acknowledged writes; the checkers must say so.

    The plan is written by hand (faults as data) and goes beyond the failure budget on purpose:
    the writer can reach only n1 and n2 (the correct protocol refuses writes there; the weakened
    one acknowledges them), then n1 and n2 die for good and a new writer recovers from n3..n6."""
    groups = (("writer", "n1", "n2"), ("n3", "n4", "n5", "n6"))
    plan = FaultPlan(
        seed=1,
        duration_s=3.0,
        events=(
            FaultEvent(0.5, "partition", (), {"groups": groups}),
            FaultEvent(1.2, "heal", ()),
            FaultEvent(1.2, "kill", ("n1", "n2")),
            FaultEvent(1.3, "writer_crash", ("writer",), {"down_s": 0.05}),
        ),
        unbounded=True,
    )
    weak = run(RunConfig(target="sim", seed=1, duration_s=3.0, weaken="write-quorum-2", plan=plan), str(tmp_path / "weak"))
    assert weak.overall == "invalid", weak.report()
    verdicts = {v.name: v.result for v in weak.verdicts}
    assert "invalid" in (verdicts["no-lost-writes"], verdicts["linearizable"])
    # the same faults against the real protocol lose nothing: it refused those writes
    sound = run(RunConfig(target="sim", seed=1, duration_s=3.0, plan=plan), str(tmp_path / "sound"))
    assert sound.overall != "invalid", sound.report()


def test_cli_chaos_sim_exit_codes_and_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert sixfold(["chaos", "--target", "sim", "--seed", "3", "--duration", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "linearizable" in printed and "valid" in printed
    assert {"plan.json", "history.jsonl", "report.json"} <= set(os.listdir(out))
    # a protocol that reads incomplete segments: the command must say invalid (exit 5)
    assert sixfold(["chaos", "--target", "sim", "--seed", "3", "--duration", "2", "--weaken", "read-any",
                    "--out", str(tmp_path / "weak")]) == 5


@pytest.mark.cluster
def test_cluster_default_faults_valid(tmp_path):
    """Real processes, real SIGKILL/SIGSTOP, faults in the nodes' gRPC layer."""
    from engine.cluster.testing import free_base_port

    result = run(RunConfig(target="cluster", seed=7, duration_s=15.0, base_port=free_base_port()), str(tmp_path))
    assert result.overall == "valid", result.report()
    assert result.counts["ok"] > 200
    assert result.stats["faults_applied"] > 5 and result.stats["nemesis_errors"] == []
