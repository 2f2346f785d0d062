"""Long fault-injection runs, outside the default suite: `make soak` (pytest -m soak)."""

from __future__ import annotations

import os

import pytest

from engine.chaos.runner import RunConfig, run

pytestmark = pytest.mark.soak

SOAK_SEEDS = int(os.environ.get("SIXFOLD_SOAK_SEEDS", "50"))
SOAK_SECONDS = float(os.environ.get("SIXFOLD_SOAK_SECONDS", "60"))
#: The sim's default duration (`sixfold chaos --target sim`), at which the README's catch rates
#: were measured.
SIM_SECONDS = 5.0


def _verdicts(tmp_path, seeds, **config) -> dict[int, str]:
    out = {}
    for seed in seeds:
        result = run(RunConfig(target="sim", seed=seed, duration_s=SIM_SECONDS, **config), str(tmp_path / f"seed-{seed}"))
        out[seed] = result.overall
    return out


def test_sim_many_seeds(tmp_path):
    """The real protocol, default faults, seeds 1..SOAK_SEEDS (50): never invalid."""
    verdicts = _verdicts(tmp_path, range(1, SOAK_SEEDS + 1))
    failing = [s for s, v in verdicts.items() if v == "invalid"]
    assert failing == [], f"seeds with an invalid history: {failing} (replay: sixfold chaos --target sim --seed N)"


def test_weakened_write_quorum_caught_in_most_of_seeds_1_to_10(tmp_path):
    """Finding 9, the README's number: `--weaken write-quorum-2`, one run per seed, is invalid in at
    least half of seeds 1-10 (measured: all ten on this branch, nine with the finding-2 fix)."""
    verdicts = _verdicts(tmp_path, range(1, 11), weaken="write-quorum-2")
    caught = [s for s, v in verdicts.items() if v == "invalid"]
    assert len(caught) >= 5, f"caught only in seeds {caught}"


def test_weakened_read_any_caught_in_every_seed_1_to_10(tmp_path):
    verdicts = _verdicts(tmp_path, range(1, 11), weaken="read-any")
    assert [s for s, v in verdicts.items() if v != "invalid"] == []


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_embedded_long(tmp_path, seed):
    result = run(RunConfig(target="embedded", seed=seed, duration_s=SOAK_SECONDS, clients=8), str(tmp_path))
    assert result.overall != "invalid", result.report()


@pytest.mark.cluster
def test_cluster_long(tmp_path):
    result = run(RunConfig(target="cluster", seed=1, duration_s=SOAK_SECONDS, clients=8, base_port=7800), str(tmp_path))
    assert result.overall != "invalid", result.report()


@pytest.mark.cluster
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_cluster_failovers_long(tmp_path, seed):
    """Writer kills, pauses and partitions answered by readers taking over, reader kills, with
    the node faults too (every family), SOAK_SECONDS each: never invalid, every writer fault
    applied had a reader to take over."""
    from engine.chaos.plan import FAULT_NAMES
    from engine.cluster.testing import free_base_port

    print(f"chaos seed {seed}")
    result = run(RunConfig(target="cluster", seed=seed, duration_s=SOAK_SECONDS, clients=8, faults=FAULT_NAMES,
                           base_port=free_base_port(count=24)), str(tmp_path))
    assert result.overall != "invalid", result.report()
    assert not any(r.get("skipped") for r in result.stats.get("failovers", ())), result.stats["failovers"]


@pytest.mark.cluster
def test_cluster_replica_reads_through_the_reader_endpoint(tmp_path):
    """The same writer faults with the clients reading through `engine.connect(folder,
    role="reader")` (round_robin): everything but session monotonicity must hold; that one is
    not promised across readers (tests/test_readers.py), so it is reported, not asserted."""
    from engine.cluster.testing import free_base_port

    result = run(RunConfig(target="cluster", seed=1, duration_s=SOAK_SECONDS, clients=8,
                           faults=("writer-kill", "writer-pause", "writer-partition", "reader-kill"),
                           replica_reads="endpoint", base_port=free_base_port(count=24)), str(tmp_path))
    bad = [v for v in result.verdicts if v.result == "invalid" and v.name != "replica-reads-monotonic"]
    assert bad == [], result.report()
