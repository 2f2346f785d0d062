"""bench/report.py draws the benchmarks' JSON as PNG files, and refuses a file it cannot draw.

Runs the real script as a process on small synthetic JSON of the shape bench/compare_etcd.py
writes (no cluster, no etcd). The quantiles come from bench/harness.py itself, so the harness's
CDF and the report's reading of it are checked together. The drawing tests need matplotlib (the
`bench` extra, which `make bench` installs); the refusals are checked before matplotlib is
imported, so they run without it.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT = os.path.join(REPO, "bench", "report.py")
sys.path.insert(0, os.path.join(REPO, "bench"))

import harness  # noqa: E402  (bench/harness.py)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLIENTS = (1, 4, 16, 64)


def row(system: str, kind: str, clients: int, ops_s: float, base_ms: float) -> dict:
    # A spread of latencies around base_ms with a tail, as a run would measure them.
    latencies_s = [base_ms * (1 + (i % 97) / 50 + (i % 1000 == 0) * 20) / 1e3 for i in range(2_000)]
    p50, p99, mx = harness.stats_ms(latencies_s)
    return {"name": f"{system} {kind}, {clients} clients", "system": system, "kind": kind, "clients": clients,
            "ops_s": ops_s, "p50_ms": p50, "p99_ms": p99, "max_ms": mx, "errors": 0,
            "latency_quantiles_ms": list(harness.quantiles_ms(latencies_s))}


def document(systems=("etcd-3", "sixfold-insecure"), etcd_missing=None) -> dict:
    rows = []
    for s_i, system in enumerate(systems):
        for kind in ("put", "get"):
            for n in CLIENTS:
                rows.append(row(system, kind, n, ops_s=300.0 * n ** 0.7 * (1 + s_i), base_ms=1.5 * n ** 0.5 * (1 + s_i)))
    rows.append({"system": "sixfold", "kind": "batch", "clients": 4, "ops_s": 1e5})  # not drawn, not refused
    return {"seed": 1, "seconds": 1.0, "clients": list(CLIENTS), "etcd_missing": etcd_missing,
            "load_average_before": [1.5, 1.2, 1.0], "cpu_count": 2,
            "latency_quantiles": list(harness.CDF_QUANTILES), "rows": rows}


def write(tmp_path, name: str, doc) -> str:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


def report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, REPORT, *args], capture_output=True, text=True, timeout=300)


def png_size(path: str) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the signature."""
    with open(path, "rb") as fh:
        head = fh.read(24)
    assert head[:8] == PNG_SIGNATURE, head[:8]
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_harness_quantiles_are_nearest_rank_from_minimum_to_maximum():
    latencies_s = [i / 1e3 for i in range(1, 1001)]  # 1 .. 1000 ms
    q = harness.quantiles_ms(latencies_s[::-1])  # any order in
    assert len(q) == len(harness.CDF_QUANTILES) == 102
    assert q[0] == 1.0 and q[-1] == 1000.0
    assert q[harness.CDF_QUANTILES.index(0.5)] == 501.0
    assert q[harness.CDF_QUANTILES.index(0.999)] == 1000.0
    assert list(q) == sorted(q)
    assert harness.quantiles_ms([]) == ()


def test_report_draws_throughput_and_cdf_pngs(tmp_path):
    pytest.importorskip("matplotlib", reason="the `bench` extra: pip install -e '.[bench]' (make bench does it)")
    src = write(tmp_path, "compare.json", document())
    out = tmp_path / "out"
    done = report(src, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(out)) == ["latency_cdf.png", "throughput.png"]
    assert png_size(str(out / "throughput.png")) == (1000, 440)
    assert png_size(str(out / "latency_cdf.png")) == (1000, 700)
    for name in ("throughput.png", "latency_cdf.png"):
        assert os.path.getsize(out / name) > 20_000, name  # lines, labels and a legend, not a blank canvas
    assert "Sixfold alone" not in done.stdout


def test_report_draws_sixfold_alone_when_etcd_is_missing(tmp_path):
    pytest.importorskip("matplotlib", reason="the `bench` extra: pip install -e '.[bench]' (make bench does it)")
    src = write(tmp_path, "alone.json", document(systems=("sixfold-insecure",), etcd_missing="etcd is not installed"))
    out = tmp_path / "out"
    done = report(src, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "drawing Sixfold alone (etcd is not installed)" in done.stdout
    assert png_size(str(out / "throughput.png")) == (1000, 440)
    assert os.path.getsize(out / "latency_cdf.png") > 20_000


@pytest.mark.parametrize("doc, says", [
    ('{"rows": [', "not JSON"),
    ([1, 2], "the top level is a list"),
    ({"rows": {}}, 'no "rows" list'),
    ({"rows": [{"system": "etcd-3", "kind": "put", "clients": 0, "ops_s": 1.0}]}, '"clients" is 0'),
    ({"rows": [{"system": "etcd-3", "kind": "put", "clients": 1, "ops_s": "fast"}]}, "'fast', not a number"),
    ({"rows": [{"system": "etcd-3", "kind": "batch", "clients": 1, "ops_s": 1.0}]}, "no put or get rows"),
    ({"latency_quantiles": [0.5, 1.0],
      "rows": [{"system": "etcd-3", "kind": "get", "clients": 1, "ops_s": 1.0, "latency_quantiles_ms": [1.0]}]},
     "1 latencies for 2 quantiles"),
    ({"latency_quantiles": [0.5, 1.0],
      "rows": [{"system": "etcd-3", "kind": "get", "clients": 1, "ops_s": 1.0, "latency_quantiles_ms": [2.0, 1.0]}]},
     "not in ascending order"),
])
def test_report_refuses_a_malformed_json_with_exit_code_2(tmp_path, doc, says):
    good = write(tmp_path, "good.json", document())
    bad = write(tmp_path, "bad.json", doc)
    out = tmp_path / "out"
    done = report(good, bad, "--out", str(out))
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert f"{bad}: " in done.stderr and says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()  # nothing half-drawn


def test_report_refuses_a_missing_file_with_exit_code_2(tmp_path):
    missing = str(tmp_path / "nowhere.json")
    done = report(missing, "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert f"{missing}: cannot read it" in done.stderr and "Traceback" not in done.stderr


def test_a_system_found_in_two_files_is_labelled_with_each_file(tmp_path):
    import report  # bench/report.py: its reading of the files, without drawing

    first = report.load(write(tmp_path, "monday.json", document()))
    second = report.load(write(tmp_path, "tuesday.json", document(systems=("sixfold-insecure",))))
    lines, repeated = report.series([first, second])
    assert repeated
    assert sorted(lines) == ["Sixfold, plaintext (monday.json)", "Sixfold, plaintext (tuesday.json)", "etcd, 3 members"]
    assert sorted(lines["etcd, 3 members"]) == [(k, n) for k in ("get", "put") for n in CLIENTS]
    assert len({s["color"] for s in report.styles(list(lines), by_family=False).values()}) == 3
