"""Long fault-injection runs, outside the default suite: `make soak` (pytest -m soak)."""

from __future__ import annotations

import os

import pytest

from engine.chaos.runner import RunConfig, run

pytestmark = pytest.mark.soak

SOAK_SEEDS = int(os.environ.get("SIXFOLD_SOAK_SEEDS", "50"))
SOAK_SECONDS = float(os.environ.get("SIXFOLD_SOAK_SECONDS", "60"))


def test_sim_many_seeds(tmp_path):
    failing = []
    for seed in range(1, SOAK_SEEDS + 1):
        result = run(RunConfig(target="sim", seed=seed, duration_s=5.0), str(tmp_path / f"seed-{seed}"))
        if result.overall == "invalid":
            failing.append(seed)
    assert failing == [], f"seeds with an invalid history: {failing} (replay: sixfold chaos --target sim --seed N)"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_embedded_long(tmp_path, seed):
    result = run(RunConfig(target="embedded", seed=seed, duration_s=SOAK_SECONDS, clients=8), str(tmp_path))
    assert result.overall != "invalid", result.report()


@pytest.mark.cluster
def test_cluster_long(tmp_path):
    result = run(RunConfig(target="cluster", seed=1, duration_s=SOAK_SECONDS, clients=8, base_port=7800), str(tmp_path))
    assert result.overall != "invalid", result.report()
