"""diffbench command line: run | leaderboard | plots | report | list | validate."""
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path

DEFAULT_SUITE = "default"
ALLOW_LARGE_HELP = ("accept values above the size bounds (steps, num_samples, seeds, training steps, runs; "
                    "bench_core/limits.py) that otherwise refuse a suite as a likely typo")


def _records_paths(args) -> list[Path]:
    paths = [Path(p) for p in (args.records or ["results"])]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise SystemExit(f"error: no records at {', '.join(map(str, missing))}; run `diffbench run` first "
                         f"or pass --records DIR_OR_FILE")
    return paths


def suite_slug(name: str) -> str | None:
    """The folder name a suite's name gives under runs/: letters, digits, '.', '_' and '-' (others become '-');
    None for a name that is absolute, walks up ('..') or has nothing left."""
    if not isinstance(name, str) or name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/"):
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")
    return slug or None


def _load_suite(name, train_seed: int = 0, allow_large: bool = False):
    """The validated suite, or None after printing every problem to stderr (a file that cannot be found, read or
    parsed included).  ``allow_large``: lift the size bounds of bench_core/limits.py (--allow-large)."""
    from .suite import SuiteError, load_suite  # noqa: PLC0415 - lazy: keeps the CLI start fast

    try:
        return load_suite(name, train_seed_offset=train_seed, allow_large=allow_large)
    except (SuiteError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def _dry_run(args, suite, out: Path) -> int:
    """List the runs, their NFE and an estimate of the time; nothing is trained, sampled or written."""
    from .dryrun import format_plan, plan  # noqa: PLC0415 - lazy: keeps the CLI start fast
    from .records import RecordStore  # noqa: PLC0415 - lazy: keeps the CLI start fast
    from .train import default_cache_dir  # noqa: PLC0415 - lazy: keeps the CLI start fast

    history = [Path(p) for p in (args.history or ["results"])] + [out]
    done = RecordStore(out / "records.jsonl").done_keys() if args.resume else set()
    rows = plan(suite, device=args.device, cache_dir=Path(args.cache_dir) if args.cache_dir else default_cache_dir(),
                history=[p for p in history if p.exists()], skip=done)
    print(f"suite {suite.name} ({suite.source}), dry run: nothing is trained, sampled or written")
    if args.resume:
        print(f"resume: {len(suite.runs) - len(rows)} of {len(suite.runs)} runs already recorded in "
              f"{out / 'records.jsonl'}; listing the other {len(rows)}")
    from .measure import resolve_device  # noqa: PLC0415 - lazy: keeps the CLI start fast

    print(format_plan(rows, str(resolve_device(args.device))))
    return 0


def _kept(out: Path, suite) -> str:
    """How many of the suite's runs the records in ``out`` hold, in words."""
    from .records import load_records, record_key  # noqa: PLC0415 - lazy: keeps the CLI start fast

    keys = {r.key() for r in suite.runs}
    kept = sum(1 for r in load_records(out / "records.jsonl") if record_key(r) in keys) \
        if (out / "records.jsonl").exists() else 0
    return f"{kept} of {len(suite.runs)} runs kept in {out / 'records.jsonl'}"


def _resume_command(args) -> str:
    """The command line that continues this run: the same arguments, with --out made explicit and --resume."""
    argv = list(getattr(args, "argv", None) or sys.argv[1:])
    if "--out" not in argv and not any(a.startswith("--out=") for a in argv):
        argv += ["--out", str(args.out_resolved)]
    if "--resume" not in argv:
        argv.append("--resume")
    return shlex.join(["diffbench", *argv])


def cmd_run(args) -> int:
    from .guard import Interrupted, stop_on_signals  # noqa: PLC0415 - lazy: keeps the CLI start fast
    from .runner import OutputError, PreflightError, run_suite  # noqa: PLC0415 - lazy: keeps the CLI start fast

    if args.train_seed < 0:
        print(f"error: --train-seed must be >= 0, got {args.train_seed}", file=sys.stderr)
        return 2
    suite = _load_suite(args.suite, args.train_seed, args.allow_large)
    if suite is None:
        return 2
    if args.out:
        out = Path(args.out)
    else:  # the suite's name picks a folder inside runs/, never a path outside it
        slug = suite_slug(suite.name)
        if slug is None:
            print(f"error: suite name {suite.name!r} cannot name an output folder (absolute, '..' or empty); "
                  f"give --out DIR or rename the suite", file=sys.stderr)
            return 2
        out = Path("runs") / slug
    args.out_resolved = out
    if args.device == "cuda":
        import torch  # noqa: PLC0415 - lazy: keeps the CLI start fast

        if not torch.cuda.is_available():
            print("error: --device cuda but no CUDA device is available; use --device cpu or auto", file=sys.stderr)
            return 2
    if args.inception_weights and not Path(args.inception_weights).exists():
        print(f"error: Inception weights file {args.inception_weights} does not exist", file=sys.stderr)
        return 2
    if args.train_jobs == "auto":
        from .pretrain import auto_jobs  # noqa: PLC0415 - lazy: keeps the CLI start fast

        args.train_jobs = auto_jobs()
    if args.dry_run:
        return _dry_run(args, suite, out)
    from .distributed import DistributedError, init_from_env  # noqa: PLC0415 - lazy: keeps the CLI start fast
    from .records import StorageError  # noqa: PLC0415 - lazy: keeps the CLI start fast

    dist = init_from_env(args.device)  # launched by torchrun: join the group; only rank 0 prints and writes
    if dist is not None and not dist.is_main:
        args.no_report, sys.stdout = True, open(os.devnull, "w")
    print(f"suite {suite.name}: {len(suite.runs)} runs from {suite.source} -> {out}/records.jsonl"
          + (f" ({dist.world_size} ranks, {dist.backend})" if dist is not None else ""))
    resume_cmd = _resume_command(args)
    try:
        with stop_on_signals():
            summary = run_suite(suite, out, device=args.device, resume=args.resume, cache_dir=args.cache_dir,
                                progress=not args.no_progress, inception_weights=args.inception_weights,
                                timeout=args.run_timeout, train_jobs=args.train_jobs)
    except (PreflightError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if getattr(e, "during_run", False) else 2
    except StorageError as e:  # a cache file (checkpoint, reference statistics) could not be written
        print(f"error: {e}\ndiffbench: {_kept(out, suite)}; continue with: {resume_cmd}", file=sys.stderr)
        return 1
    except DistributedError as e:
        during = f" during {e.where}" if getattr(e, "where", "") else ""
        print(f"error: distributed run failed{during}: {e}\ndiffbench: {_kept(out, suite)}; continue with: "
              f"{resume_cmd}", file=sys.stderr, flush=True)
        return 1
    except Interrupted as e:  # SIGINT / SIGTERM (under torchrun: the launcher stopping this rank after another failed)
        who = f"rank {dist.rank}/{dist.world_size}: " if dist is not None else ""
        during = f" during {e.where}" if e.where else ""
        why = (" (torchrun stops every rank once one has failed; its report below names the failed rank)"
               if dist is not None and e.exit_code == 143 else "")
        print(f"\ndiffbench: {who}stopped by {e}{during}{why}; {_kept(out, suite)}; continue with: {resume_cmd}",
              file=sys.stderr, flush=True)
        return e.exit_code
    print(f"done: {summary['ran']} ran ({summary['ok']} ok, {summary['diverged']} diverged, "
          f"{summary['error']} error), {summary['skipped']} skipped; records: {summary['records']}")
    if not args.no_report:
        from .report.report import write_report  # noqa: PLC0415 - lazy: keeps the CLI start fast

        try:
            path = write_report(out, out)
        except OSError as e:  # disk full, read-only: the records are whole; the report can be written again later
            print(f"error: could not write the report in {out} ({e.strerror or e}); the records are complete: "
                  f"free space and run `diffbench report --records {out}`", file=sys.stderr)
            return 1
        print(f"report: {path}")
        _print_leaderboard([out])
    return 1 if summary["error"] and args.strict else 0


def _print_leaderboard(records_paths, nfe_max=None, csv=None, group_filter=None, nfe=None):
    """The leaderboard of the given records as Markdown on stdout, and as CSV when asked; with ``nfe`` (a list of
    NFE budgets) the few-step view instead: FID at matched NFE per sampler and model."""
    from .records import load_records  # noqa: PLC0415 - lazy: keeps the CLI start fast
    from .report.leaderboard import leaderboard, nfe_view, nfe_view_markdown, to_csv, to_markdown  # noqa: PLC0415 - lazy: keeps the CLI start fast

    recs = load_records(*records_paths)
    if nfe:
        df = nfe_view(recs, nfe, group_filter=group_filter, min_samplers=1)
        print(nfe_view_markdown(df))
    else:
        df = leaderboard(recs, nfe_max=nfe_max, group_filter=group_filter)
        print(to_markdown(df))
    if csv:
        to_csv(df, csv)
        print(f"wrote {csv}", file=sys.stderr)


def _nfe_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 5,10,20, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 5,10,20, got {text!r}")
    return vals


def cmd_leaderboard(args) -> int:
    _print_leaderboard(_records_paths(args), args.nfe_max, args.csv, args.filter, args.nfe)
    return 0


def cmd_plots(args) -> int:
    from .records import load_records  # noqa: PLC0415 - lazy: keeps the CLI start fast
    from .report.plots import make_plots  # noqa: PLC0415 - lazy: keeps the CLI start fast

    recs = load_records(*_records_paths(args))
    paths = make_plots(recs, Path(args.out))
    for p in paths:
        print(p)
    return 0


def cmd_report(args) -> int:
    from .report.report import update_readme, write_report  # noqa: PLC0415 - lazy: keeps the CLI start fast

    paths = _records_paths(args)
    out = Path(args.out) if args.out else (paths[0] if paths[0].is_dir() else paths[0].parent)
    path = write_report(paths if len(paths) > 1 else paths[0], out)  # every --records path, not the first only
    print(f"report: {path}")
    if args.readme:
        changed = update_readme(Path(args.readme), paths[0])
        print(f"README {'updated' if changed else 'has no diffbench markers; left untouched'}: {args.readme}")
    return 0


def cmd_list(args) -> int:
    from .plugin import REGISTRY  # noqa: PLC0415 - lazy: keeps the CLI start fast
    from .samplers import SAMPLERS  # noqa: PLC0415 - lazy: keeps the CLI start fast
    from .suite import SUITES_DIR  # noqa: PLC0415 - lazy: keeps the CLI start fast

    what = args.what
    if what in ("samplers", "all"):
        print("samplers:")
        for name, s in sorted(SAMPLERS.items()):
            opts = ", ".join(f"{k}={o.default!r}" for k, o in s.options.items())
            print(f"  {name:<14} {s.description}" + (f"  [options: {opts}]" if opts else ""))
    if what in ("reproductions", "all"):
        print("reproductions:")
        for name, r in sorted(REGISTRY.items()):
            print(f"  {name:<14} {r.title}  [models: {', '.join(r.models)}]")
    if what in ("suites", "all"):
        print(f"suites (in {SUITES_DIR}):")
        for p in sorted(SUITES_DIR.glob("*.yaml")):
            print(f"  {p.stem}")
    if what in ("datasets", "all"):
        from .data import DATASETS  # noqa: PLC0415 - lazy: keeps the CLI start fast

        print("datasets:")
        for name in DATASETS:
            print(f"  {name}")
    return 0


def cmd_validate(args) -> int:
    suite = _load_suite(args.suite, allow_large=args.allow_large)
    if suite is None:
        return 2
    total = sum(r.steps for r in suite.runs)
    print(f"suite {suite.name} is valid: {len(suite.runs)} runs, {total} sampler steps per sample in all")
    return 0


def _train_jobs(value: str):
    """--train-jobs: 'auto' or a whole number >= 1."""
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 or 'auto', got {value!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffbench", description=__doc__.split("\n")[0] + "\n\n"
                                "Reproduce diffusion-model papers on one harness: train, sample, measure FID, NFE, "
                                "latency and memory, and regenerate tables, a sampler leaderboard, plots and a scorecard "
                                "from records.", formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    r = sub.add_parser("run", help="run a benchmark suite and write records (default: the default suite)")
    r.add_argument("--suite", default=DEFAULT_SUITE, help="name of a shipped suite (diffbench list suites; it wins "
                   "over a same-named path in the working folder; write ./NAME for that) or a path to a YAML file "
                   "(default: %(default)s)")
    r.add_argument("--out", default=None, help="output folder for records.jsonl and the report (default: runs/SUITE)")
    r.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to sample (default: auto)")
    r.add_argument("--resume", action="store_true", help="skip runs already recorded in --out")
    r.add_argument("--cache-dir", default=None, help="trained-model and reference-statistics cache "
                   "(default: $DIFFBENCH_CACHE, else $XDG_CACHE_HOME/diffbench, else ~/.cache/diffbench)")
    r.add_argument("--inception-weights", default=None, help="torch-fidelity Inception weights file "
                   "(pt_inception-2015-12-05); when given, FID uses inception-v3-compat")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--no-report", action="store_true", help="do not write the report and leaderboard at the end")
    r.add_argument("--strict", action="store_true", help="exit with status 1 if any run recorded an error")
    r.add_argument("--dry-run", action="store_true", help="list the runs, their NFE and an estimate of the run time "
                   "(from earlier records of the same models), then stop")
    r.add_argument("--history", nargs="+", default=None, help="records used for the --dry-run time estimate "
                   "(default: results/ and --out)")
    r.add_argument("--allow-large", action="store_true", help=ALLOW_LARGE_HELP)
    r.add_argument("--train-seed", type=int, default=0, metavar="K",
                   help="add K to every entry's training seeds: the same suite on freshly trained models "
                        "(another checkpoint in the cache; default: %(default)s)")
    r.add_argument("--train-jobs", default="auto", type=_train_jobs, metavar="N",
                   help="on a CPU, train the suite's uncached models first in N processes side by side (the small "
                        "models train ~1.6x faster as two 1-thread processes than one after the other on 2 "
                        "threads); sampling and its timings stay in one process. 'auto': one per CPU core, at most "
                        "4; 1: train each model where it is first used (default: %(default)s)")
    r.add_argument("--run-timeout", type=float, default=None, metavar="SECONDS",
                   help="time limit per run (sampling and metrics; a suite entry's 'timeout' key also applies, the "
                        "tighter wins): a run past it is stopped and recorded as an error, the suite goes on "
                        "(default: no limit)")
    r.set_defaults(fn=cmd_run)

    lb = sub.add_parser("leaderboard", help="rank comparable sampler configurations by FID")
    lb.add_argument("--records", nargs="+", help="records file(s) or folder(s) (default: results/)")
    lb.add_argument("--nfe-max", type=float, default=None, help="only configurations with NFE <= this budget")
    lb.add_argument("--filter", default=None, help="only groups whose label contains this text")
    lb.add_argument("--nfe", type=_nfe_list, default=None, metavar="N,N,...",
                    help="few-step view: FID at these NFE budgets (e.g. 5,10,20) for every sampler and model, "
                         "with 95%% intervals and ties")
    lb.add_argument("--csv", default=None, help="also write the leaderboard as CSV to this file")
    lb.set_defaults(fn=cmd_leaderboard)

    pl = sub.add_parser("plots", help="regenerate every plot from records")
    pl.add_argument("--records", nargs="+", help="records file(s) or folder(s) (default: results/)")
    pl.add_argument("--out", default="plots", help="folder for the PNG files (default: %(default)s)")
    pl.set_defaults(fn=cmd_plots)

    rp = sub.add_parser("report", help="write one Markdown report: tables, leaderboard, plots, scorecard")
    rp.add_argument("--records", nargs="+", help="records file or folder (default: results/)")
    rp.add_argument("--out", default=None, help="folder for report.md and plots/ (default: the records folder)")
    rp.add_argument("--readme", default=None, help="also refresh the generated sections of this README "
                         "(from the first --records path, whose folder its links point into)")
    rp.set_defaults(fn=cmd_report)

    ls = sub.add_parser("list", help="list samplers, reproductions, suites and datasets")
    ls.add_argument("what", nargs="?", default="all", choices=("all", "samplers", "reproductions", "suites", "datasets"))
    ls.set_defaults(fn=cmd_list)

    va = sub.add_parser("validate", help="check a suite file without running it")
    va.add_argument("suite", help="name of a shipped suite (diffbench list suites; it wins over a same-named path in the "
                    "working folder; write ./NAME for that) or a path to a YAML file")
    va.add_argument("--allow-large", action="store_true", help=ALLOW_LARGE_HELP)
    va.set_defaults(fn=cmd_validate)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "cmd", None):
        parser.print_help()
        return 0
    if args.cmd in ("run", "validate", "list"):  # discovery, once, at the entry point: a broken paper stops here
        from .plugin import DiscoveryError, discover  # noqa: PLC0415 - lazy: keeps the CLI start fast

        try:
            discover()
        except DiscoveryError as e:
            print(f"error: {e}\nfix the module(s) above (or remove them from the plugin packages) and try again",
                  file=sys.stderr)
            return 2
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
