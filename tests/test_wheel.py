"""A wheel works: ``pip install .`` (not editable) into a fresh virtual environment, then, from another folder,
``diffbench list suites``, ``diffbench run --suite smoke --dry-run`` and ``diffbench run --suite smoke``.

The fresh environment borrows this one's third-party packages (torch is several GB: a ``.pth`` line points at
this environment's site-packages, whose own ``.pth`` files, this checkout's editable install among them, are not
read), so only diffbench itself is installed, from a copy of the repository, with ``--no-deps``.  The commands
run with the checkout nowhere on ``sys.path`` and the cache in ``$XDG_CACHE_HOME``."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import yaml

from bench_core.plugin import discover
from bench_core.records import load_records
from bench_core.suite import SUITES_DIR, load_suite

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _copy_sources(dst: Path) -> Path:
    """The files a wheel is built from (no virtual environment, results or caches)."""
    keep = ("bench_core", "reproductions", "pyproject.toml", "README.md")
    dst.mkdir()
    for name in keep:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dst / name)
    return dst


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(bin folder, environment) of a fresh venv with diffbench installed from a wheel of this repository."""
    root = tmp_path_factory.mktemp("wheel")
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    borrowed = sysconfig.get_paths()["purelib"]
    src = _copy_sources(root / "src")
    # pip and the build backend (setuptools) are this environment's; the install goes into the new one
    r = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                        str(src)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": borrowed})
    (site / "borrowed-packages.pth").write_text(borrowed + "\n")
    assert r.returncode == 0, r.stdout + r.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DIFFBENCH_CACHE", "DIFFBENCH_DATA")}
    env["XDG_CACHE_HOME"] = str(root / "xdg-cache")
    return env_dir / "bin", env, root


def _diffbench(installed, *args, timeout=600):
    bindir, env, root = installed
    work = root / "elsewhere"
    work.mkdir(exist_ok=True)
    return subprocess.run([str(bindir / "diffbench"), *args], capture_output=True, text=True, cwd=work, env=env,
                          timeout=timeout)


def test_the_wheel_is_a_real_install(installed):
    bindir, env, root = installed
    code = "import bench_core, reproductions; print(bench_core.__file__); print(reproductions.__file__)"
    r = subprocess.run([str(bindir / "python"), "-c", code], capture_output=True, text=True, cwd=root, env=env,
                       check=True)
    for line in r.stdout.split():
        assert str(bindir.parent) in line and str(REPO) not in line  # site-packages of the new venv, not the checkout


def test_list_suites_from_another_folder(installed):
    r = _diffbench(installed, "list", "suites")
    assert r.returncode == 0, r.stderr
    for name in ("smoke", "default", "cifar10"):
        assert f"  {name}" in r.stdout
    assert str(REPO) not in r.stdout  # the suites shipped in the wheel, not the checkout's


def test_the_smoke_suite_end_to_end_from_the_wheel(installed):
    """The dry run, then the smoke suite from an empty default cache (the user's cache folder): every paper with
    models of its own, all ok, the report with its scorecard, leaderboard and plots; then a second run of one of its
    entries loads the trained model instead of training again."""
    bindir, env, root = installed
    r = _diffbench(installed, "run", "--suite", "smoke", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "smoke" in r.stdout and "train" in r.stdout  # nothing is cached yet
    r = _diffbench(installed, "run", "--suite", "smoke", "--out", "out", "--no-progress")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = root / "elsewhere" / "out"
    recs = load_records(out)
    assert len(recs) == len(load_suite("smoke").runs) and all(rec["status"] == "ok" for rec in recs)
    # every registered paper with models of its own is in the smoke suite (solvers runs on the ddpm model)
    assert {rec["reproduction"] for rec in recs} == {n for n, rep in discover().items() if rep.models}
    report = (out / "report.md").read_text()
    assert "Scorecard" in report and "Leaderboard" in report
    assert any((out / "plots").glob("*.png"))
    cache = root / "xdg-cache" / "diffbench"
    assert any(cache.rglob("*.pt")) and not (REPO / ".diffbench_cache").exists()  # trained into the user's cache

    smoke = yaml.safe_load((SUITES_DIR / "smoke.yaml").read_text())
    smoke["entries"] = [e for e in smoke["entries"] if e["name"] == "ddim"]
    again = root / "elsewhere" / "again.yaml"
    again.write_text(yaml.safe_dump(smoke))
    r = _diffbench(installed, "run", "--suite", str(again), "--out", "again", "--no-progress", "--no-report")
    assert r.returncode == 0, r.stderr[-3000:]
    recs = load_records(root / "elsewhere" / "again")
    assert recs and all(rec["status"] == "ok" and not rec["train_sec"] for rec in recs)


if sys.platform == "win32":  # pragma: no cover - the venv layout above is POSIX's
    pytest.skip("POSIX virtual-environment layout", allow_module_level=True)
