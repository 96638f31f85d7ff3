"""Issue 17, stored files: every generated file whole or not at all, checkpoints checked by SHA-256,
every records line validated, and a write failure (disk full, I/O error) leaves no cut line.

Faults are injected where the bytes are written (``os.write``, pandas' ``to_csv``, matplotlib's
``savefig``); one test also fills a real 1 MiB tmpfs when this machine lets us mount one.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bench_core.atomic import StorageError, atomic_path, atomic_write_bytes, atomic_write_text
from bench_core.records import (
    Record, RecordStore, RecordWarning, StorageError as RecordsStorageError, load_records, validate_record,
)
from bench_core.train import CheckpointCache, CheckpointError

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _rec(**kw) -> Record:
    base = dict(suite="t", entry="e", reproduction="toy", model="m", model_hash="hA", dataset="digits",
                sampler="ddim", sampler_opts={"eta": 0.0}, grid={"kind": "uniform"}, steps=10, nfe=10.0,
                num_samples=8, batch_size=4, seed=0, fid=5.0, fid_extractor="x@0", fid_reference="digits:8",
                sec_per_batch=0.1, samples_per_sec=40.0, peak_mem_mb=1.0, device="cpu", git_sha="abc", status="ok")
    base.update(kw)
    return Record(**base)


def _line(**kw) -> bytes:
    return (json.dumps(asdict(_rec(**kw)), sort_keys=True) + "\n").encode()


def _fail_os_write_after(monkeypatch, n_bytes: int, code: int = errno.ENOSPC) -> None:
    """``os.write`` writes up to ``n_bytes`` in all, then fails with ``code`` (a disk that fills mid-line)."""
    real = os.write
    left = [n_bytes]

    def write(fd, data):
        if left[0] <= 0:
            raise OSError(code, os.strerror(code))
        n = real(fd, bytes(data)[: left[0]])
        left[0] -= n
        return n

    monkeypatch.setattr(os, "write", write)


def _temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name)


def _flip_tensor_byte(path: Path) -> None:
    """Flip one byte in the middle of the largest tensor's data inside a torch zip checkpoint."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    off = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[off + 26: off + 30])
    start = off + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 2))


# --------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------
def test_atomic_write_replaces_whole_file_and_a_failure_keeps_the_old_one(tmp_path, monkeypatch):
    p = tmp_path / "out" / "report.md"
    atomic_write_text(p, "old report\n")
    assert p.read_text() == "old report\n" and _temp_files(tmp_path) == []
    _fail_os_write_after(monkeypatch, 5)
    with pytest.raises(StorageError) as e:
        atomic_write_text(p, "new report, much longer than five bytes\n", what="report")
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert str(e.value) == f"cannot write report {p}: disk full (ENOSPC)"
    assert p.read_text() == "old report\n"  # untouched
    assert _temp_files(tmp_path) == []        # no temporary left


