"""Pictures of the benchmarks: throughput against client threads, and latency CDFs.

    python bench/report.py [JSON ...] [--out DIR]

Reads the JSON that `bench/compare_etcd.py --json` writes (or `bench/cluster.py --json`: Sixfold
alone) and draws it with matplotlib (the Agg backend: no display is needed) into DIR (default
bench/out/, made when missing):
* throughput.png: ops/s against client threads (both axes logarithmic), puts on the left and
  gets on the right, one line per system (etcd with 1 or 3 members, Sixfold; dashed with TLS);
* latency_cdf.png: the fraction of operations that finished within a latency (logarithmic), for
  puts and gets at 1 and at 64 client threads, drawn from the latency quantiles each row carries
  (bench/harness.py CDF_QUANTILES: the minimum, every percent, 99.9% and the maximum).
Without etcd rows (etcd was not installed) Sixfold is drawn alone and the titles say so. With
several files the rows of all of them are drawn; a system found in more than one file is labelled
with its file's name. Without arguments it reads bench/results/compare_etcd.json, which
`make bench` writes.

Only puts and gets are drawn (cluster.py's batch rows are left out). A row without quantiles (a
file written before they existed) is drawn in the throughput picture only.

Exit codes: 0 pictures written; 2 bad input (a file missing, not JSON, or not the benchmarks'
shape: the message names the file and what is wrong), or an output folder that cannot be made;
3 matplotlib is not installed (`pip install -e '.[bench]'`, which `make bench` does).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_INPUTS = (os.path.join(BENCH_DIR, "results", "compare_etcd.json"),)
DEFAULT_OUT = os.path.join(BENCH_DIR, "out")
KINDS = ("put", "get")
CDF_CLIENTS = (1, 64)
FILES_MAX = 64
ROWS_MAX = 10_000  # per file: far above what a benchmark writes, so a wrong file is refused
QUANTILES_MAX = 10_000
DPI = 100
EXIT_BAD_INPUT = 2
EXIT_NO_MATPLOTLIB = 3

#: How the benchmarks' system names read in a legend; other names are shown as they are.
LABELS = {
    "etcd-1": "etcd, 1 member",
    "etcd-3": "etcd, 3 members",
    "etcd-3-tls": "etcd, 3 members, TLS",
    "sixfold": "Sixfold (TLS)",
    "sixfold-insecure": "Sixfold, plaintext",
    "sixfold-tls": "Sixfold, TLS",
    "insecure": "Sixfold, plaintext",
    "tls": "Sixfold, TLS",
    "tls+enc": "Sixfold, TLS + encryption",
}


class BadInput(Exception):
    """A benchmark JSON file that cannot be drawn; the message says which and why."""


@dataclass
class Row:
    system: str
    kind: str
    clients: int
    ops_s: float
    quantiles: tuple[float, ...] = ()  # the q of each latency below, ascending
    latency_ms: tuple[float, ...] = ()


@dataclass
class Source:
    """One JSON file, checked."""

    path: str
    rows: list[Row]
    seconds: float | None = None
    load_average: float | None = None
    cpu_count: int | None = None
    etcd_missing: str | None = None
    notes: list[str] = field(default_factory=list)


def _number(value, what: str, *, low: float = 0.0, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadInput(f"{what} is {value!r}, not a number")
    if not low <= value <= high:
        raise BadInput(f"{what} is {value!r}, outside {low:g} .. {high:g}")
    return float(value)


def _numbers(value, what: str, *, low: float = 0.0, high: float = math.inf) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) > QUANTILES_MAX:
        raise BadInput(f"{what} is not a list of at most {QUANTILES_MAX:,} numbers")
    out = tuple(_number(v, f"{what}[{i}]", low=low, high=high) for i, v in enumerate(value))
    if any(b < a for a, b in zip(out, out[1:])):
        raise BadInput(f"{what} is not in ascending order")
    return out


def parse(doc, path: str) -> Source:
    """The put and get rows of one benchmark JSON document (see the module docstring); raises
    BadInput, naming `path`, when the document is not the benchmarks' shape."""
    try:
        if not isinstance(doc, dict):
            raise BadInput(f"the top level is a {type(doc).__name__}, not an object")
        rows_in = doc.get("rows")
        if not isinstance(rows_in, list):
            raise BadInput('no "rows" list')
        if len(rows_in) > ROWS_MAX:
            raise BadInput(f"{len(rows_in):,} rows, more than {ROWS_MAX:,}")
        quantiles = ()
        if doc.get("latency_quantiles") is not None:
            quantiles = _numbers(doc["latency_quantiles"], '"latency_quantiles"', high=1.0)
        rows = []
        for i, r in enumerate(rows_in):
            where = f"rows[{i}]"
            if not isinstance(r, dict):
                raise BadInput(f"{where} is not an object")
            if r.get("kind") not in KINDS:
                continue  # batch rows and the like: not drawn
            system = r.get("system")
            if not isinstance(system, str) or not system:
                raise BadInput(f'{where} has no "system" name')
            clients = r.get("clients")
            if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
                raise BadInput(f'{where}: "clients" is {clients!r}, not a positive whole number')
            row = Row(system, r["kind"], clients, _number(r.get("ops_s"), f'{where}: "ops_s"'))
            latency = r.get("latency_quantiles_ms")
            if latency:
                if not quantiles:
                    raise BadInput(f'{where} has "latency_quantiles_ms" but the file has no "latency_quantiles"')
                row.latency_ms = _numbers(latency, f'{where}: "latency_quantiles_ms"')
                if len(row.latency_ms) != len(quantiles):
                    raise BadInput(f'{where}: {len(row.latency_ms)} latencies for {len(quantiles)} quantiles')
                row.quantiles = quantiles
            rows.append(row)
        if not rows:
            raise BadInput("no put or get rows")
        source = Source(path, rows)
        if doc.get("seconds") is not None:
            source.seconds = _number(doc["seconds"], '"seconds"')
        load = doc.get("load_average_before")
        if isinstance(load, list) and load:
            source.load_average = _number(load[0], '"load_average_before"[0]')
        if isinstance(doc.get("cpu_count"), int) and not isinstance(doc["cpu_count"], bool):
            source.cpu_count = doc["cpu_count"]
        if isinstance(doc.get("etcd_missing"), str):
            source.etcd_missing = doc["etcd_missing"]
        return source
    except BadInput as e:
        raise BadInput(f"{path}: {e}") from None


