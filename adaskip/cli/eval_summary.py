"""adaskip-eval-summary: several adaskip-eval reports' matched-speed verdicts in one table (adaskip/eval/summary.py).

    adaskip-eval-summary docs/quality-paired-*-*.json --doc docs/quality.md

Reads the data JSON each `adaskip-eval --doc D.md` run writes beside D.md (`D-<model>.json`) and writes one table
(per model, prompt length and phase: the AdaSkip selection, the baselines run, the paired verdicts at every matched
ideal speedup up to --up-to) into the document's generated block, keeping the rest of the document.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from adaskip.cli.common import ArgumentParser, HelpFormatter, main_wrapper
from adaskip.errors import InputError
from adaskip.eval.report import TARGET_SPEEDUP
from adaskip.eval.summary import write_summary


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="adaskip-eval-summary", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("reports", nargs="+", help="report data files (`adaskip-eval --doc D.md` writes D-<model>.json)")
    p.add_argument("--doc", required=True, help="markdown document to write the table into (its other text is kept)")
    p.add_argument("--up-to", type=float, default=TARGET_SPEEDUP,
                   help="compare at matched ideal speedups up to this (the quality target's limit)")
    return p


@main_wrapper("adaskip-eval-summary")
def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if not 1.0 < a.up_to < math.inf:
        raise InputError(f"--up-to {a.up_to} must be a finite ideal speedup above 1")
    section = write_summary([Path(p) for p in a.reports], Path(a.doc), a.up_to)
    print(section)
    print(f"adaskip-eval-summary: wrote the table of {len(a.reports)} reports into {a.doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