def test_atomic_path_removes_temp_on_any_error_and_refuses_a_folder(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("old")
    with pytest.raises(ZeroDivisionError):
        with atomic_path(p) as tmp:
            tmp.write_text("half")
            1 / 0
    assert p.read_text() == "old" and _temp_files(tmp_path) == []
    (tmp_path / "d.png").mkdir()
    with pytest.raises(StorageError, match=r"cannot write plot .*d\.png: is a directory \(EISDIR\)"):
        atomic_write_bytes(tmp_path / "d.png", b"x", what="plot")
    assert _temp_files(tmp_path) == []


def test_report_and_readme_writes_keep_the_old_file_on_disk_full(tmp_path, monkeypatch):
    from bench_core.report.report import MARKERS, update_readme, write_report

    recs = tmp_path / "records.jsonl"
    recs.write_bytes(_line(seed=0) + _line(seed=1, fid=6.0))
    out = tmp_path / "rep"
    out.mkdir()
    (out / "report.md").write_text("old report\n")
    readme = tmp_path / "README.md"
    start, end = MARKERS["leaderboard"]
    readme.write_text(f"# x\n{start}\nold table\n{end}\n")
    _fail_os_write_after(monkeypatch, 100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a reproduction plot may warn; not what is tested here
        with pytest.raises(StorageError, match=r"cannot write report .*report\.md: disk full"):
            write_report(recs, out)
        _fail_os_write_after(monkeypatch, 10)
        with pytest.raises(StorageError, match=r"cannot write README .*README\.md: disk full"):
            update_readme(readme, tmp_path)
    assert (out / "report.md").read_text() == "old report\n"
    assert readme.read_text() == f"# x\n{start}\nold table\n{end}\n"
    assert _temp_files(tmp_path) == []


def _half_then_enospc(self, path, *a, **k):
    """A writer (``DataFrame.to_csv``, ``Figure.savefig``) that writes part of its file, then hits a full disk."""
    Path(path).write_bytes(b"half a file")
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("which", ["leaderboard", "scorecard"])
def test_csv_write_failure_keeps_old_csv(tmp_path, monkeypatch, which):
    import importlib

    import pandas as pd

    to_csv = importlib.import_module(f"bench_core.report.{which}").to_csv
    df = pd.DataFrame({"reproduction": ["a"], "id": ["b"]})
    path = tmp_path / f"{which}.csv"
    to_csv(df, path)  # a first, complete CSV
    old = path.read_bytes()
    assert old.startswith(b"reproduction,")
    monkeypatch.setattr(pd.DataFrame, "to_csv", _half_then_enospc)
    with pytest.raises(StorageError, match=f"cannot write {which} CSV .*{which}.csv: disk full"):
        to_csv(df, path)
    assert path.read_bytes() == old and _temp_files(tmp_path) == []


def test_plot_write_failure_keeps_old_png(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from bench_core.report.plots import new_figure, save_figure

    fig = new_figure(2, 2)
    fig.add_subplot().plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "plot.png")
    old = path.read_bytes()
    assert old[:8] == b"\x89PNG\r\n\x1a\n" and _temp_files(tmp_path) == []
    monkeypatch.setattr(Figure, "savefig", _half_then_enospc)
    fig = new_figure(2, 2)
    fig.add_subplot().plot([0, 1], [0, 1])
    with pytest.raises(StorageError, match=r"cannot write plot .*plot\.png: disk full"):
        save_figure(fig, path)
    assert path.read_bytes() == old and _temp_files(tmp_path) == []
    assert not fig.axes  # the figure is released either way


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------
def test_checkpoint_carries_its_sha256_beside_it(tmp_path):
    cache = CheckpointCache(tmp_path)
    path = cache.save("h", _net(0), {"a": 1})
    side = cache.checksum_path("h")
    assert side == tmp_path / "h.pt.sha256"
    assert side.read_text() == f"{hashlib.sha256(path.read_bytes()).hexdigest()}  h.pt\n"  # sha256sum format
    model = _net(1)
    assert cache.load("h", model) == {"a": 1}
    assert torch.equal(model[0].weight, _net(0)[0].weight)


def test_flipped_byte_checkpoint_is_refused_naming_file_and_fix(tmp_path):
    cache = CheckpointCache(tmp_path)
    path = cache.save("h", _net(0), {})
    _flip_tensor_byte(path)
    assert torch.load(path, weights_only=True)["format"] == "diffbench-ckpt-1"  # torch alone notices nothing
    model = _net(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        cache.load("h", model)
    msg = str(e.value)
    assert f"checkpoint {path} is corrupted: its SHA-256" in msg
    assert msg.endswith(f"delete it to retrain: rm -f '{path}' '{cache.checksum_path('h')}'")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched


def test_flipped_byte_is_found_by_the_suite_preflight_before_any_work(tmp_path):
    import reproductions

    rep = reproductions.get("ddpm")
    cfg = rep.model_config("digits", {})
    cache = CheckpointCache(tmp_path)
    [(h, make)] = rep.cached_modules("digits", {}, cfg)
    path = cache.save(h, make(), {})
    assert rep.preflight("digits", {}, cache_dir=tmp_path) == []
    _flip_tensor_byte(path)
    [problem] = rep.preflight("digits", {}, cache_dir=tmp_path)
    assert problem.startswith("ddpm/digits: checkpoint ") and str(path) in problem and "SHA-256" in problem
    assert f"rm -f '{path}'" in problem
    # a folder where the checkpoint file should be: also found before any work
    path.unlink()
    path.mkdir()
    [problem] = rep.preflight("digits", {}, cache_dir=tmp_path)
    assert f"checkpoint cache entry {path} is a folder" in problem and f"rm -r '{path}'" in problem


def test_checkpoint_without_sidecar_is_checked_by_crc_then_adopted(tmp_path):
    cache = CheckpointCache(tmp_path)
    path = cache.save("h", _net(0), {})
    side = cache.checksum_path("h")
    side.unlink()  # as written by an older diffbench
    with pytest.warns(UserWarning, match="had no checksum"):
        assert cache.load("h", _net(1)) == {}
    assert side.read_text().split()[0] == hashlib.sha256(path.read_bytes()).hexdigest()
    # an older checkpoint that is damaged: its zip CRC-32 catches it
    side.unlink()
    _flip_tensor_byte(path)
    with pytest.raises(CheckpointError, match=r"corrupted: entry '.*/data/\d+' fails its CRC-32 check"):
        cache.load("h", _net(1))
    assert not side.exists()  # nothing adopted


def test_damaged_sidecar_or_folder_entry_is_a_clear_error(tmp_path):
    cache = CheckpointCache(tmp_path)
    path = cache.save("h", _net(0), {})
    cache.checksum_path("h").write_text("not a checksum\n")
    with pytest.raises(CheckpointError, match=r"checksum .*h\.pt\.sha256 is damaged .*rm -f '"):
        cache.load("h", _net(1))
    path.unlink()
    cache.checksum_path("h").unlink()
    path.mkdir()
    with pytest.raises(CheckpointError, match=r"h\.pt is a folder, not a file; remove it to retrain: rm -r '"):
        cache.load("h", _net(1))


def test_checkpoint_save_on_full_disk_leaves_the_old_checkpoint_usable(tmp_path, monkeypatch):
    cache = CheckpointCache(tmp_path)
    path = cache.save("h", _net(0), {"v": 0})
    old = path.read_bytes()
    _fail_os_write_after(monkeypatch, 1000)
    with pytest.raises(StorageError) as e:
        cache.save("h", _net(5), {"v": 1})
    assert str(e.value).startswith(f"cannot write checkpoint {path}: disk full (ENOSPC); free space in the cache")
    monkeypatch.undo()
    assert path.read_bytes() == old and _temp_files(tmp_path) == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cache.load("h", _net(1)) == {"v": 0}  # the old one, whole (its checksum re-adopted)
    # nothing at all on a fresh entry
    _fail_os_write_after(monkeypatch, 1000)
    with pytest.raises(StorageError):
        cache.save("k", _net(0), {})
    assert not cache.path("k").exists() and not cache.checksum_path("k").exists()


# --------------------------------------------------------------------------------------------
# reference statistics
# --------------------------------------------------------------------------------------------
class _StubExtractor:
    identity = "stub@000000000000"
    feature_layer = "flat"

    def __init__(self):
        self.calls = 0

    def features(self, x):
        self.calls += 1
        return x.flatten(1).float()


def test_reference_cache_garbage_is_recomputed_folder_is_an_error(tmp_path):
    from bench_core.metrics.fidelity import ReferenceCacheError, images_digest, reference_cache_path, reference_features

    ref = torch.arange(4 * 3, dtype=torch.uint8).reshape(4, 1, 1, 3)
    ext = _StubExtractor()
    f = reference_features(ref, extractor=ext, reference_name="r", cache_dir=tmp_path)
    path = reference_cache_path(tmp_path, ext, "r", 4, images_digest(ref))
    assert path.is_file() and ext.calls == 1
    assert torch.equal(reference_features(ref, extractor=ext, reference_name="r", cache_dir=tmp_path), f)
    assert ext.calls == 1  # cached
    path.write_bytes(b"\x00garbage" * 7)
    with pytest.warns(UserWarning, match="unreadable .*recomputing"):
        assert torch.equal(reference_features(ref, extractor=ext, reference_name="r", cache_dir=tmp_path), f)
    assert ext.calls == 2 and np.load(path)["features"].shape == (4, 3)  # rewritten whole
    path.unlink()
    path.mkdir()
    with pytest.raises(ReferenceCacheError, match=r"is a folder .*rm -r '"):
        reference_features(ref, extractor=ext, reference_name="r", cache_dir=tmp_path)


# --------------------------------------------------------------------------------------------
# records: every line validated
# --------------------------------------------------------------------------------------------
BAD_LINES = {
    "array": b'[1, 2, 3]',
    "number": b'42',
    "null": b'null',
    "wrong types": json.dumps(dict(asdict(_rec()), steps="10", sampler_opts=[1])).encode(),
    "missing fields": b'{"status": "ok", "fid": 1.0}',
    "non-UTF-8": _line()[:-1].replace(b'"toy"', b'"to\xff"'),
    "truncated": _line()[:60],
    "unknown status": json.dumps(dict(asdict(_rec()), status="maybe")).encode(),
}
WHY = {"array": "not a JSON object but an array", "number": "not a JSON object but a number",
       "null": "not a JSON object but null", "wrong types": "steps is a string, expected an integer",
       "missing fields": "missing reproduction", "non-UTF-8": "not UTF-8 text", "truncated": "not JSON",
       "unknown status": "status 'maybe' is not one of ok, diverged, error"}


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_each_bad_line_is_skipped_with_a_warning_naming_it(tmp_path, kind):
    p = tmp_path / "records.jsonl"
    content = _line(seed=0) + BAD_LINES[kind] + b"\n" + _line(seed=1)
    p.write_bytes(content)
    with pytest.warns(RecordWarning) as w:
        recs = load_records(p)
    assert [r["seed"] for r in recs] == [0, 1]
    [msg] = [str(x.message) for x in w]
    assert msg.startswith(f"{p}: 1 line(s) are not records and were skipped (line 2: ") and WHY[kind] in msg
    assert p.read_bytes() == content  # a read never changes the file


def test_store_moves_bad_lines_aside_before_it_writes_and_resume_keeps_the_good(tmp_path):
    p = tmp_path / "records.jsonl"
    bad = [BAD_LINES[k] for k in BAD_LINES]
    content = _line(seed=0) + b"".join(b + b"\n" for b in bad) + _line(seed=1) + b'{"cut": '  # and a cut tail
    p.write_bytes(content)
    store = RecordStore(p)
    with pytest.warns(RecordWarning, match=r"8 line\(s\) are not records and were skipped \(line 2: .*line 9: "):
        done = store.done_keys()  # --resume: the good lines count, the file is left alone
    assert done == {_rec(seed=0).key(), _rec(seed=1).key()} and p.read_bytes() == content
    with pytest.warns(RecordWarning) as w:
        store.append(_rec(seed=2))
    msgs = " | ".join(str(x.message) for x in w)
    assert "unterminated last line" in msgs and "8 line(s) are not records and were moved to records.jsonl.rejected" in msgs
    assert p.read_bytes() == _line(seed=0) + _line(seed=1) + _line(seed=2)
    assert (tmp_path / "records.jsonl.rejected").read_bytes() == b"".join(b + b"\n" for b in bad)  # kept, verbatim
    assert (tmp_path / "records.jsonl.partial").read_bytes() == b'{"cut": \n'
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # clean now: no warning on reading
        assert [r["seed"] for r in load_records(tmp_path)] == [0, 1, 2]  # folder read skips .rejected/.partial


def test_leaderboard_plots_and_report_go_on_with_the_good_lines(tmp_path, capsys):
    from bench_core.cli import main

    d = tmp_path / "res"
    d.mkdir()
    good = [_line(seed=s, steps=n, nfe=float(n), fid=30.0 / n + s) for n in (10, 20) for s in (0, 1)]
    content = (good[0] + BAD_LINES["array"] + b"\n" + good[1] + BAD_LINES["non-UTF-8"] + b"\n" + good[2]
               + BAD_LINES["wrong types"] + b"\n" + good[3])
    (d / "records.jsonl").write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["leaderboard", "--records", str(d)]) == 0
        assert "ddim" in capsys.readouterr().out
        assert main(["plots", "--records", str(d), "--out", str(tmp_path / "plots")]) == 0
        assert any((tmp_path / "plots").glob("*.png"))
        assert main(["report", "--records", str(d), "--out", str(tmp_path / "rep")]) == 0
    assert "ddim" in (tmp_path / "rep" / "report.md").read_text()
    assert (d / "records.jsonl").read_bytes() == content  # someone's results folder: read-only


def test_invalid_record_is_not_written(tmp_path):
    store = RecordStore(tmp_path / "records.jsonl")
    with pytest.raises(ValueError, match="not writing an invalid record .*steps is a string"):
        store.append(dict(asdict(_rec()), steps="3"))
    assert not store.path.exists()


def test_committed_results_all_load_as_records():
    files = sorted((REPO / "results").rglob("*.jsonl"))
    if not files:
        pytest.skip("no committed results")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for f in files:
            n = sum(1 for ln in f.read_bytes().splitlines() if ln.strip())
            recs = load_records(f)
            assert len(recs) == n, f
            assert all(validate_record(r) is None for r in recs)


# --------------------------------------------------------------------------------------------
# records: write failures
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "disk full (ENOSPC)"), (errno.EIO, "input/output error (EIO)")])
def test_append_failure_leaves_no_cut_line(tmp_path, monkeypatch, code, words):
    p = tmp_path / "records.jsonl"
    store = RecordStore(p)
    store.append(_rec(seed=0))
    store.append(_rec(seed=1))
    before = p.read_bytes()
    _fail_os_write_after(monkeypatch, 50, code)
    with pytest.raises(RecordsStorageError) as e:
        store.append(_rec(seed=2, error="x" * 500))
    assert e.value.errno == code and isinstance(e.value, OSError)
    msg = str(e.value)
    assert msg.startswith(f"cannot write a record to {p}: {words}; the records file holds only complete records")
    assert "--resume" in msg
    monkeypatch.undo()
    assert p.read_bytes() == before  # cut back: the same complete lines as before
    store.append(_rec(seed=2))        # space freed: it goes on
    assert [r["seed"] for r in load_records(p)] == [0, 1, 2]


