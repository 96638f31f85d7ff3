"""Reproductions built on a trained ddpm model (adm ``guided``, qdiffusion, speed): one validation of
``base_model`` / ``base_overrides`` with one message style (field, value given, what is allowed), through
``override_errors``, ``model_hash`` and a suite, before any work starts; the base model's hash is the ddpm one."""
import re

import pytest
import yaml

import reproductions
from bench_core.cli import main
from bench_core.suite import SuiteError, parse_suite

BUILT_ON_DDPM = [("adm", "guided"), ("qdiffusion", "digits-w8a8-naive"), ("speed", "ddpm-digits-fast")]
UNKNOWN = "base_model: unknown ddpm preset 'nope' (known: digits, digits-vlb, cifar10)"  # reproductions/ddpm.py MODELS


@pytest.mark.parametrize("rep,model", BUILT_ON_DDPM)
def test_unknown_base_preset_names_field_value_and_choices(rep, model):
    r = reproductions.get(rep)
    assert r.override_errors(model, {"base_model": "nope"}) == [UNKNOWN]
    with pytest.raises(ValueError, match=re.escape(UNKNOWN)):
        r.model_hash(model, {"base_model": "nope"})


@pytest.mark.parametrize("rep,model", BUILT_ON_DDPM)
def test_bad_base_override_names_its_path(rep, model):
    r = reproductions.get(rep)
    errs = r.override_errors(model, {"base_overrides": {"train": {"stepz": 3}}})
    assert len(errs) == 1 and errs[0].startswith("base_overrides.train.stepz: unknown field (known: ")
    assert "steps" in errs[0]
    bad_type = {"base_overrides": {"T": "many"}}
    assert r.override_errors(model, bad_type) == ["base_overrides.T: expected int, got str 'many'"]
    with pytest.raises(ValueError, match=re.escape("base_overrides.T: expected int, got str 'many'")):
        r.model_hash(model, bad_type)  # never a hash of a config that cannot be built
    with pytest.raises(ValueError, match="base_overrides: expected a mapping of ddpm config fields, got int 5"):
        r.model_hash(model, {"base_overrides": 5})


def test_suite_reports_each_entry_and_field_before_any_work(tmp_path, capsys):
    entries = [{"name": f"{rep}-bad", "reproduction": rep, "model": model, "sampler": "ddim", "steps": 2,
                "model_overrides": {"base_model": "nope"}} for rep, model in BUILT_ON_DDPM]
    with pytest.raises(SuiteError) as ei:
        parse_suite({"name": "bad-base", "entries": entries})
    assert ei.value.problems == [f"entries[{i}] ({rep}-bad).model_overrides: {UNKNOWN}"
                                 for i, (rep, _) in enumerate(BUILT_ON_DDPM)]
    path, out = tmp_path / "bad.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump({"name": "bad-base", "entries": entries}))
    assert main(["run", "--suite", str(path), "--out", str(out), "--no-progress"]) == 2
    assert UNKNOWN in capsys.readouterr().err
    assert not out.exists()


def test_base_model_hash_is_the_ddpm_hash():
    ddpm = reproductions.get("ddpm")
    ov = {"train": {"steps": 60, "warmup": 10}}
    # speed runs the ddpm weights unchanged: its model hash is the ddpm model's
    assert reproductions.get("speed").model_hash("ddpm-digits-fast", {"base_overrides": ov}) == \
        ddpm.model_hash("digits", ov)
    for rep, model in BUILT_ON_DDPM:
        r = reproductions.get(rep)
        cfg = r.model_config(model, {"base_overrides": ov})
        assert r.base_hash(cfg) == ddpm.model_hash("digits", ov)
        assert r.base_config(cfg) == ddpm.model_config("digits", ov)
