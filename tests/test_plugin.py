"""The plugin contract: discovery once at the entry points, every import error reported, no paper imported by
the harness's own modules, and a paper added from outside the bundled package (examples/papers/toy_gmm.py,
README "Add a paper") running end to end."""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from bench_core import plugin
from bench_core.cli import main
from bench_core.records import load_records

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def fresh_discovery(monkeypatch):
    """Discovery as if nothing had run yet, on a copy of the registry (the real one is restored afterwards)."""
    plugin.discover(strict=False)  # the bundled papers registered once (a module already imported registers no more)
    monkeypatch.setattr(plugin, "REGISTRY", dict(plugin.REGISTRY))
    monkeypatch.setattr(plugin, "_discovered", False)
    monkeypatch.setattr(plugin, "_ERRORS", {})


def test_no_harness_module_imports_a_paper():
    offenders = []
    for path in sorted((REPO / "bench_core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names
                          if n == "reproductions" or n.startswith("reproductions.")]
    assert offenders == []


def test_getting_a_shared_sampler_imports_no_paper_and_no_pandas():
    code = ("import sys\nfrom bench_core.samplers import get_sampler\nget_sampler('ddim'); get_sampler('heun')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('reproductions', 'pandas')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert r.stdout.strip() == "[]"


def _plugin_package(tmp_path, monkeypatch, broken: bool) -> str:
    pkg = tmp_path / "pluginpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "good.py").write_text(textwrap.dedent("""
        from bench_core.plugin import Reproduction, register

        class Good(Reproduction):
            name = "plugin_good"
            title = "a plugin that imports"

        register(Good())
    """))
    if broken:
        (pkg / "bad.py").write_text("raise RuntimeError('this paper module is broken')\n")
        (pkg / "worse.py").write_text("import a_module_that_does_not_exist\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("DIFFBENCH_PLUGINS", "pluginpkg")
    for m in [m for m in sys.modules if m.split(".")[0] == "pluginpkg"]:
        monkeypatch.delitem(sys.modules, m)
    return "pluginpkg"


def test_discovery_reports_every_broken_module_and_never_a_silent_partial_registry(tmp_path, monkeypatch,
                                                                                   fresh_discovery, capsys):
    _plugin_package(tmp_path, monkeypatch, broken=True)
    with pytest.raises(plugin.DiscoveryError) as ei:
        plugin.discover()
    assert set(ei.value.errors) == {"pluginpkg.bad", "pluginpkg.worse"}
    assert "this paper module is broken" in str(ei.value) and "a_module_that_does_not_exist" in str(ei.value)
    # a second call says it again (the failure is remembered, not forgotten), and imports nothing twice
    with pytest.raises(plugin.DiscoveryError):
        plugin.discover()
    reg = plugin.discover(strict=False)  # the partial registry, for the report, which shows the errors
    assert "plugin_good" in reg and "ddpm" in reg and "edm" in reg
    assert set(plugin.discovery_errors()) == {"pluginpkg.bad", "pluginpkg.worse"}
    with pytest.raises(KeyError, match=r"unknown reproduction 'bad'.*pluginpkg\.bad failed to import"):
        plugin.get("bad")
    # the CLI stops before any work, naming both
    assert main(["list", "reproductions"]) == 2
    err = capsys.readouterr().err
    assert "pluginpkg.bad" in err and "pluginpkg.worse" in err and "2 reproduction module(s) failed" in err


def test_a_lenient_first_discovery_warns_about_every_broken_module(tmp_path, monkeypatch, fresh_discovery):
    """evaluate() and get_sampler() go on with what registered: the first discovery says what was left out."""
    _plugin_package(tmp_path, monkeypatch, broken=True)
    with pytest.warns(RuntimeWarning, match=r"2 reproduction module\(s\) failed to import.*pluginpkg\.bad.*"
                                            r"pluginpkg\.worse"):
        reg = plugin.discover(strict=False)
    assert "plugin_good" in reg


def test_a_plugin_package_registers_its_papers(tmp_path, monkeypatch, fresh_discovery, capsys):
    _plugin_package(tmp_path, monkeypatch, broken=False)
    assert main(["list", "reproductions"]) == 0
    out = capsys.readouterr().out
    assert "plugin_good" in out and "ddpm" in out


def test_the_example_paper_runs_end_to_end(tmp_path, monkeypatch, fresh_discovery):
    """README "Add a paper": one module (examples/papers/toy_gmm.py), one suite entry, this test."""
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.setenv("DIFFBENCH_PLUGINS", "examples.papers")
    suite = tmp_path / "toy.yaml"
    suite.write_text(yaml.safe_dump({"name": "toy", "entries": [
        {"name": f"toy-{s}", "reproduction": "toy_gmm", "model": "ring8", "sampler": s, "steps": 10,
         "grid": {"kind": "karras"}, "num_samples": 256, "seeds": [0, 1, 2]} for s in ("euler", "heun")]}))
    out = tmp_path / "out"
    assert main(["run", "--suite", str(suite), "--out", str(out), "--cache-dir", str(tmp_path / "c"),
                 "--no-progress"]) == 0
    recs = load_records(out)
    assert len(recs) == 6 and all(r["status"] == "ok" and r["reproduction"] == "toy_gmm" for r in recs)
    assert {r["nfe"] for r in recs if r["sampler"] == "heun"} == {19.0}  # Heun: 2 calls per step, the last Euler
    sc = (out / "scorecard.csv").read_text()
    assert "toy-heun-beats-euler" in sc
