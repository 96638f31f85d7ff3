"""The full report (``report.md``) and the README's generated sections, from records only.

Both are deterministic: the same records give byte-identical text (no timestamps, sorted sets).
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import pandas as pd

from bench_core.atomic import atomic_write_text
from bench_core.records import load_records, sampler_label
from bench_core.report.leaderboard import (
    RANK_RULE, as_dicts, finite, leaderboard, load_registry, markdown_table, nfe_view, nfe_view_markdown, records_df,
    to_csv, to_markdown,
)
from bench_core.report.plots import PREFIX_LATENCY, PREFIX_NFE, PREFIX_SAMPLES, make_plots
from bench_core.report.scorecard import headline, scorecard, scorecard_markdown
from bench_core.report.scorecard import to_csv as scorecard_to_csv

EXTRACTOR_JSON = Path(__file__).resolve().parent.parent / "metrics" / "weights" / "digits_cnn.json"

MARKERS = {
    "leaderboard": ("<!-- diffbench:leaderboard:start -->", "<!-- diffbench:leaderboard:end -->"),
    "scorecard": ("<!-- diffbench:scorecard:start -->", "<!-- diffbench:scorecard:end -->"),
    "extractor": ("<!-- diffbench:extractor:start -->", "<!-- diffbench:extractor:end -->"),
    "cost": ("<!-- diffbench:cost:start -->", "<!-- diffbench:cost:end -->"),
}


def _load(records_path_or_dir) -> list[dict]:
    if isinstance(records_path_or_dir, (str, os.PathLike)):
        return load_records(records_path_or_dir)
    return load_records(*records_path_or_dir)


def _sources(records_path_or_dir) -> str:
    paths = [records_path_or_dir] if isinstance(records_path_or_dir, (str, os.PathLike)) else records_path_or_dir
    return ", ".join(f"`{Path(p).as_posix()}`" for p in paths)


def _one_line(msg, limit: int = 240) -> str:
    s = " ".join(str(msg or "").split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _distinct(records: list[dict], *fields: str) -> list[str]:
    vals = set()
    for r in records:
        parts = [str(r.get(f) or "") for f in fields]
        parts = [p for p in parts if p]
        if parts:
            vals.add(" / ".join(dict.fromkeys(parts)))
    return sorted(vals)


def header_markdown(records: list[dict], source: str = "") -> str:
    """Suites, devices, git shas, record count, status counts and the failed entries."""
    out = []
    suites = _distinct(records, "suite")
    devices = _distinct(records, "device", "device_name")
    shas = _distinct(records, "git_sha")
    if source:
        out.append(f"- source: {source}")
    out.append(f"- suite(s): {', '.join(suites) or '–'}")
    out.append(f"- device(s): {', '.join(devices) or '–'}")
    out.append(f"- git sha(s): {', '.join(f'`{s}`' for s in shas) or '–'}")
    out.append(f"- records: {len(records)}")
    out.append("")
    counts = Counter(str(r.get("status") or "ok") for r in records)
    order = [s for s in ("ok", "diverged", "error") if s in counts] + sorted(set(counts) - {"ok", "diverged", "error"})
    out.append(markdown_table(pd.DataFrame({"status": order, "count": [counts[s] for s in order]}))
               if order else "_No records._")
    failed = [r for r in records if str(r.get("status") or "ok") != "ok"]
    if failed:
        out.append("")
        out.append("#### Entries that did not finish ok")
        out.append("")
        rows = [{
            "status": r.get("status"), "suite": r.get("suite") or "", "entry": r.get("entry") or "",
            "reproduction": r.get("reproduction") or "", "model": r.get("model") or "",
            "sampler": sampler_label(r), "steps": int(r.get("steps") or 0), "seed": int(r.get("seed") or 0),
            "device": r.get("device") or "", "message": _one_line(r.get("error")) or "–",
        } for r in failed]
        rows.sort(key=lambda x: (x["status"], x["suite"], x["entry"], x["reproduction"], x["model"], x["sampler"],
                                 x["steps"], x["seed"]))
        out.append(markdown_table(pd.DataFrame(rows), align={"steps": "r", "seed": "r"}))
    return "\n".join(out) + "\n"


def reproduction_tables_markdown(records: list[dict], errors: list | None = None) -> str:
    """Every reproduction's ``tables(df)`` as Markdown, one heading per reproduction and table."""
    reps, load_errors = load_registry()
    if errors is not None:
        errors.extend(load_errors)
    df = records_df(records)
    out = []
    for name, rep in reps.items():
        out.append(f"### {rep.title or name}" + (f" (`{name}`)" if rep.title else ""))
        out.append("")
        if getattr(rep, "paper_url", ""):
            out.append(f"Paper: <{rep.paper_url}>")
            out.append("")
        try:
            tables = rep.tables(df.copy()) or {}
        except Exception as e:  # noqa: BLE001 - reported in the report, never fatal
            out.append(f"_tables() failed: {_one_line(f'{type(e).__name__}: {e}')}_")
            out.append("")
            continue
        if not tables:
            out.append("_No tables._")
            out.append("")
        for title, table in tables.items():
            out.append(f"#### {title}")
            out.append("")
            try:
                if not isinstance(table, pd.DataFrame):
                    table = pd.DataFrame(table)
                out.append(markdown_table(table) if len(table) else "_empty_")
            except Exception as e:  # noqa: BLE001
                out.append(f"_table could not be rendered: {_one_line(e)}_")
            out.append("")
    return "\n".join(out).rstrip() + "\n" if out else "_No reproductions registered._\n"


