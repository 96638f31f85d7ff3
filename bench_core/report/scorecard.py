"""Reproduction scorecard: every registered reproduction's claims checked against our records.

Each ``Claim.check`` receives the records of the whole run as a DataFrame (``records_df``: every
``Record`` column is present even when there are no records; it is up to the check to filter by
``reproduction``, ``status`` and so on).  A check that raises, or returns something that is not a
result, is an "error" row with the message in "ours": the scorecard never crashes a report.
"""
from __future__ import annotations

from typing import Any

import pandas as pd

from bench_core.report.leaderboard import as_dicts, load_registry, markdown_table, records_df

COLUMNS = ["reproduction", "claim_id", "claim", "reported", "ours", "status"]
STATUSES = ("pass", "fail", "not run", "error")
_STATUS_ALIASES = {"passed": "pass", "ok": "pass", "failed": "fail", "not_run": "not run", "notrun": "not run",
                   "skip": "not run", "skipped": "not run", "not-run": "not run"}


def _one_line(msg: Any, limit: int = 300) -> str:
    s = " ".join(str(msg).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _normalise(result: Any) -> tuple[str, str]:
    status = getattr(result, "status", None)
    ours = getattr(result, "ours", None)
    if status is None and isinstance(result, (tuple, list)) and len(result) == 2:
        status, ours = result
    if status is None:
        return "error", f"check returned {type(result).__name__}, not a ClaimResult"
    status = str(status).strip().lower()
    status = _STATUS_ALIASES.get(status, status)
    if status not in STATUSES:
        return "error", f"check returned unknown status {status!r}" + (f"; ours: {ours}" if ours else "")
    return status, "" if ours is None else str(ours)


def scorecard(records: list[dict]) -> pd.DataFrame:
    """One row per claim of every registered reproduction (sorted by reproduction name, claims in
    declaration order): reproduction, claim_id, claim, reported, ours, status."""
    reps, load_errors = load_registry()
    df = records_df(as_dicts(records))
    rows = []
    for module, msg in load_errors:
        rows.append({"reproduction": module, "claim_id": "(import)", "claim": "reproduction module imports",
                     "reported": "", "ours": _one_line(msg), "status": "error"})
    for name, rep in reps.items():
        try:
            claims = list(rep.claims())
        except Exception as e:  # noqa: BLE001
            rows.append({"reproduction": name, "claim_id": "(claims)", "claim": "claims() of the reproduction",
                         "reported": "", "ours": _one_line(f"{type(e).__name__}: {e}"), "status": "error"})
            continue
        for c in claims:
            try:
                status, ours = _normalise(c.check(df.copy()))
            except Exception as e:  # noqa: BLE001 - a broken check is an error row, not a crash
                status, ours = "error", f"{type(e).__name__}: {e}"
            rows.append({"reproduction": name, "claim_id": str(c.id), "claim": str(c.text),
                         "reported": str(c.reported), "ours": _one_line(ours), "status": status})
    return pd.DataFrame(rows, columns=COLUMNS).astype(object)


def status_counts(df: pd.DataFrame) -> dict[str, int]:
    counts = {s: int((df["status"] == s).sum()) for s in STATUSES} if len(df) else {s: 0 for s in STATUSES}
    return counts


def scorecard_markdown(df: pd.DataFrame) -> str:
    """The scorecard as a Markdown summary line plus one table."""
    if df is None or len(df) == 0:
        return "_No claims registered._\n"
    counts = status_counts(df)
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n or s in ("pass", "fail"))
    table = df.assign(
        status=[f"**{s}**" if s in ("fail", "error") else s for s in df["status"]],
        claim_id=[f"`{c}`" for c in df["claim_id"]],
    )[["reproduction", "claim_id", "claim", "reported", "ours", "status"]]
    md = markdown_table(table, headers={"claim_id": "id", "reported": "paper", "ours": "ours (this run)"},
                        formatters={c: (lambda v: "" if v is None else str(v)) for c in table.columns})
    return f"{len(df)} claims: {summary}.\n\n{md}\n"
