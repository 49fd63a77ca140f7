"""Generate the performance tables of docs/performance.md from the result files in benchmarks/results/.

    python benchmarks/report.py            # rewrite the block between the markers of docs/performance.md
    python benchmarks/report.py --print    # print the markdown instead
    python benchmarks/report.py --check    # exit 1 when docs/performance.md is not what the rows give

The page's prose (how the numbers are measured and how to read them) is written by hand around the
block; the README's short headline table links into it (`#### <result file>` headings).

One table per result file kind (kernels, attention, data, inference, step): each row is one
measurement (op, pass, shape, provider) with ms, GB/s or TFLOP/s, % of the measured device ceiling,
and the speed-up over the strongest same-run baseline, the first of BASELINE measured for the same
(op, pass, shape, dtype): `flex`, then `sdpa_dense` (attention, steps), `compile_ref` (the fused
kernels; never the attention baseline while a real one ran: it is the naive fp32 reference),
`hf_compile` (inference), `eager_ref`, `padded` (native resolution: the square-padded batch); rows with a `timing` (host launches or CUDA-graph replay,
benchmarks/tune_kernels.py) are compared only with rows timed the same way. Every row names the mask its provider computed (attention:
a causal SDPA row does less work than a prefix mask). Device and date come from the rows themselves.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "performance.md"
START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
BASELINE = ("flex", "sdpa_dense", "compile_ref", "hf_compile", "eager_ref", "padded")


def load_rows(results: Path = RESULTS) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for f in sorted(results.glob("*.json")):
        try:
            rows = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"report: skipping unreadable {f.name}: {e}", file=sys.stderr)
            continue
        rows = [r for r in rows if isinstance(r, dict) and r.get("provider") and r.get("pass")] \
            if isinstance(rows, list) else []
        if rows:                       # files of other shapes (e.g. experiment logs) are not tables
            groups[f.stem] = rows
    return groups


def _fmt(x, nd=1):
    return "" if x is None else f"{x:,.{nd}f}"


def table(rows: list[dict]) -> str:
    def key(r):                       # rows timed differently (host launches / CUDA graph) never compared
        return r.get("op"), r.get("pass"), r.get("shape"), r.get("dtype"), r.get("timing")
    base = defaultdict(dict)          # key -> provider -> ms
    for r in rows:
        base[key(r)][r.get("provider")] = r.get("ms")
    out = ["| op | pass | shape | dtype | provider | mask | ms | GB/s | TFLOP/s | % ceiling | img/s | vs baseline |",
           "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ref = next(((b, base[key(r)][b]) for b in BASELINE if base[key(r)].get(b)), None)
        speed = f"{ref[1] / r['ms']:.2f}x {ref[0]}" if ref and r.get("ms") and r.get("provider") != ref[0] else ""
        out.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r.get("op"), r.get("pass") + (f" ({r['timing']})" if r.get("timing") else ""), r.get("shape"), r.get("dtype"), r.get("provider"), r.get("mask") or "",
            _fmt(r.get("ms"), 3), _fmt(r.get("gbps")), _fmt(r.get("tflops")), _fmt(r.get("pct_of_ceiling")),
            _fmt(r.get("images_per_s")), speed))
    return "\n".join(out)


def kernels_table(row: dict) -> str:
    """A step row's `top_kernels` (benchmarks/bench_step.py kernel_table) as markdown."""
    out = [f"Top GPU kernels of `{row.get('provider')}` at {row.get('shape')} (per step):", "",
           "| kernel | category | calls | ms | share | GB/s (est.) |", "|---|---|---:|---:|---:|---:|"]
    for k in row["top_kernels"]:
        name = k["name"] if len(k["name"]) <= 70 else k["name"][:67] + "..."
        out.append(f"| `{name}` | {k['category']} | {_fmt(k.get('calls'), 0)} | {_fmt(k.get('ms'), 3)} | "
                   f"{_fmt(100 * k['share'])} % | {_fmt(k.get('gbps'))} |")
    return "\n".join(out)


def render(groups: dict[str, list[dict]]) -> str:
    if not groups:
        return ("No GPU results committed yet: run `make bench` on a GPU, then "
                "`python benchmarks/report.py` to fill this section.")
    parts = []
    for name, rows in groups.items():
        dev, date = rows[0].get("device"), rows[0].get("date")
        ceil = rows[0].get("ceilings") or {}
        c = ", ".join(f"{k} {v:,.0f}" for k, v in ceil.items() if isinstance(v, (int, float)))
        parts.append(f"#### {name}\n\n{dev}, {date}" + (f" (measured ceilings: {c})" if c else "")
                     + "\n\n" + table(rows))
        parts += [kernels_table(r) for r in rows if r.get("top_kernels")]
    return "\n\n".join(parts)


def update_block(text: str, block: str, name: str = "the page") -> str:
    """`text` (a markdown page) with `block` between its START and END markers."""
    if START not in text or END not in text:
        raise ValueError(f"{name} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}\n{END}{tail}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--print", action="store_true", help="print the tables instead of writing them")
    ap.add_argument("--check", action="store_true", help="exit 1 when --doc differs from what the rows give")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--doc", default=str(DOC), help="the page whose marked block is rewritten")
    args = ap.parse_args(argv)
    block = render(load_rows(Path(args.results)))
    if args.print:
        print(block)
        return 0
    p = Path(args.doc)
    old = p.read_text()
    new = update_block(old, block, str(p))
    if args.check:
        if new != old:
            print(f"report: {p} is out of date: run python benchmarks/report.py", file=sys.stderr)
            return 1
        print(f"report: {p} is up to date")
        return 0
    p.write_text(new)
    print(f"report: updated {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