def _plots_markdown(paths: list[Path], outdir: Path) -> str:
    sections = {"FID vs NFE": [], "FID vs latency": [], "Samples": [], "Reproduction plots": []}
    for p in paths:
        stem = p.name
        kind = ("FID vs NFE" if stem.startswith(PREFIX_NFE + "__") else
                "FID vs latency" if stem.startswith(PREFIX_LATENCY + "__") else
                "Samples" if stem.startswith(PREFIX_SAMPLES + "__") else "Reproduction plots")
        sections[kind].append(p)
    out = []
    for title, ps in sections.items():
        if not ps:
            continue
        out += [f"### {title}", ""]
        for p in ps:
            rel = Path(os.path.relpath(Path(p).resolve(), outdir.resolve())).as_posix()
            out += [f"![{Path(p).stem}]({rel})", ""]
    return "\n".join(out).rstrip() + "\n" if out else "_No plots (no ok records with FID or previews)._\n"


LEADERBOARD_RULE = (
    "FID ranks sampler configurations only within a comparable group: the same model, dataset, feature "
    "extractor, reference set and number of samples.  Each figure is the mean over sampling seeds ± the "
    "half-width of its 95% Student-t interval.  " + RANK_RULE)


def floor_table(records: list[dict]) -> pd.DataFrame:
    """The real-data floor per (dataset, extractor, n): the FID of n real images against the reference, mean
    and standard deviation over random subsets (as recorded with the runs)."""
    rows = {}
    for r in records:
        m = r.get("metrics") if isinstance(r.get("metrics"), dict) else {}
        if r.get("status") != "ok" or finite(m.get("fid_real_data")) is None:
            continue
        key = (str(r.get("dataset") or ""), str(r.get("fid_extractor") or ""), int(r.get("num_samples") or 0))
        rows[key] = (float(m["fid_real_data"]), finite(m.get("fid_real_data_sd")), m.get("fid_real_data_subsets"))
    out = [{"dataset": k[0], "extractor": k[1], "n": k[2], "floor FID (mean)": v[0],
            "sd over subsets": v[1] if v[1] is not None else math.nan,
            "subsets": int(v[2]) if isinstance(v[2], (int, float)) else 1} for k, v in sorted(rows.items())]
    return pd.DataFrame(out, columns=["dataset", "extractor", "n", "floor FID (mean)", "sd over subsets", "subsets"])


def floor_markdown(records: list[dict]) -> str:
    t = floor_table(records)
    if len(t) == 0:
        return ""
    return ("The real-data floor: the FID that n real images score against the same reference (random subsets of "
            "the reference; no generator can be expected below it).\n\n" + markdown_table(t) + "\n")


