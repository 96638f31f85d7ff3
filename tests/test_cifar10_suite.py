"""The paper-scale CIFAR-10 suite, offline: a small CIFAR-format dataset and an Inception weights file written
by the test stand in for the real files, so the whole path (CIFAR reader, the DDPM CIFAR-10 U-Net, the
inception-v3-compat FID) runs without a download.  Only sizes are shrunk: training steps, samples, steps."""
import json

import pytest
import yaml

from bench_core.cli import main
from bench_core.suite import SUITES_DIR, load_suite
from test_data import _write_tiny_cifar


def test_cifar10_suite_is_the_papers_setting():
    suite = load_suite("cifar10")
    assert {r.num_samples for r in suite.runs} == {50000}
    assert {(r.reproduction, r.model) for r in suite.runs} == {
        ("ddpm", "cifar10"), ("ddim", "cifar10"), ("edm", "cifar10"), ("consistency", "cd-cifar10"),
        ("consistency", "ct-cifar10")}


def test_missing_cifar_files_are_named_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFBENCH_DATA", str(tmp_path / "no-data"))
    out = tmp_path / "out"
    assert main(["run", "--suite", "cifar10", "--out", str(out), "--cache-dir", str(tmp_path / "c"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cifar-10-python.tar.gz" in err and "data_batch_1" in err and "nothing was run" in err
    assert not (out / "records.jsonl").exists()


@pytest.mark.filterwarnings("ignore:Inception weights")
def test_cifar10_suite_runs_offline_with_user_files(tmp_path, monkeypatch, random_inception_weights):  # noqa: F811
    _write_tiny_cifar(tmp_path / "data", per_batch=4)
    monkeypatch.setenv("DIFFBENCH_DATA", str(tmp_path / "data"))
    data = yaml.safe_load((SUITES_DIR / "cifar10.yaml").read_text())
    entry = next(e for e in data["entries"] if e["name"] == "ddim-cifar10")
    entry.update(sampler_opts={"eta": 0.0}, grid={"kind": "uniform"}, steps=[2],
                 model_overrides={"train": {"steps": 1, "warmup": 1, "batch_size": 2}})
    data.update(entries=[entry], defaults={"num_samples": 8, "batch_size": 8, "seeds": [0]})
    path = tmp_path / "cifar10-small.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert main(["run", "--suite", str(path), "--out", str(out), "--cache-dir", str(tmp_path / "c"),
                 "--inception-weights", str(random_inception_weights), "--no-progress", "--no-report"]) == 0
    (r,) = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert r["status"] == "ok" and r["model"] == "cifar10" and r["nfe"] == 2
    assert r["fid_extractor"].startswith("inception-v3-compat@") and r["fid"] is not None
    assert r["fid_reference"].startswith("cifar10")