def test_append_fsync_failure_is_cut_back_too(tmp_path, monkeypatch):
    p = tmp_path / "records.jsonl"
    store = RecordStore(p)
    store.append(_rec(seed=0))
    before = p.read_bytes()

    def fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StorageError, match="input/output error"):
        store.append(_rec(seed=1))
    monkeypatch.undo()
    assert p.read_bytes() == before


def test_storage_error_is_the_same_type_everywhere():
    assert RecordsStorageError is StorageError and issubclass(StorageError, OSError)


# --------------------------------------------------------------------------------------------
# a real full disk (a 1 MiB tmpfs), where this machine allows mounting one
# --------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, timeout=10)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=10)


def test_real_full_disk_records_and_report(tiny_disk):
    filler = tiny_disk / "filler"
    filler.write_bytes(b"\0" * 300_000)
    p = tiny_disk / "records.jsonl"
    store = RecordStore(p)
    written = 0
    with pytest.raises(StorageError, match="disk full"):
        for i in range(1000):
            store.append(_rec(seed=i, error="e" * 20_000))
            written += 1
    assert 0 < written < 1000
    assert p.read_bytes().endswith(b"\n")
    assert [r["seed"] for r in load_records(p)] == list(range(written))  # every line complete, none lost
    # a report over a full disk: the old one stays whole
    report = tiny_disk / "report.md"
    with pytest.raises(StorageError, match="disk full"):
        atomic_write_text(report, "r" * 2_000_000)
    assert not report.exists() and _temp_files(tiny_disk) == []
    # space freed: a resumed run goes on after the last whole record
    filler.unlink()
    resumed = RecordStore(p)
    assert len(resumed.done_keys()) == written
    resumed.append(_rec(seed=written, error="e" * 20_000))
    assert [r["seed"] for r in load_records(p)] == list(range(written + 1))


def test_report_reads_every_records_path(tmp_path):
    """`diffbench report --records A B`: the report is made from both (it used to read the first only)."""
    from bench_core.cli import main

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "records.jsonl").write_bytes(_line(seed=0, steps=10, nfe=10.0, fid=3.0))
    (b / "records.jsonl").write_bytes(_line(seed=1, steps=10, nfe=10.0, fid=4.0))
    assert main(["report", "--records", str(a), str(b), "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "- records: 2" in text, text[:600]
    assert main(["report", "--records", str(a), "--out", str(tmp_path / "rep1")]) == 0
    assert "- records: 1" in (tmp_path / "rep1" / "report.md").read_text()
