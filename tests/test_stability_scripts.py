"""scripts/compare_scorecards.py and scripts/stability_report.py: the stability rule (no paper claim between pass
and fail across training seeds) read from two scorecards, on hand-made cases."""
import json
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from bench_core.records import Record

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import compare_scorecards  # noqa: E402
import stability_report  # noqa: E402

COLS = ["reproduction", "id", "kind", "status", "why", "ours", "reported"]


def _card(rows):
    return pd.DataFrame([dict(zip(COLS, r)) for r in rows], columns=COLS)


A = _card([("ddpm", "a", "paper", "pass", "", "", ""), ("ddpm", "b", "paper", "pass", "", "", ""),
           ("edm", "c", "paper", "fail", "worse", "", ""), ("edm", "d", "sanity", "pass", "", "", ""),
           ("ldm", "e", "paper", "not run", "no pixel", "", "")])
B = _card([("ddpm", "a", "paper", "inconclusive", "inside the noise", "", ""),   # allowed move
           ("ddpm", "b", "paper", "fail", "worse", "", ""),                      # a flip
           ("edm", "c", "paper", "fail", "worse", "", ""),                       # unchanged
           ("edm", "d", "sanity", "fail", "broken", "", ""),                     # a sanity flip: not a paper flip
           ("adm", "f", "paper", "pass", "", "", "")])                           # only in B


def test_compare_marks_exactly_the_pass_fail_moves():
    m = compare_scorecards.compare(A, B).set_index("id")
    assert m["flip"].to_dict() == {"a": False, "b": True, "c": False, "d": True, "e": False, "f": False}
    assert m.loc["e", "status_b"] == "(absent)" and m.loc["f", "status_a"] == "(absent)"


def test_compare_main_exit_status_counts_paper_flips_only(tmp_path, capsys):
    pa, pb = tmp_path / "a.csv", tmp_path / "b.csv"
    A.to_csv(pa, index=False)
    B.to_csv(pb, index=False)
    assert compare_scorecards.main([str(pa), str(pb)]) == 1
    assert "paper claims flipped between pass and fail: 1" in capsys.readouterr().out
    same = tmp_path / "same.csv"
    A.to_csv(same, index=False)
    assert compare_scorecards.main([str(pa), str(same)]) == 0


def _run_dir(tmp_path, name, card, train_seed, walls):
    d = tmp_path / name
    d.mkdir()
    card.to_csv(d / "scorecard.csv", index=False)
    recs = [asdict(Record(suite="default", entry=f"{rep}-x", reproduction=rep, model="m", model_hash="h",
                          dataset="digits", sampler="ddim", sampler_opts={}, grid={"kind": "uniform"}, steps=10,
                          nfe=10.0, num_samples=500, batch_size=500, seed=0, train_seed=train_seed, fid=5.0,
                          wall_sec=w, train_sec=t, device="cpu", device_name="test cpu", status="ok"))
            for rep, w, t in walls]
    (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d


def test_stability_report_counts_flips_and_costs(tmp_path):
    da = _run_dir(tmp_path, "a", A, 0, [("ddpm", 120.0, 60.0), ("edm", 60.0, None)])
    db = _run_dir(tmp_path, "b", B, 1, [("ddpm", 240.0, 180.0), ("edm", 120.0, 30.0)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every hand-made record is valid: none skipped
        text = stability_report.report(da, db, ("A", "B"))
    lines = text.splitlines()
    paper = next(ln for ln in lines if ln.startswith("- paper claims"))
    # A: a, b pass; c fail; e not run.  B: f pass; b, c fail; a inconclusive.  Changed: a, b, e (absent), f (absent)
    assert "A: 2 pass, 1 fail, 0 inconclusive, 1 not run" in paper
    assert "B: 1 pass, 2 fail, 1 inconclusive, 0 not run" in paper
    assert paper.endswith("pass <-> fail: **1**")
    sanity = next(ln for ln in lines if ln.startswith("- sanity claims"))
    assert sanity.endswith("pass <-> fail: **1**")
    assert "| ddpm | `b` | paper | pass | fail | **FLIP** |" in lines
    assert "| ddpm | `a` | paper | pass | inconclusive | moved |" in lines
    assert "| edm | `c` | paper | fail | fail |  |" in lines
    assert "- `b` (pass -> fail): worse" in lines
    # the costs come from the records: 3.0 min (A) and 6.0 min (B) of wall, 1.0 and 3.5 of training
    assert "2 runs, 3.0 minutes of run wall time in all, of which 1.0 process-minutes training" in text
    assert "2 runs, 6.0 minutes of run wall time in all, of which 3.5 process-minutes training" in text
    assert "training seeds used by its records: 1" in text

