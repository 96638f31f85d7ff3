"""Reproduction scorecard: every registered reproduction's claims checked against our records.

Each ``Claim.check`` receives the records of the whole run as a DataFrame (``records_df``: every
``Record`` column is present even when there are no records; it is up to the check to filter by
``reproduction``, ``status`` and so on).  A status is one of ``pass``, ``fail``, ``inconclusive`` and
``not run`` (the rule between them is ``bench_core.stats``': a comparison passes only beyond the noise);
a check that raises, or returns something that is not a result, is an ``error`` row with the message in
``why``: the scorecard never crashes a report.  Every status but ``pass`` carries a one-line ``why``.
Claims have a kind (``paper``, ``sanity``, ``target``) and the headline counts each kind apart.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from bench_core.atomic import atomic_path
from bench_core.report.leaderboard import as_dicts, load_registry, markdown_table, records_df

COLUMNS = ["reproduction", "id", "kind", "claim", "status", "why", "ours", "reported"]
CSV_COLUMNS = ["reproduction", "id", "kind", "status", "why", "ours", "reported"]
STATUSES = ("pass", "fail", "inconclusive", "not run", "error")
KINDS = ("paper", "sanity", "target")
_STATUS_ALIASES = {"passed": "pass", "ok": "pass", "failed": "fail", "not_run": "not run", "notrun": "not run",
                   "skip": "not run", "skipped": "not run", "not-run": "not run"}


def _one_line(msg: Any, limit: int = 300) -> str:
    s = " ".join(str(msg).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _normalise(result: Any) -> tuple[str, str, str]:
    """(status, ours, why) of a check's result."""
    status = getattr(result, "status", None)
    ours = getattr(result, "ours", None)
    why = getattr(result, "why", "") or ""
    if status is None and isinstance(result, (tuple, list)) and len(result) in (2, 3):
        status, ours = result[0], result[1]
        why = result[2] if len(result) == 3 else ""
    if status is None:
        return "error", "", f"check returned {type(result).__name__}, not a ClaimResult"
    status = str(status).strip().lower()
    status = _STATUS_ALIASES.get(status, status)
    ours = "" if ours is None else str(ours)
    if status not in STATUSES or status == "error":
        return "error", ours, f"check returned unknown status {status!r}"
    if status != "pass" and not str(why).strip():
        why = {"not run": "the records this claim needs are not in this run",
               "inconclusive": "the difference is inside the noise",
               "fail": "the records contradict the claim"}[status]
    return status, ours, str(why)


def scorecard(records: list[dict]) -> pd.DataFrame:
    """One row per claim of every registered reproduction (sorted by reproduction name, claims in
    declaration order): reproduction, id, kind, claim, status, why, ours, reported."""
    reps, load_errors = load_registry()
    df = records_df(as_dicts(records))
    rows = []
    for module, msg in load_errors:
        rows.append({"reproduction": module, "id": "(import)", "kind": "sanity", "claim": "reproduction module imports",
                     "status": "error", "why": _one_line(msg), "ours": "", "reported": ""})
    for name, rep in reps.items():
        try:
            claims = list(rep.claims())
        except Exception as e:  # noqa: BLE001
            rows.append({"reproduction": name, "id": "(claims)", "kind": "sanity", "claim": "claims() of the reproduction",
                         "status": "error", "why": _one_line(f"{type(e).__name__}: {e}"), "ours": "", "reported": ""})
            continue
        for c in claims:
            try:
                status, ours, why = _normalise(c.check(df.copy()))
            except Exception as e:  # noqa: BLE001 - a broken check is an error row, not a crash
                status, ours, why = "error", "", f"{type(e).__name__}: {e}"
            kind = str(getattr(c, "kind", "paper"))
            rows.append({"reproduction": name, "id": str(c.id), "kind": kind if kind in KINDS else "paper",
                         "claim": str(c.text), "status": status, "why": "" if status == "pass" else _one_line(why),
                         "ours": _one_line(ours), "reported": str(c.reported)})
    return pd.DataFrame(rows, columns=COLUMNS).astype(object)


def status_counts(df: pd.DataFrame, kind: str | None = None) -> dict[str, int]:
    """Claims per status (of one kind, or all)."""
    if df is None or len(df) == 0:
        return {s: 0 for s in STATUSES}
    d = df if kind is None else df[df["kind"] == kind]
    return {s: int((d["status"] == s).sum()) for s in STATUSES}


def headline(df: pd.DataFrame) -> str:
    """One line per kind: "paper claims: P pass, F fail, I inconclusive, N not run" (errors only if any)."""
    lines = []
    for kind in KINDS:
        c = status_counts(df, kind)
        if sum(c.values()) == 0:
            continue
        parts = [f"{c[s]} {s}" for s in ("pass", "fail", "inconclusive", "not run")]
        if c["error"]:
            parts.append(f"{c['error']} error")
        lines.append(f"**{kind} claims**: " + ", ".join(parts))
    return "  \n".join(lines)


def to_csv(df: pd.DataFrame, path) -> Path:
    """``results/scorecard.csv``: reproduction, id, kind, status, why, ours, reported."""
    path = Path(path)
    with atomic_path(path, what="scorecard CSV") as tmp:  # whole or not at all
        df.reindex(columns=CSV_COLUMNS).to_csv(tmp, index=False)
    return path


def scorecard_markdown(df: pd.DataFrame) -> str:
    """The scorecard as its headline plus one table (every claim; why beside every status but pass)."""
    if df is None or len(df) == 0:
        return "_No claims registered._\n"
    table = df.assign(
        status=[f"**{s}**" if s in ("fail", "error") else s for s in df["status"]],
        id=[f"`{c}`" for c in df["id"]],
    )[["reproduction", "id", "kind", "claim", "reported", "ours", "status", "why"]]
    md = markdown_table(table, headers={"reported": "paper", "ours": "ours (this run)"},
                        formatters={c: (lambda v: "" if v is None else str(v)) for c in table.columns})
    return f"{len(df)} claims.  \n{headline(df)}\n\n{md}\n"
