"""Where two training runs part: each stage's identity from their ``fingerprints.json``, side by side.

    sppnet compare-runs RUN_A RUN_B      (run folders or fingerprints.json files)

Prints each stage's identity in both runs, the first stage that differs (the later stages that use
its output differ with it) and the environment entries that differ (library versions, CPU instruction sets, the
kernels torch and OpenCV chose, thread counts). Exit code 0 when the runs are identical, 1 when they
part, 2 for a missing or unreadable file.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detector.cli import run_tool
from detector.engine.compare_runs import compare_runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_a", type=Path, help="a run folder (output_dir) or its fingerprints.json")
    ap.add_argument("run_b", type=Path)
    args = ap.parse_args(argv)
    result: list[int] = []

    def body() -> None:
        report = compare_runs(args.run_a, args.run_b)
        print(report.text())
        result.append(0 if report.first_difference is None else 1)

    rc = run_tool(body)
    return rc if rc or not result else result[0]


if __name__ == "__main__":
    sys.exit(main())