def cost_table(records: list[dict]) -> pd.DataFrame:
    """What a run cost, per reproduction: runs, training seconds, total wall seconds (sampling, metrics and, for
    the first run of a model, loading or training it), from the records' ``train_sec`` and ``wall_sec``."""
    rows: dict[str, list] = {}
    for r in records:
        rep = str(r.get("reproduction") or "?")
        row = rows.setdefault(rep, [0, 0.0, 0.0])
        row[0] += 1
        row[1] += finite(r.get("train_sec")) or 0.0
        row[2] += finite(r.get("wall_sec")) or 0.0
    out = [{"reproduction": k, "runs": v[0], "training (min)": v[1] / 60, "wall (min)": v[2] / 60}
           for k, v in sorted(rows.items(), key=lambda kv: -kv[1][2])]
    return pd.DataFrame(out, columns=["reproduction", "runs", "training (min)", "wall (min)"])


def cost_markdown(records: list[dict]) -> str:
    """The cost of the suite run among the records (the suite with most records; benchmark scripts' records that
    sit beside it are not part of the run)."""
    suites = Counter(str(r.get("suite") or "") for r in records)
    if suites:
        main_suite = suites.most_common(1)[0][0]
        records = [r for r in records if str(r.get("suite") or "") == main_suite]
    t = cost_table(records)
    if len(t) == 0:
        return "_No records._"
    devices = sorted({str(r.get("device_name") or r.get("device") or "") for r in records} - {""})
    total, train = t["wall (min)"].sum(), t["training (min)"].sum()
    return (f"This run (suite `{main_suite or '?'}`): {int(t['runs'].sum())} runs, {total:.1f} minutes of run wall time "
            f"in all, of which "
            f"{train:.1f} process-minutes training the models from an empty cache (a cached re-run skips it; with "
            f"`--train-jobs` > 1 the models train side by side first and each record's wall time holds the model's "
            f"share of that phase, so the training took less of the wall time than this); "
            f"{', '.join(devices) or 'unknown device'}.\n\n"
            + markdown_table(t, formatters={"training (min)": lambda v: f"{v:.1f}", "wall (min)": lambda v: f"{v:.1f}"}))


def readme_leaderboard_markdown(records: list[dict], rel: str = "results") -> str:
    """The README's leaderboard: the few-step view (FID at 5, 10 and 20 NFE per sampler and model), the rule,
    and links to the full tables."""
    view = nfe_view(records)
    return (f"FID at matched NFE (mean ± 95% half-width over sampling seeds; rank in brackets, `=k` a tie; "
            f"`@n` the actual NFE where a sampler cannot hit the target exactly).  {RANK_RULE}  "
            f"Every configuration: [{rel}/report.md]({rel}/report.md#leaderboard), "
            f"[{rel}/leaderboard.csv]({rel}/leaderboard.csv).\n\n" + nfe_view_markdown(view, heading_level=4))


