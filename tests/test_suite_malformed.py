"""Malformed suites are refused before any work: through the CLI, exit code 2, every problem named in one message,
no traceback, nothing written in --out.  The YAML loader refuses duplicate keys, alias bombs, deep nesting,
non-UTF-8 bytes, folders and oversized files; the size bounds (bench_core/limits.py) are lifted by --allow-large
only; the shipped suites still parse."""
from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bench_core.cli import main
from bench_core.limits import MAX_SEED, MAX_STEPS, Range
from bench_core.suite import SUITES_DIR, SuiteError, load_suite, parse_suite


def entry(**kw) -> str:
    """One suite with one entry (a DDPM digits model sampled by DDIM unless overridden), as YAML text."""
    e = {"name": "e", "reproduction": "ddpm", "model": "digits", "sampler": "ddim", "steps": 10, **kw}
    return yaml.safe_dump({"name": "t", "entries": [e]}, sort_keys=False)


def billion_laughs(levels: int = 10) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


EDM = {"reproduction": "edm", "model": "digits", "sampler": "heun"}
KARRAS = {"kind": "karras"}

# (id, suite text or bytes, distinctive part of the message)
CASES = [
    # --- sampler options: finite, in their declared range, known
    ("eta-nan", "name: t\nentries:\n  - {name: e, reproduction: ddpm, model: digits, sampler: ddim, "
                "sampler_opts: {eta: .nan}, steps: 10}\n", "option 'eta' must be a finite number, got nan"),
    ("churn-inf", "name: t\nentries:\n  - {name: e, reproduction: edm, model: digits, sampler: edm_stochastic, "
                  "sampler_opts: {S_churn: .inf}, grid: {kind: karras}, steps: 10}\n",
     "option 'S_churn' must be a finite number, got inf"),
    ("eta-negative", entry(sampler_opts={"eta": -1.0}), "option 'eta' must be >= 0.0, got -1.0"),
    ("eta-string", entry(sampler_opts={"eta": "lots"}), "option 'eta' must be float, got str 'lots'"),
    ("option-unknown", entry(sampler_opts={"zeta": 1}), "sampler 'ddim' has no option 'zeta'"),
    ("option-empty-list", entry(sampler_opts={"eta": []}), "an option has an empty list"),
    ("langevin-T-huge", entry(reproduction="ncsn", model="toy", sampler="annealed_langevin",
                              sampler_opts={"T": 10**8}, grid={"kind": "geometric"}),
     "option 'T': 100000000 is above the bound 10_000 (MAX_SAMPLER_INT"),
    ("order-above-max", entry(sampler="dpm_solver", sampler_opts={"order": 7}, grid=KARRAS),
     "option 'order' must be <= 3, got 7"),
    # --- grids
    ("rho-zero", entry(**EDM, grid={"kind": "karras", "rho": 0}), "grid.rho: must be a finite number > 0, got 0"),
    ("rho-negative", entry(**EDM, grid={"kind": "karras", "rho": [7, -7]}), "grid.rho: must be a finite number > 0"),
    ("rho-nan", "name: t\nentries:\n  - {name: e, reproduction: edm, model: digits, sampler: heun, "
                "grid: {kind: karras, rho: .nan}, steps: 10}\n", "grid.rho: must be a finite number > 0, got nan"),
    ("sigma-min-negative", entry(**EDM, grid={"kind": "karras", "sigma_min": -1.0}),
     "grid.sigma_min: must be a finite number > 0, got -1.0"),
    ("sigma-min-above-max", entry(**EDM, grid={"kind": "karras", "sigma_min": 5.0, "sigma_max": 1.0}),
     "sigma_min must be below sigma_max, got sigma_min 5.0 >= sigma_max 1.0"),
    ("sigma-max-inf", "name: t\nentries:\n  - {name: e, reproduction: edm, model: digits, sampler: heun, "
                      "grid: {kind: karras, sigma_max: .inf}, steps: 10}\n",
     "grid.sigma_max: must be a finite number > 0, got inf"),
    ("grid-unknown-kind", entry(grid={"kind": "spiral"}), "unknown grid 'spiral'"),
    ("grid-unknown-key", entry(grid={"kind": "karras", "rhoo": 7}), "grid: unknown key 'rhoo'"),
    ("uniform-on-continuous", entry(**EDM, grid={"kind": "uniform"}),
     "needs a discrete-time model; edm/digits is continuous-time"),
    ("quadratic-on-continuous", entry(reproduction="ncsn", model="toy", sampler="annealed_langevin",
                                      grid={"kind": "quadratic"}), "ncsn/toy is continuous-time"),
    ("default-grid-on-continuous", entry(reproduction="consistency", model="cd-digits", sampler="consistency",
                                         steps=2), "grid kind 'uniform' (the default when an entry gives no grid)"),
    ("ddim-steps-above-T", entry(steps=5000, grid={"kind": "uniform"}),
     "5000 steps on grid kind 'uniform' are more than the model's T = 1000"),
    ("steps-above-T-40", entry(reproduction="sohl_dickstein", model="swiss_roll", sampler="ddpm", steps=[40, 41]),
     "41 steps on grid kind 'uniform' (the default when an entry gives no grid) are more than the model's T = 40"),
    # --- sizes and seeds
    ("steps-huge", entry(steps=10**9, grid=KARRAS), "steps: 1000000000 is above the bound 10_000 (MAX_STEPS"),
    ("steps-zero", entry(steps=0), "steps: expected a positive integer or a list of them, got 0"),
    ("steps-string", entry(steps="ten"), "steps: expected a positive integer or a list of them, got 'ten'"),
    ("num-samples-huge", entry(num_samples=10**12), "num_samples: 1000000000000 is above the bound 1_000_000"),
    ("num-samples-zero", entry(num_samples=0), "num_samples: must be >= 1, got 0"),
    ("batch-size-zero", entry(batch_size=0), "batch_size: must be >= 1, got 0"),
    ("seed-2-63", entry(seeds=[0, 2**63]), "seeds: 9223372036854775808 is above the largest seed the generators"),
    ("seed-2-32", entry(seeds=2**32), "seeds: seed 4294967296 is above the bound 4_294_967_295 (MAX_SEED"),
    ("seed-negative", entry(seeds=[-1]), "seeds: expected non-negative integers, got [-1]"),
    ("train-seed-huge", entry(train_seeds=[2**40]), "train_seeds: seed 1099511627776 is above the bound"),
    ("timing-repeats-huge", entry(timing_repeats=10**6), "timing_repeats: 1000000 is above the bound 1_000 "),
    ("too-many-runs", entry(steps=list(range(1, 101)), seeds=list(range(100)),
                            sampler_opts={"eta": [i / 10 for i in range(11)]}, grid=KARRAS),
     "the suite expands into 110_000 runs up to this entry (this one: 110_000), above the bound 100_000 (MAX_RUNS"),
    ("timeout-negative", entry(timeout=-1), "timeout: must be a finite number of seconds >= 0"),
    # --- model_overrides against their fields' ranges
    ("train-steps-negative", entry(model_overrides={"train": {"steps": -5}}), "train.steps: must be >= 1, got -5"),
    ("lr-nan", "name: t\nentries:\n  - {name: e, reproduction: ddpm, model: digits, sampler: ddim, steps: 10, "
               "model_overrides: {train: {lr: .nan}}}\n", "train.lr: must be a finite number, got nan"),
    ("train-batch-zero", entry(model_overrides={"train": {"batch_size": 0}}), "train.batch_size: must be >= 1, got 0"),
    ("train-steps-huge", entry(model_overrides={"train": {"steps": 10**8}}),
     "train.steps: value 100000000 is above the bound 10_000_000 (MAX_TRAIN_STEPS"),
    ("base-train-steps-huge", entry(reproduction="speed", model="ddpm-digits-fast",
                                    model_overrides={"base_overrides": {"train": {"steps": 10**8}}}),
     "base_overrides.train.steps: value 100000000 is above the bound"),
    ("base-lr-negative", entry(reproduction="qdiffusion", model="digits-w8a8-naive",
                               model_overrides={"base_overrides": {"train": {"lr": -1.0}}}),
     "base_overrides.train.lr: must be > 0.0, got -1.0"),
    ("ema-decay-one", entry(model_overrides={"train": {"ema_decay": 1.5}}), "train.ema_decay: must be < 1.0, got 1.5"),
    ("T-zero", entry(model_overrides={"T": 0}), "model_overrides: T: must be >= 1, got 0"),
    ("override-unknown-field", entry(model_overrides={"train": {"stepz": 3}}), "train.stepz: unknown field"),
    ("override-wrong-type", entry(model_overrides={"train": {"lr": "fast"}}), "train.lr: expected float, got str"),
    ("base-model-unknown", entry(reproduction="adm", model="guided", model_overrides={"base_model": "nope"}),
     "base_model: unknown ddpm preset 'nope'"),
    ("guidance-scale-negative", entry(reproduction="adm", model="guided", model_overrides={"scale": -2.0}),
     "the guidance scale must be >= 0"),
    # --- structure (the cases tests/test_suite.py and test_cli_paths.py already had, through the CLI)
    ("top-level-unknown-key", "name: t\ncolour: red\nentries: []\n", "unknown top-level key 'colour'"),
    ("entries-missing", "name: t\n", "missing key 'entries'"),
    ("entries-empty", "name: t\nentries: []\n", "entries: the list is empty"),
    ("top-level-list", "- a\n- b\n", "the top level must be a mapping"),
    ("empty-file", "", "the top level must be a mapping"),
    ("reproduction-unknown", entry(reproduction="alchemy"), "unknown reproduction 'alchemy'"),
    ("model-unknown", entry(model="imagenet"), "unknown model 'imagenet'"),
    ("sampler-unknown", entry(sampler="warp-drive"), "unknown sampler 'warp-drive'"),
    ("entry-missing-keys", "name: t\nentries:\n  - {name: g}\n", "missing required key 'reproduction'"),
    ("entry-unknown-key", entry(bogus=1), "unknown key 'bogus'"),
    ("entry-not-mapping", "name: t\nentries: [3]\n", "entries[0]: expected a mapping, got int"),
    ("entry-names-duplicate", "name: t\nentries:\n"
                              "  - {name: e, reproduction: ddpm, model: digits, sampler: ddim, steps: 10}\n"
                              "  - {name: e, reproduction: ddpm, model: digits, sampler: ddim, steps: 20}\n",
     "duplicate entry name"),
    ("defaults-wrong-type", "name: t\ndefaults: {num_samples: many}\nentries:\n"
                            "  - {name: e, reproduction: ddpm, model: digits, sampler: ddim, steps: 10}\n",
     "defaults.num_samples: expected integer"),
    ("train-seeds-negative", entry(train_seeds=[-1]), "train_seeds: expected non-negative integers"),
    # --- the file itself
    ("duplicate-top-key", "name: t\nname: u\nentries: []\n", "duplicate key 'name' at line 2, column 1 (first at line 1"),
    ("duplicate-entry-key", "name: t\nentries:\n  - name: e\n    reproduction: ddpm\n    model: digits\n"
                            "    sampler: ddim\n    steps: 10\n    steps: 5000\n",
     "duplicate key 'steps' at line 8, column 5 (first at line 7, column 5)"),
    ("billion-laughs", billion_laughs(), "aliases are expanded (an alias bomb?)"),
    ("recursive-alias", "name: t\nentries: &x [*x]\n", "a recursive alias"),
    ("deep-nesting", "name: t\nentries: " + "[" * 50_000 + "]" * 50_000 + "\n", "nested deeper than 64 levels"),
    ("deep-block-nesting", "name: t\nentries:\n" + "".join("  " * (i + 1) + f"- k{i}:\n" for i in range(80)),
     "nested deeper than 64 levels"),
    ("not-utf8", b"name: t\xff\xfe\nentries: []\n", "not UTF-8 text: byte 0xff at offset 7 (line 1)"),
    ("not-yaml", "entries: [unclosed", "not valid YAML: expected ',' or ']'"),
    ("python-tag", "name: !!python/object/apply:os.system [echo hi]\nentries: []\n",
     "could not determine a constructor for the tag"),
    ("two-documents", "name: t\n---\nname: u\n", "expected a single document"),
    ("too-large", "name: t\nentries: []\n" + "#" * 1_000_001 + "\n", "larger than 1_000_000 bytes (MAX_SUITE_BYTES"),
]


