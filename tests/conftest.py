"""Shared pytest set-up: hypothesis profiles, the run's seed, and a header naming the codec twin.

Keep this file small: fixtures that one area of the engine needs belong next to that area's tests.

Every run has one seed, printed in the header. Hypothesis draws from it (through
`--hypothesis-seed`) and the `rng` fixture derives each test's `random.Random` from it, so a failing
run replays with `SIXFOLD_SEED=<seed> make test` (or `pytest --hypothesis-seed=<seed>`).
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, settings

# Deadlines measure the machine more than the code (two cores, shared with other jobs), so no
# profile has one. `print_blob` prints a failing example in a form `@reproduce_failure` takes.
settings.register_profile("ci", deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, print_blob=True)
settings.register_profile("thorough", parent=settings.get_profile("ci"), max_examples=2000)
HYPOTHESIS_PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
settings.load_profile(HYPOTHESIS_PROFILE)

SEED = int(os.environ.get("SIXFOLD_SEED") or random.SystemRandom().randrange(1 << 32))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # Runs before hypothesis' own pytest_configure, which reads this option.
    if config.getoption("hypothesis_seed", None) is None:
        config.option.hypothesis_seed = str(SEED)


def pytest_report_header(config: pytest.Config) -> list[str]:
    try:
        import engine.codec
    except ImportError as exc:  # e.g. SIXFOLD_CODEC=cython without the extension: tests will say more
        twin = f"sixfold codec twin: none ({exc})"
    else:
        crc = getattr(engine.codec._impl, "CRC_BACKEND", "google_crc32c")
        twin = (
            f"sixfold codec twin: {engine.codec.IMPLEMENTATION} "
            f"(SIXFOLD_CODEC={os.environ.get('SIXFOLD_CODEC', '')!s}, crc32c via {crc})"
        )
    return [
        twin,
        f"sixfold seed: {config.getoption('hypothesis_seed')} (replay: SIXFOLD_SEED=<seed>), "
        f"hypothesis profile: {HYPOTHESIS_PROFILE}",
    ]


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """A random.Random for one test, derived from the run's seed and the test's id."""
    return random.Random(f"{request.config.getoption('hypothesis_seed')}:{request.node.nodeid}")


@pytest.fixture
def db(tmp_path):
    """A small embedded volume (4 PGs, no fsync): the default `db` of the modules that test the
    API over one (a module that needs another volume defines its own `db`)."""
    import engine

    d = engine.open(tmp_path / "v", durable=False, protection_groups=4)
    try:
        yield d
    finally:
        d.close()
