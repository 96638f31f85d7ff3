"""Two scorecards side by side (e.g. the default suite from an empty cache with two training seeds).

    python scripts/compare_scorecards.py results/scorecard.csv runs/stability/scorecard.csv [--kind paper]

Prints a Markdown table: reproduction, id, kind, status in each run, and whether a claim flipped between
pass and fail (the stability rule of the scorecard: a paper claim may move between pass and inconclusive,
never between pass and fail)."""
from __future__ import annotations

import argparse
import sys

import pandas as pd


def compare(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    m = a.merge(b, on=["reproduction", "id", "kind"], how="outer", suffixes=("_a", "_b"))
    m = m.fillna({"status_a": "(absent)", "status_b": "(absent)"})
    m["flip"] = [{sa, sb} == {"pass", "fail"} for sa, sb in zip(m["status_a"], m["status_b"])]
    return m[["reproduction", "id", "kind", "status_a", "status_b", "flip"]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a", help="first scorecard.csv")
    p.add_argument("b", help="second scorecard.csv")
    p.add_argument("--kind", default=None, help="only claims of this kind (paper, sanity, target)")
    p.add_argument("--names", default="run A,run B", help="column names of the two runs (comma-separated)")
    args = p.parse_args(argv)
    a = pd.read_csv(args.a, keep_default_na=False)
    b = pd.read_csv(args.b, keep_default_na=False)
    m = compare(a, b)
    if args.kind:
        m = m[m["kind"] == args.kind]
    na, nb = args.names.split(",", 1)
    print(f"| reproduction | id | kind | {na} | {nb} | pass<->fail |")
    print("|---|---|---|---|---|---|")
    for r in m.itertuples(index=False):
        print(f"| {r.reproduction} | `{r.id}` | {r.kind} | {r.status_a} | {r.status_b} | {'**FLIP**' if r.flip else ''} |")
    flips = int(m.loc[m["kind"] == "paper", "flip"].sum())
    print(f"\npaper claims flipped between pass and fail: {flips}")
    return 1 if flips else 0


if __name__ == "__main__":
    sys.exit(main())