@pytest.fixture(autouse=True)
def no_work(monkeypatch):
    """A suite that is wrongly accepted fails its test at once instead of training and sampling."""
    import bench_core.runner as runner_mod

    def refuse(*a, **k):
        raise AssertionError("the suite was accepted and work started")

    monkeypatch.setattr(runner_mod, "run_suite", refuse)


def _assert_refused(rc: int, err: str, needle: str, out: Path) -> None:
    assert rc == 2, err
    assert needle in err, err
    assert err.startswith("error: suite ") and "problem(s); nothing was run" in err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("case_id,text,needle", CASES, ids=[c[0] for c in CASES])
def test_malformed_suite_is_refused_by_the_cli(case_id, text, needle, tmp_path, capsys):
    path, out = tmp_path / "suite.yaml", tmp_path / "out"
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    t0 = time.perf_counter()
    rc = main(["run", "--suite", str(path), "--out", str(out), "--no-progress"])
    elapsed = time.perf_counter() - t0
    cap = capsys.readouterr()
    _assert_refused(rc, cap.err, needle, out)
    assert cap.out == ""
    assert elapsed < 5.0, f"{case_id}: {elapsed:.1f} s"


def test_the_table_covers_forty_cases():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


def test_every_problem_of_a_suite_in_one_message(tmp_path, capsys):
    """Several bad entries, each with its own problem: one message names all of them."""
    bad = {"name": "t", "entries": [
        {"name": "a", "reproduction": "ddpm", "model": "digits", "sampler": "ddim", "steps": 5000},
        {"name": "b", "reproduction": "edm", "model": "digits", "sampler": "heun", "steps": 10,
         "grid": {"kind": "karras", "rho": 0}},
        {"name": "c", "reproduction": "ddpm", "model": "digits", "sampler": "ddim", "steps": 10,
         "model_overrides": {"train": {"steps": -5, "batch_size": 0}}},
        {"name": "d", "reproduction": "ddpm", "model": "digits", "sampler": "ddim", "steps": 10, "num_samples": 10**12}]}
    with pytest.raises(SuiteError) as ei:
        parse_suite(bad)
    assert [p.split(":")[0] for p in ei.value.problems] == [
        "entries[0] (a).steps", "entries[1] (b).grid.rho", "entries[2] (c).model_overrides",
        "entries[2] (c).model_overrides", "entries[3] (d).num_samples"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "has 5 problem(s)" in err and err.count("\n  - ") == 5


def test_cli_exit_code_2_in_a_real_process(tmp_path):
    """A real `diffbench run` on an alias bomb and on non-UTF-8 bytes: exit code 2, one message, no traceback."""
    bomb, out = tmp_path / "bomb.yaml", tmp_path / "out"
    bomb.write_text(billion_laughs(12))
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "bench_core.cli", "run", "--suite", str(bomb), "--out", str(out)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert time.perf_counter() - t0 < 60  # the bomb (10^12 nodes expanded) is refused without expanding it
    assert res.returncode == 2, res.stderr
    assert "alias bomb" in res.stderr and "Traceback" not in res.stderr and res.stdout == ""
    assert not out.exists()


def test_a_folder_named_like_a_builtin_suite_does_not_shadow_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smoke").mkdir()
    assert main(["validate", "smoke"]) == 0  # the built-in suite wins over ./smoke
    assert capsys.readouterr().out.startswith("suite smoke is valid:")
    assert load_suite("smoke").source == str(SUITES_DIR / "smoke.yaml")
    # asked for as a path, the folder is named as what it is, with the known suites
    assert main(["run", "--suite", "./smoke", "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert "smoke is a folder, not a suite file" in err and "known suites:" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    (tmp_path / "folder.yaml").mkdir()  # a folder with a suite's extension
    assert main(["validate", "folder.yaml"]) == 2
    assert "folder.yaml is a folder, not a suite file" in capsys.readouterr().err
    for missing, needle in (("no-such-suite", "no suite named 'no-such-suite'; known suites: "),
                            ("gone.yaml", "suite file gone.yaml does not exist")):
        assert main(["validate", missing]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.startswith("error: suite ") and "Traceback" not in err


@pytest.mark.parametrize("path", sorted(SUITES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_suites_parse_with_the_safe_loader_and_the_bounds(path):
    """Every shipped suite (DDPM 1000 steps, cifar10, qdiffusion included) is valid without --allow-large, and
    the safe loader reads what yaml.safe_load reads."""
    from bench_core.suite_yaml import read_suite_file

    assert read_suite_file(path) == yaml.safe_load(path.read_text())
    suite = load_suite(str(path))
    assert suite.runs and all(r.steps <= MAX_STEPS and r.seed <= MAX_SEED for r in suite.runs)


def test_the_loader_keeps_merge_keys_and_reads_anchors():
    from bench_core.suite_yaml import parse_yaml_text

    text = "base: &b {x: 1, y: 2}\nm:\n  <<: *b\n  x: 3\nl: [*b, *b]\n"
    assert parse_yaml_text(text) == {"base": {"x": 1, "y": 2}, "m": {"x": 3, "y": 2}, "l": [{"x": 1, "y": 2}] * 2}


def test_allow_large_lifts_the_size_bounds_and_only_them(tmp_path, capsys):
    big = {"name": "big", "entries": [
        {"name": "a", "reproduction": "ddpm", "model": "digits", "sampler": "ddim", "steps": 20_000,
         "grid": {"kind": "karras"}, "num_samples": 2_000_000, "seeds": [2**32], "train_seeds": [2**33],
         "model_overrides": {"train": {"steps": 20_000_000}}},
        {"name": "b", "reproduction": "ncsn", "model": "toy", "sampler": "annealed_langevin", "steps": 2,
         "sampler_opts": {"T": 50_000}, "grid": {"kind": "geometric"}}]}
    with pytest.raises(SuiteError) as ei:
        parse_suite(big)
    assert len(ei.value.problems) == 6 and all("--allow-large" in p for p in ei.value.problems)
    suite = parse_suite(big, allow_large=True)
    assert [(r.steps, r.num_samples, r.seed, r.train_seed) for r in suite.runs[:1]] == [(20_000, 2_000_000, 2**32, 2**33)]
    assert suite.runs[0].model_overrides["train"]["steps"] == 20_000_000
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(big))
    assert main(["validate", str(path)]) == 2
    assert "MAX_STEPS in bench_core/limits.py); pass --allow-large" in capsys.readouterr().err
    assert main(["validate", "--allow-large", str(path)]) == 0
    assert "suite big is valid: 2 runs" in capsys.readouterr().out
    # the hard limits hold with --allow-large: T of a timestep grid, a seed the generators cannot take
    hard = {"name": "hard", "entries": [
        {"name": "a", "reproduction": "ddpm", "model": "digits", "sampler": "ddim", "steps": 5000},
        {"name": "b", "reproduction": "ddpm", "model": "digits", "sampler": "ddim", "steps": 5, "seeds": [2**63]},
        {"name": "c", "reproduction": "ddpm", "model": "digits", "sampler": "ddim", "steps": 5,
         "model_overrides": {"train": {"lr": -1.0}}}]}
    with pytest.raises(SuiteError) as ei:
        parse_suite(hard, allow_large=True)
    assert len(ei.value.problems) == 3


def test_run_passes_allow_large_and_the_train_seed_to_the_validator(tmp_path, monkeypatch, capsys):
    import bench_core.suite as suite_mod

    seen = {}

    def fake_load_suite(name, train_seed_offset=0, allow_large=False):
        seen.update(name=name, offset=train_seed_offset, allow_large=allow_large)
        raise SuiteError(name, ["stop here"])

    monkeypatch.setattr(suite_mod, "load_suite", fake_load_suite)
    assert main(["run", "--suite", "x.yaml", "--allow-large", "--train-seed", "3", "--out", str(tmp_path / "o")]) == 2
    assert seen == {"name": "x.yaml", "offset": 3, "allow_large": True}
    assert "stop here" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_train_seed_offset_is_bounded_too(tmp_path, capsys):
    path, out = tmp_path / "s.yaml", tmp_path / "out"
    path.write_text(entry())
    assert main(["run", "--suite", str(path), "--out", str(out), "--train-seed", str(2**32)]) == 2
    _assert_refused(2, capsys.readouterr().err, "train_seeds: seed 4294967296 is above the bound", out)


def test_evaluate_uses_the_same_validator(tmp_path):
    """evaluate() refuses what a suite entry would, before any work (the dataset is bad too, so nothing runs)."""
    import torch

    from bench_core import evaluate
    from bench_core.denoiser import DiscreteVPEpsDenoiser, GaussianDenoiser
    from bench_core.schedules import alphas_cumprod, linear_betas

    kw = dict(dataset="no-such-data", out=tmp_path / "o", progress=False)
    with pytest.raises(ValueError) as e:
        evaluate(GaussianDenoiser(), samplers=["ddim", "heun"], steps=[10, 20_000], grid={"kind": "karras", "rho": 0},
                 sampler_opts={"ddim": {"eta": math.nan}}, seeds=[2**32], **kw)
    msg = str(e.value)
    for part in ("option 'eta' must be a finite number, got nan", "grid.rho: must be a finite number > 0",
                 "steps: 20000 is above the bound 10_000", "seeds: seed 4294967296 is above the bound",
                 "no-such-data"):
        assert part in msg, part
    assert msg.count("grid.rho") == 1  # one message per problem, not one per sampler
    with pytest.raises(ValueError) as e:  # a timestep grid on a continuous denoiser
        evaluate(GaussianDenoiser(), samplers=["ddim"], steps=[10], grid="uniform", **kw)
    assert "the denoiser 'my-model' is continuous-time" in str(e.value)
    den = DiscreteVPEpsDenoiser(torch.nn.Identity(), alphas_cumprod(linear_betas(1000)))
    with pytest.raises(ValueError) as e:  # more steps than the discrete denoiser's T
        evaluate(den, samplers=["ddim"], steps=[5000], allow_large=True, **kw)
    assert "5000 steps on grid kind 'uniform' are more than the model's T = 1000" in str(e.value)
    with pytest.raises(ValueError) as e:  # allow_large lifts the bound: only the dataset is left
        evaluate(GaussianDenoiser(), samplers=["heun"], steps=[20_000], allow_large=True, **kw)
    assert "MAX_STEPS" not in str(e.value) and "no-such-data" in str(e.value)
    assert not (tmp_path / "o").exists()


def test_every_preset_is_within_its_fields_ranges():
    """The ranges the validator applies to overrides hold for every preset (none would refuse its own default)."""
    from dataclasses import fields, is_dataclass

    import reproductions
    from bench_core.limits import field_range

    def walk(cfg, path):
        for f in fields(cfg):
            v = getattr(cfg, f.name)
            if is_dataclass(v):
                yield from walk(v, f"{path}{f.name}.")
            elif (r := field_range(f)) is not None:
                yield f"{path}{f.name}", r.check(v)

    checked = 0
    for rep in reproductions.discover().values():
        for model in rep.models:
            cfg = rep.model_config(model, {})
            assert rep.size_errors(cfg) == [], (rep.name, model)
            for name, msg in walk(cfg, f"{rep.name}/{model}:"):
                assert msg is None, (name, msg)
                checked += 1
    assert checked > 100


def test_range_checks():
    r = Range(gt=0.0, lt=1.0, large=("MAX_X", 10))
    assert r.check(0.5) is None and r.check(True) is None and r.check("a") is None
    assert r.check(0.0) == "must be > 0.0, got 0.0" and r.check(1.0) == "must be < 1.0, got 1.0"
    assert r.check(math.nan) == "must be a finite number, got nan"
    big = Range(ge=1, large=("MAX_X", 10))
    assert big.check(11).startswith("value 11 is above the bound 10 (MAX_X") and big.check(11, allow_large=True) is None


def test_timestep_declarations_match_the_denoisers():
    """A reproduction's declared T is the length of its denoiser's timestep table (built here without training)."""
    import torch

    import reproductions
    from bench_core.denoiser import DiscreteVPEpsDenoiser, SDEEpsDenoiser

    ddpm = reproductions.get("ddpm")
    cfg = ddpm.model_config("digits", {"T": 300})
    den = DiscreteVPEpsDenoiser(torch.nn.Identity(), torch.cumprod(1 - cfg.betas(), 0))
    assert ddpm.timesteps("digits", cfg) == len(den.sigmas) == 300
    sde = reproductions.get("score_sde")
    cfg = sde.model_config("digits_vp", {})
    assert sde.timesteps("digits_vp", cfg) == len(SDEEpsDenoiser(torch.nn.Identity(), cfg.sde).sigmas)
    assert sde.timesteps("gmm_exact", sde.model_config("gmm_exact", {})) is None
    for rep, model in (("edm", "digits"), ("consistency", "cd-digits"), ("ncsn", "digits"), ("ncsn", "toy")):
        r = reproductions.get(rep)
        assert r.timesteps(model, r.model_config(model, {})) is None, (rep, model)
    for rep, model in (("adm", "guided"), ("adm", "cfg"), ("ldm", "f4"), ("qdiffusion", "digits-w8a8-naive"),
                       ("speed", "ddpm-digits-fast"), ("sohl_dickstein", "swiss_roll")):
        r = reproductions.get(rep)
        assert r.timesteps(model, r.model_config(model, {})) == (40 if rep == "sohl_dickstein" else 1000)

