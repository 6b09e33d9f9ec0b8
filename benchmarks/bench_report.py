"""Run `cxrkit bench` and store its rows as a report (benchmarks/reports/NAME.json: date, machine, code).

    /work/bin/quiet-run python benchmarks/bench_report.py bench-cpu-DATE \
        --model cxr29-demo --images 16 --repeat 3 --formats jpeg,png16,dicom,dicom-j2k

Everything after NAME goes to `cxrkit bench` unchanged; the report holds its rows (cxrkit, fair and
serial baselines, ratios, decode floor, stage times), the model's version and sha256 entries, and
what run_report records (UTC times, machine, load, commit and whether the tree had uncommitted changes).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_report import now_utc, write_report


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    name, bench_args = argv[0], argv[1:]
    from cxrkit.cli import build_parser
    from cxrkit.models import load_model_package

    started = now_utc()
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "rows.json"
        args = build_parser().parse_args(["bench", *bench_args, "--json", str(out)])
        rc = args.fn(args)
        rows = json.loads(out.read_text())
    pkg = load_model_package(rows[0]["model"])
    path = write_report(name, {"cxrkit_bench_args": bench_args, "model_version": pkg.card.raw.get("version"),
                               "model_sha256": pkg.card.raw["sha256"], "rows": rows}, started)
    print("report:", path)
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