def load(path: str) -> Source:
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except OSError as e:
        raise BadInput(f"{path}: cannot read it: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: not JSON: {e}") from None
    return parse(doc, path)


def label_of(system: str) -> str:
    return LABELS.get(system, system)


def series(sources: list[Source]) -> tuple[dict[str, dict[tuple[str, int], Row]], bool]:
    """(legend label -> (kind, clients) -> row, over every file; whether a system was found in
    more than one file). Such a system gets its file's name in the label, so no line silently
    hides another."""
    files_of: dict[str, set[str]] = {}
    for s in sources:
        for r in s.rows:
            files_of.setdefault(r.system, set()).add(s.path)
    out: dict[str, dict[tuple[str, int], Row]] = {}
    for s in sources:
        for r in s.rows:
            label = label_of(r.system)
            if len(files_of[r.system]) > 1:
                label += f" ({os.path.basename(s.path)})"
            out.setdefault(label, {})[(r.kind, r.clients)] = r
    return out, any(len(f) > 1 for f in files_of.values())


def styles(labels: list[str], *, by_family: bool) -> dict[str, dict]:
    """label -> plot style. By family: Sixfold in blue, etcd in orange (red with 1 member). When a
    system comes from several files, every line gets its own colour instead, so that the same
    system twice is told apart. TLS is dashed either way."""
    out = {}
    for i, label in enumerate(labels):
        low = label.lower()
        if by_family:
            color = "tab:blue" if low.startswith("sixfold") else ("tab:red" if "1 member" in low else "tab:orange")
            if "encryption" in low:
                color = "tab:purple"
        else:
            color = f"C{i % 10}"
        out[label] = {"color": color, "linestyle": "--" if "tls" in low else "-"}
    return out


def legend_columns(labels: list[str]) -> int:
    return min(len(labels), 5 if max(map(len, labels), default=0) <= 24 else 3)


def has_etcd(sources: list[Source]) -> bool:
    return any(r.system.startswith("etcd") for s in sources for r in s.rows)


def subtitle(sources: list[Source]) -> str:
    """What the figures were measured under: seconds per point and the load, per file."""
    def measured(s: Source) -> str:
        parts = [f"{s.seconds:g} s per point"] if s.seconds is not None else []
        if s.load_average is not None:
            parts.append(f"load average {s.load_average:.1f} at the start"
                         + (f" on {s.cpu_count} cores" if s.cpu_count else ""))
        return ", ".join(parts)

    if len(sources) == 1:
        lines = [measured(sources[0])]
    else:
        lines = [f"{os.path.basename(s.path)}: {measured(s) or 'no run details'}" for s in sources]
    lines[-1] = "; ".join([x for x in (lines[-1], "100-byte values, durable (fsync)") if x])
    return "\n".join(lines)


def alone(sources: list[Source]) -> str:
    """The title's note when no file has etcd rows ("" when one has)."""
    if has_etcd(sources):
        return ""
    why = "not installed" if any(s.etcd_missing for s in sources) else "not in the data"
    return f": Sixfold alone (etcd {why})"


