"""Output folders derived from a suite's name stay inside runs/; --train-seed shifts every training seed."""
from __future__ import annotations

import pytest

from bench_core.cli import main, suite_slug


@pytest.mark.parametrize("name,slug", [("default", "default"), ("my suite/x", "my-suite-x"), ("ok-1.2", "ok-1.2"),
                                       ("../etc", None), ("/abs", None), ("..", None), ("a/../b", None),
                                       ("///", None)])
def test_suite_slug(name, slug):
    assert suite_slug(name) == slug


def test_run_refuses_a_suite_name_outside_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    suite = tmp_path / "s.yaml"
    suite.write_text("name: ../../escape\nentries:\n  - {name: a, reproduction: ncsn, model: toy, sampler: langevin, "
                     "sampler_opts: {T: 2}, grid: {kind: geometric, sigma_min: 1.0, sigma_max: 20.0}, steps: 2, "
                     "num_samples: 8}\n")
    assert main(["run", "--suite", str(suite), "--no-progress"]) == 2
    assert "cannot name an output folder" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path.parent / "escape").exists()


def test_train_seed_offset_changes_every_model_hash():
    from bench_core.suite import parse_suite

    data = {"name": "t", "entries": [
        {"name": "a", "reproduction": "ddpm", "model": "digits", "sampler": "ddim", "steps": 5},
        {"name": "b", "reproduction": "ddpm", "model": "digits", "sampler": "ddim", "steps": 5, "train_seeds": [0, 1]}]}
    base = parse_suite(data)
    shifted = parse_suite(data, train_seed_offset=3)
    assert [r.train_seed for r in base.runs] == [0, 0, 1] and [r.train_seed for r in shifted.runs] == [3, 3, 4]
    assert base.runs[0].model_hash == base.runs[1].model_hash != base.runs[2].model_hash
    assert len({r.model_hash for r in base.runs + shifted.runs}) == 4
    # seed 0 is the preset as written; another seed offsets the training seed in the overrides
    assert base.runs[0].model_overrides == {} and base.runs[2].model_overrides["train"]["seed"] == 1
    with pytest.raises(Exception, match="train_seeds"):
        parse_suite({"name": "t", "entries": [dict(data["entries"][0], train_seeds=[-1])]})


def test_default_cache_is_the_user_cache_folder(tmp_path, monkeypatch):
    """Never the source tree: $DIFFBENCH_CACHE, else $XDG_CACHE_HOME/diffbench, else ~/.cache/diffbench (a relative
    $XDG_CACHE_HOME is ignored, as the XDG specification says); datasets under its data/ unless $DIFFBENCH_DATA."""
    from bench_core.data import default_data_root
    from bench_core.train import default_cache_dir

    monkeypatch.delenv("DIFFBENCH_CACHE", raising=False)
    monkeypatch.delenv("DIFFBENCH_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "diffbench"
    assert default_data_root() == tmp_path / "xdg" / "diffbench" / "data"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "diffbench"
    monkeypatch.setenv("DIFFBENCH_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    assert default_data_root() == tmp_path / "home" / ".cache" / "diffbench" / "data"  # the model cache's variable only
