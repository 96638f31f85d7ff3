"""The Python API (bench_core.evaluate): the README's example runs as written; errors before any work."""
import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    block = re.search(r"<!-- api-example:start -->\s*```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFBENCH_CACHE", str(tmp_path / "cache"))
    exec(compile(block, "README.md:api-example", "exec"), {"__name__": "readme_example"})
    recs = [json.loads(line) for line in (tmp_path / "my-results" / "records.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and all(r["status"] == "ok" for r in recs)
    assert {(r["sampler"], r["steps"], r["nfe"]) for r in recs} == {("ddim", 5, 5), ("ddim", 10, 10),
                                                                     ("heun", 5, 9), ("heun", 10, 19)}
    assert all(r["fid"] is not None and r["num_samples"] == 64 and r["model"] == "my-unet" for r in recs)
    assert "| rank " in capsys.readouterr().out
    assert any((tmp_path / "my-results" / "plots").glob("fid_vs_nfe__*.png"))


def test_bad_arguments_are_reported_together_before_any_work(tmp_path):
    from bench_core import evaluate
    from bench_core.denoiser import GaussianDenoiser

    with pytest.raises(ValueError) as e:
        evaluate(GaussianDenoiser(), samplers=["nope", "ddim"], steps=[0], sampler_opts={"ddim": {"eta": "x"}},
                 grid="spiral", dataset="no-such-data", out=tmp_path / "o", progress=False)
    msg = str(e.value)
    for part in ("unknown sampler 'nope'", "option 'eta' must be float", "steps: expected a positive integer",
                 "unknown grid 'spiral'", "no-such-data"):
        assert part in msg, part
    assert not (tmp_path / "o").exists()