def plain_log_axis(axis, ticker) -> None:
    """A logarithmic axis labelled 1, 2, 5, 10, 20 ... (as numbers, not powers of ten), so that a
    range shorter than a decade still has labels (matplotlib then places linear ticks: 3.5, 4 ...)."""
    axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda x, _pos: f"{x:,.0f}" if x >= 100 else f"{x:.3g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def draw_throughput(sources: list[Source], lines: dict[str, dict[tuple[str, int], Row]], style: dict[str, dict],
                    path: str, figure_cls, ticker) -> None:
    fig = figure_cls(figsize=(10, 4.4), layout="constrained")
    axes = fig.subplots(1, 2)
    all_clients = sorted({n for rows in lines.values() for (_k, n) in rows})
    for ax, kind in zip(axes, KINDS):
        for label, rows in lines.items():
            points = sorted((n, r.ops_s) for (k, n), r in rows.items() if k == kind)
            if points:
                ax.plot([n for n, _ in points], [v for _, v in points], label=label, marker="o", markersize=4, **style[label])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        plain_log_axis(ax.yaxis, ticker)
        ax.set_xticks(all_clients, [str(n) for n in all_clients])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.set_xlabel("client threads")
        ax.set_ylabel(f"{kind}s per second")
        ax.set_title(f"{kind}s" + (" (linearizable)" if kind == "get" else ""))
        ax.grid(True, which="major", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    for h, lab in zip(*axes[1].get_legend_handles_labels()):
        if lab not in labels:
            handles.append(h)
            labels.append(lab)
    fig.legend(handles, labels, loc="outside lower center", ncol=legend_columns(labels), fontsize="small")
    fig.suptitle("Throughput against client threads" + alone(sources)
                 + "\n" + subtitle(sources), fontsize="medium")
    fig.savefig(path, dpi=DPI)


def draw_cdf(sources: list[Source], lines: dict[str, dict[tuple[str, int], Row]], style: dict[str, dict],
             path: str, figure_cls, ticker) -> None:
    fig = figure_cls(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(len(KINDS), len(CDF_CLIENTS), squeeze=False)
    handles: dict[str, object] = {}
    for i, kind in enumerate(KINDS):
        for j, n in enumerate(CDF_CLIENTS):
            ax = axes[i][j]
            drawn = 0
            for label, rows in lines.items():
                r = rows.get((kind, n))
                if r is None or not r.latency_ms:
                    continue
                # Latencies of 0 ms (below the microsecond) cannot sit on a log axis.
                xs = [max(x, 1e-3) for x in r.latency_ms]
                (h,) = ax.plot(xs, r.quantiles, label=label, drawstyle="steps-post", linewidth=1.5,
                               **style[label])
                handles.setdefault(label, h)
                drawn += 1
            if not drawn:
                ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center", color="gray")
            else:
                ax.set_xscale("log")
                plain_log_axis(ax.xaxis, ticker)
            ax.set_ylim(0, 1.0)
            ax.set_xlabel("latency (ms)")
            ax.set_ylabel("fraction of operations")
            ax.set_title(f"{kind}, {n} client" + ("" if n == 1 else "s"))
            ax.grid(True, which="major", alpha=0.3)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                   ncol=legend_columns(list(handles)), fontsize="small")
    fig.suptitle("Latency CDF (fraction of operations done within a latency)" + alone(sources)
                 + "\n" + subtitle(sources), fontsize="medium")
    fig.savefig(path, dpi=DPI)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="*", metavar="JSON",
                    help="benchmark JSON files (default: bench/results/compare_etcd.json, from make bench)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="folder for the PNG files (default: bench/out)")
    args = ap.parse_args(argv)
    inputs = args.inputs or list(DEFAULT_INPUTS)
    if len(inputs) > FILES_MAX:
        print(f"report: {len(inputs)} files, more than {FILES_MAX}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        sources = [load(p) for p in inputs]
    except BadInput as e:
        print(f"report: {e}", file=sys.stderr)
        if not args.inputs:
            print("report: run `make bench` (or bench/compare_etcd.py --json PATH) first, or name the files",
                  file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import ticker
        from matplotlib.figure import Figure
    except ImportError as e:
        print(f"report: matplotlib is not installed ({e}): .venv/bin/pip install -e '.[bench]' "
              f"(make bench does it)", file=sys.stderr)
        return EXIT_NO_MATPLOTLIB
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        print(f"report: cannot make the output folder {args.out}: {e.strerror or e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    lines, repeated = series(sources)
    style = styles(list(lines), by_family=not repeated)
    if not has_etcd(sources):
        why = next((s.etcd_missing for s in sources if s.etcd_missing), None)
        print("report: no etcd rows in the data; drawing Sixfold alone" + (f" ({why})" if why else ""))
    written = []
    for name, draw in (("throughput.png", draw_throughput), ("latency_cdf.png", draw_cdf)):
        path = os.path.join(args.out, name)
        draw(sources, lines, style, path, Figure, ticker)
        written.append(path)
    no_cdf = sorted({label for label, rows in lines.items() for (k, n), r in rows.items()
                     if n in CDF_CLIENTS and not r.latency_ms})
    if no_cdf:
        print(f"report: no latency quantiles for {', '.join(no_cdf)} (a file from before they were written): "
              f"left out of the CDF")
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