def write_report(records_path_or_dir, outdir) -> Path:
    """Write ``outdir/report.md`` (plus ``outdir/plots/`` and ``outdir/leaderboard.csv``)."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    records = as_dicts(_load(records_path_or_dir))
    problems: list[tuple[str, str]] = []

    lb = leaderboard(records)
    to_csv(lb, outdir / "leaderboard.csv")
    plot_paths = make_plots(records, outdir / "plots", errors=problems)
    tables_md = reproduction_tables_markdown(records, errors=problems)
    sc = scorecard(records)
    scorecard_to_csv(sc, outdir / "scorecard.csv")

    parts = [
        "# diffbench report",
        "",
        "Everything below is regenerated from the records alone.",
        "",
        "## Run",
        "",
        header_markdown(records, _sources(records_path_or_dir)),
        "## Leaderboard",
        "",
        LEADERBOARD_RULE + " Full table: [leaderboard.csv](leaderboard.csv).",
        "",
        floor_markdown(records),
        "### Few-step view: FID at matched NFE",
        "",
        nfe_view_markdown(nfe_view(records, lb=lb), heading_level=4),
        "### Every configuration",
        "",
        to_markdown(lb, heading_level=4),
        "## Reproduction tables",
        "",
        tables_md,
        "## Plots",
        "",
        _plots_markdown(plot_paths, outdir),
        "## Scorecard",
        "",
        "A comparison passes only beyond the noise: a one-sided test at 95% over seeds (paired over shared "
        "seeds, Welch otherwise); the right direction inside the noise is `inconclusive`; a significant wrong "
        "direction is `fail`.  Full table: [scorecard.csv](scorecard.csv).",
        "",
        scorecard_markdown(sc),
    ]
    problems = sorted(set(problems))
    if problems:
        parts += ["## Report problems", "",
                  markdown_table(pd.DataFrame(problems, columns=["source", "message"]).assign(
                      message=lambda d: d["message"].map(_one_line))), ""]
    path = outdir / "report.md"
    atomic_write_text(path, "\n".join(parts).rstrip() + "\n", what="report")
    return path


# --------------------------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------------------------
def extractor_statement(json_path: str | os.PathLike | None = None) -> str:
    """One line on the committed digits feature extractor, from its JSON metadata."""
    path = Path(json_path) if json_path is not None else EXTRACTOR_JSON
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return (f"The digits feature extractor metadata (`{_rel(path)}`) is missing: train it with the "
                "project script before quoting FIDs on the embedded datasets.")
    except (OSError, ValueError) as e:
        return f"The digits feature extractor metadata (`{_rel(path)}`) is unreadable: {_one_line(e, 120)}."
    acc = meta.get("heldout_accuracy")
    n = meta.get("n_test")
    sha = meta.get("sha256")
    bits = []
    if isinstance(acc, (int, float)):
        pct = acc * 100 if acc <= 1 else acc
        bits.append(f"held-out accuracy {pct:.2f}%" + (f" on {int(n)} test images" if isinstance(n, (int, float)) else ""))
    elif isinstance(n, (int, float)):
        bits.append(f"{int(n)} test images (accuracy not recorded)")
    line = ("FID on the embedded digits datasets uses the project's own digits CNN feature extractor "
            f"(`{_rel(path)}`)")
    if bits:
        line += ": " + ", ".join(bits)
    line += f"; weights sha256 `{sha}`." if sha else "; weights checksum not recorded."
    return line


def _rel(path: Path) -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return Path(path).name


def readme_sections(results_dir, extractor_json=None) -> dict[str, str]:
    """The generated text for each README marker pair."""
    records = as_dicts(load_records(results_dir))
    rel = _rel(Path(results_dir))
    return {
        "leaderboard": readme_leaderboard_markdown(records, rel).rstrip(),
        "scorecard": (headline(scorecard(records)) + f"\n\nEvery claim with its numbers, interval and why: "
                      f"[{rel}/report.md]({rel}/report.md#scorecard) and [{rel}/scorecard.csv]({rel}/scorecard.csv)."),
        "extractor": extractor_statement(extractor_json),
        "cost": cost_markdown(records),
    }


def replace_between_markers(text: str, sections: dict[str, str]) -> str | None:
    """``text`` with each present marker pair's content replaced; None when a pair is broken
    (start without end, end before start, repeated) or no pair is present."""
    found = 0
    for name, body in sections.items():
        start, end = MARKERS[name]
        ns, ne = text.count(start), text.count(end)
        if ns == 0 and ne == 0:
            continue
        if ns != 1 or ne != 1 or text.index(start) > text.index(end):
            return None
        found += 1
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
        text = pattern.sub(lambda _m: f"{start}\n{body}\n{end}", text, count=1)
    return text if found else None


def update_readme(readme_path, results_dir, *, extractor_json=None) -> bool:
    """Regenerate the README's leaderboard, scorecard and extractor sections from ``results_dir``.

    Only the text between the ``<!-- diffbench:NAME:start -->`` / ``end`` markers changes.
    Returns False and leaves the README untouched when no marker pair is found or one is broken.
    """
    path = Path(readme_path)
    text = path.read_text(encoding="utf-8")
    new = replace_between_markers(text, readme_sections(results_dir, extractor_json))
    if new is None:
        return False
    if new != text:
        atomic_write_text(path, new, what="README")  # whole or not at all: a failure leaves the old README
    return True
