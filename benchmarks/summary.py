"""Collect benchmarks/results/*.json into one summary.json and a markdown table (`make bench` ends here)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SKIP = {"results", "training", "sampling", "benchmark"}


def rows(report: dict) -> list[dict]:
    """The result rows of one benchmark report, whatever its layout."""
    out = []
    for key in ("results", "training", "sampling"):
        out += [r for r in report.get(key, []) if isinstance(r, dict)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    folder = Path(args.dir)
    reports = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("bench_*.json"))}
    (folder / "summary.json").write_text(json.dumps(reports, indent=1))
    lines = ["# Benchmark summary", ""]
    for name, report in reports.items():
        env = {k: v for k, v in report.items() if k not in SKIP and not isinstance(v, (list, dict))}
        lines += [f"## {name}", "", ", ".join(f"{k}: {v}" for k, v in env.items()), ""]
        table = rows(report)
        if table:
            cols = list(dict.fromkeys(k for r in table for k in r))
            lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            for r in table:
                cells = [f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    (folder / "summary.md").write_text("\n".join(lines))
    print(f"wrote {folder / 'summary.json'} and {folder / 'summary.md'}")


if __name__ == "__main__":
    main()
