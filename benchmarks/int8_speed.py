#!/usr/bin/env python
"""Real int8 against float32 per denoiser call: Q-Diffusion's calibrated networks on the CPU (beyond the paper).

For the digits U-Net (the trained DDPM digits model and the qdiffusion presets' cached calibrations when its
checkpoint is cached, random weights otherwise) at batch 500, and the DDPM CIFAR-10 U-Net (random weights) at
batch 1 and 16, four executions of the same denoiser (six for the digits U-Net), side by side in one process:

- ``fp32``       the full-precision network,
- ``sim-w8a8``   W8A8 simulated (fake-quant in float32, what the paper measures FID with),
- ``int8-w8a8``  the same calibrated W8A8 network in real int8 (``bench_core.methods.quant.to_int8``: oneDNN's int8
  kernels; the hand-written fallback only where oneDNN's do not run, recorded as such; on a CPU without VNNI,
  where one u8 x s8 pass saturates, 8-bit weights run as two exact passes ``16 hi + lo``: ``int8_weight_passes``),
- ``int8-w4a8``  W4A8 (4-bit weights in int8 storage) in real int8;
- digits U-Net only, ``fp32-fusednorm`` and ``int8-w8a8-fusednorm``: fp32 and int8 W8A8 with every GroupNorm + SiLU
  as one torch.compile kernel specialised to its shape (``to_int8(..., fused_norm=True)``).  oneDNN's int8
  convolutions return channels-last activations, on which ATen's GroupNorm is several times slower than on NCHW,
  which is what held int8 back on this small network; the fp32 row with the same kernel shows what fp32 gains from
  it too.  The compile time is in each record's ``first_call_sec``.

Per variant, with ``bench_core.measure``'s one timing and one memory protocol: latency of one denoiser call
(two warm-up calls, then the variants alternating call by call, median of ``--repeats`` >= 5), the peak extra
memory of one call, the bytes of the weights the executed network reads, the deviation of the int8 output from
the simulated network of the same bit widths (and of each from fp32), and a torch.profiler breakdown of one call
(the operators that dominate).  Random weights are calibrated cheaply (a 4-step DDIM run, 16 inputs, min/max
ranges, nearest rounding): latency does not depend on the calibration method.  One record per (network, batch,
variant) through speed_ablation's record writer into ``OUT/records.jsonl`` (reproduction ``qdiffusion``,
``metrics.kind`` int8-speed); the qdiffusion reproduction's ``tables()`` renders them.

Targets (issue 16; CPU, not timed tests): CIFAR-10 U-Net at batch 16, int8 W8A8 >= 1.5x faster per call than
fp32 with weights <= 0.3x fp32's bytes and peak memory not above fp32's; digits U-Net at batch 500, int8 no
slower than fp32.  On a shared machine the timings are noisy: ``--threads 1`` and a quiet machine for numbers
to commit; ``--quick`` checks the code paths only.

    python benchmarks/int8_speed.py --out results/int8
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from bench_core.methods import quant as Q
from bench_core.methods.accel import NETWORKS, random_weights_, relative_error
from bench_core.denoiser import DiscreteVPEpsDenoiser
from bench_core.measure import PeakMemory, time_fn
from bench_core.nets.unet import UNet, count_parameters
from bench_core.schedules import alphas_cumprod, linear_betas
from bench_core.train import CheckpointCache, default_cache_dir
from reproductions.qdiffusion import SPEED_VARIANTS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_ablation import SIGMA_CALL, Writer, log  # noqa: E402 - the sibling script's record writer

SUITE = "int8-speed"
KIND = "int8-speed"
VARIANTS = SPEED_VARIANTS  # (the order of the table's rows, shared with the qdiffusion reproduction)
LABELS = {"fp32": "FP32", "fp32-fusednorm": "FP32 + compiled GroupNorm/SiLU", "sim-w8a8": "W8A8 simulated",
          "int8-w8a8": "W8A8 int8", "int8-w8a8-fusednorm": "W8A8 int8 + compiled GroupNorm/SiLU",
          "int8-w4a8": "W4A8 int8"}
FUSED_NORM_NETWORKS = ("digits_small",)  # where the compiled GroupNorm/SiLU rows run (see fused_norm_variants)
BATCHES = {"digits_small": (500,), "ddpm_cifar10": (1, 16)}
QUICK_BATCHES = {"digits_small": (8,), "ddpm_cifar10": (1,)}
# (network, batch) -> what int8 W8A8 must reach against fp32: speed-up, weight ratio, peak-memory ratio
TARGETS = {("ddpm_cifar10", 16): {"speedup_min": 1.5, "weight_ratio_max": 0.3, "peak_ratio_max": 1.0},
           ("digits_small", 500): {"speedup_min": 1.0}}
PRESETS = {"fp32": "digits-fp32", "sim-w8a8": "digits-w8a8-qdiff", "int8-w8a8": "digits-w8a8-qdiff-int8",
           "int8-w4a8": "digits-w4a8-qdiff-int8", "sim-w4a8": "digits-w4a8-qdiff"}


def cpu_int8_flags() -> list[str]:
    """The CPU's int8 dot-product extensions (from /proc/cpuinfo): VNNI and AMX decide oneDNN's int8 speed."""
    want = ("avx512_vnni", "avx_vnni", "amx_int8", "amx_tile", "avx512bw", "avx2")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in want if w in have]
    except OSError:
        pass
    return []


# --------------------------------------------------------------------------------------------
# The four executions of one network
# --------------------------------------------------------------------------------------------
def trained_digits(cache_dir: Path) -> dict | None:
    """The qdiffusion presets' denoisers on the trained DDPM digits model, when its checkpoint is cached (the
    calibrations are made and cached when missing); None when the model would have to be trained."""
    import reproductions

    rep = reproductions.get("qdiffusion")
    cfg = rep.model_config(PRESETS["fp32"], {})
    cache = CheckpointCache(cache_dir)
    if not all(cache.path(h).exists() for h in rep.base_checkpoints(cfg)):
        return None
    out = {}
    for variant, preset in PRESETS.items():
        t0 = time.perf_counter()
        lm = rep.load_model(preset, {}, device="cpu", cache_dir=cache_dir, progress=False)
        m = lm.model_metrics
        out[variant] = {"den": lm.denoiser, "calibration": f"qdiffusion preset {preset}", "load_sec":
                        time.perf_counter() - t0, "backend": m.get("quant_int8_backend", ""),
                        "fallback": m.get("quant_int8_fallback", "")}
    return out


def fused_norm_variants(variants: dict) -> dict:
    """The fp32 and int8 W8A8 denoisers again with every GroupNorm + SiLU as one torch.compile kernel specialised
    to its shape (``norm_act`` "compile_static"; the int8 network's activations are channels-last, where ATen's
    GroupNorm is slow), the fp32 one so that the int8 row is not credited with a kernel fp32 could use too.
    Compiled at the first call (its seconds are the records' ``first_call_sec``)."""
    out = {}
    for v, src in (("fp32-fusednorm", "fp32"), ("int8-w8a8-fusednorm", "int8-w8a8")):
        den = copy.deepcopy(variants[src]["den"])
        if src.startswith("int8"):
            Q.fuse_norm_act(den.model)
        else:
            den.model.set_fused_norm_act("compile_static")
        out[v] = {**variants[src], "den": den}
    return out


def random_variants(cfg, quick: bool) -> dict:
    """fp32 / simulated / int8 denoisers of a random-weight U-Net, calibrated cheaply (latency only)."""
    net = random_weights_(UNet(cfg), seed=0).eval()
    den = DiscreteVPEpsDenoiser(net, alphas_cumprod(linear_betas(1000)))
    shape = (cfg.in_channels, cfg.resolution, cfg.resolution)
    qcfg = {w: Q.QuantConfig(w_bits=w, a_bits=8, calib="timestep", calib_sampler_steps=2 if quick else 4,
                             n_calib=4 if quick else 16, split_shortcut=True, w_range="minmax", a_range="minmax",
                             rounding="nearest") for w in (8, 4)}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        calib = Q.gather_calibration(den, net, shape, qcfg[8])    # the same inputs serve both bit widths
    out = {"fp32": {"den": den, "calibration": ""}}
    for w, qc in qcfg.items():
        t0 = time.perf_counter()
        qnet, _ = Q.quantize_net(net, qc, calib)
        calib_sec = time.perf_counter() - t0
        note = f"random weights: {qc.calib_sampler_steps}-step DDIM, {qc.n_calib} inputs, min/max, nearest"
        out[f"sim-w{w}a8"] = {"den": Q.QuantizedDenoiser(den, qnet, qc), "calibration": note, "calib_sec": calib_sec}
        t0 = time.perf_counter()
        inet = Q.to_int8(qnet)
        out[f"int8-w{w}a8"] = {"den": Q.QuantizedDenoiser(den, inet, qc, "int8"), "calibration": note,
                               "convert_sec": time.perf_counter() - t0, "backend": inet.int8_backend,
                               "fallback": Q.int8_backend_problem("onednn") if inet.int8_backend != "onednn" else ""}
    return out


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------
def profile_call(fn, top: int = 8) -> list[dict]:
    """torch.profiler over one call: the operators with the most self CPU time, as {op, ms, calls, share}."""
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) or 1.0
    return [{"op": e.key, "ms": e.self_cpu_time_total / 1e3, "calls": e.count,
             "share": e.self_cpu_time_total / total} for e in rows[:top]]


def _eps(den_out, x):
    """The network's prediction (x - D) / sigma: compare that, not the x-dominated D."""
    return (x - den_out) / SIGMA_CALL


def measure(variants: dict, batch: int, cfg, repeats: int, warmup: int, profile: bool) -> dict:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, cfg.resolution, cfg.resolution, generator=g) * (1 + SIGMA_CALL**2) ** 0.5
    sigma = torch.full((batch,), SIGMA_CALL)
    timed = [v for v in VARIANTS if v in variants]
    calls = {v: (lambda d=variants[v]["den"]: d(x, sigma)) for v in variants}
    res = {v: {} for v in timed}
    with torch.no_grad():
        eps = {}
        for v, f in calls.items():                               # the first warm-up call (compiles), the outputs
            t0 = time.perf_counter()
            eps[v] = _eps(f(), x)
            if v in res:
                res[v]["first_call"] = time.perf_counter() - t0
        for _ in range(max(0, warmup - 1)):
            for v in timed:
                calls[v]()
        times = {v: [] for v in timed}
        for _ in range(repeats):                                  # alternate, so machine noise hits all alike
            for v in timed:
                times[v] += time_fn(calls[v], warmup=0, repeats=1)["all"]
        for v in timed:
            with PeakMemory("cpu") as pm:
                calls[v]()
            res[v].update(peak=pm.peak_mb, peak_method=pm.method)
            if profile:
                res[v]["profile"] = profile_call(calls[v])
    for v in timed:
        res[v].update(all=times[v], median=statistics.median(times[v]),
                      err_fp32=relative_error(eps[v], eps["fp32"]) if v != "fp32" else 0.0)
        sim = "sim-" + v.split("-")[1] if v.startswith("int8-") else None   # int8-w8a8(-fusednorm) -> sim-w8a8
        if sim in eps:
            res[v]["err_sim"] = relative_error(eps[v], eps[sim])
            res[v]["err_sim_l2"] = float((eps[v] - eps[sim]).norm() / eps[sim].norm())   # (less flip-dominated)
    return res


def run_network(name, batches, writer, args, run_id):
    cfg = NETWORKS[name]
    variants = trained_digits(Path(args.cache_dir)) if name == "digits_small" and not args.random_digits else None
    weights = "trained"
    if variants is None:
        weights = "random"
        variants = random_variants(cfg, args.quick)
    if name in FUSED_NORM_NETWORKS:
        variants.update(fused_norm_variants(variants))
    present = [v for v in VARIANTS if v in variants]
    fp_net = variants["fp32"]["den"].model
    n_params = count_parameters(fp_net)
    wbytes = {v: Q.executed_weight_bytes(variants[v]["den"].model) for v in present}
    log(f"{name}: {n_params / 1e6:.2f}M parameters, {weights} weights, batches {list(batches)}; int8 backends "
        f"{sorted({variants[v].get('backend') for v in present if v.startswith('int8')})}")
    for batch in batches:
        r = measure(variants, batch, cfg, args.repeats, args.warmup, not args.no_profile)
        base = r["fp32"]
        for v in present:
            info, m = variants[v], r[v]
            speedup = base["median"] / m["median"]
            peak_ratio = (m["peak"] / base["peak"]) if m["peak"] is not None and base["peak"] else None
            meta = {"kind": KIND, "run_id": run_id, "network": name, "variant": v, "label": LABELS[v],
                    "execution": "int8" if v.startswith("int8") else ("simulated" if v.startswith("sim") else "float32"),
                    "weights": weights, "params": n_params, "calibration": info.get("calibration", ""),
                    "int8_backend": info.get("backend", ""), "int8_fallback": info.get("fallback", ""),
                    "int8_quantizer": Q.int8_quantizer() if info.get("backend") == "onednn" else "",
                    "int8_weight_passes": Q.onednn_weight_passes() if info.get("backend") == "onednn" else "",
                    "convert_sec": info.get("convert_sec"), "load_sec": info.get("load_sec"),
                    "first_call_sec": m.get("first_call"),
                    "fused_norm": "compile_static" if v.endswith("-fusednorm") else "",
                    "sec_per_call": m["median"], "sec_per_call_all": m["all"], "call_repeats": args.repeats,
                    "warmup": args.warmup, "speedup_vs_fp32": speedup, "weight_bytes": wbytes[v],
                    "weight_ratio_vs_fp32": wbytes[v] / wbytes["fp32"], "peak_mem_mb_call": m["peak"],
                    "peak_ratio_vs_fp32": peak_ratio, "rel_err_vs_fp32": m["err_fp32"],
                    "rel_err_vs_simulated": m.get("err_sim"), "rel_l2_err_vs_simulated": m.get("err_sim_l2"),
                    "threads": torch.get_num_threads(),
                    "cpu_int8_flags": cpu_int8_flags(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "sigma": SIGMA_CALL, "quick": args.quick, "profile_top": m.get("profile", [])}
            target = TARGETS.get((name, batch)) if v.startswith("int8-w8a8") else None
            if target:
                met = speedup >= target["speedup_min"]
                if "weight_ratio_max" in target:
                    met &= meta["weight_ratio_vs_fp32"] <= target["weight_ratio_max"]
                if "peak_ratio_max" in target:
                    met &= peak_ratio is not None and peak_ratio <= target["peak_ratio_max"]
                meta["target"] = {**target, "met": bool(met)}
            writer.write(entry=f"{name}/b{batch}/{v}", network=name, cfg=cfg, batch=batch,
                         dtype="int8" if v.startswith("int8") else "float32", metrics=meta, peak=m["peak"],
                         peak_method=m["peak_method"], repeats=args.repeats)
            top = ", ".join(f"{p['op'].split('::')[-1]} {p['share']:.0%}" for p in m.get("profile", [])[:4])
            log(f"  {name}/b{batch}/{v:10s} {m['median'] * 1e3:9.2f} ms/call (x{speedup:4.2f} vs fp32)  "
                f"weights {wbytes[v] / 2**20:7.2f} MB ({meta['weight_ratio_vs_fp32']:.3f}x)  "
                f"peak {m['peak'] if m['peak'] is not None else float('nan'):7.1f} MB  "
                f"err vs sim {m.get('err_sim', float('nan')):.1e}  vs fp32 {m['err_fp32']:.1e}"
                + (f"  target {'met' if meta['target']['met'] else 'MISSED'}" if target else "")
                + (f"\n      top ops: {top}" if top else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--out", default="results/int8", help="folder for records.jsonl (default: %(default)s)")
    ap.add_argument("--networks", default=",".join(BATCHES), help="comma-separated subset of %(default)s")
    ap.add_argument("--repeats", type=int, default=7, help="timed calls per variant, alternating (>= 5; default 7)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per variant first (default 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--cache-dir", default=str(default_cache_dir()), help="checkpoint cache (the trained digits "
                    "model and its calibrations; default: %(default)s)")
    ap.add_argument("--random-digits", action="store_true", help="random weights for the digits U-Net too")
    ap.add_argument("--no-profile", action="store_true", help="skip the torch.profiler breakdown of one call")
    ap.add_argument("--quick", action="store_true", help="tiny batches, one repeat: checks the code paths, not numbers")
    args = ap.parse_args(argv)
    networks = [n for n in args.networks.split(",") if n]
    bad = [n for n in networks if n not in BATCHES]
    if bad:
        ap.error(f"unknown network(s) {bad}; known: {', '.join(BATCHES)}")
    if args.quick:
        args.repeats, args.warmup = 1, 1
    elif args.repeats < 5:
        ap.error("--repeats must be at least 5 (the protocol's median), or use --quick")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as the suite runner does
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu")
    writer = Writer(out, device, args.quick, suite=SUITE, reproduction="qdiffusion")
    run_id = time.strftime("%Y%m%dT%H%M%S")
    backend = Q.int8_backend()
    log(f"{writer.info['device_name']}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU int8 extensions {cpu_int8_flags()}, int8 backend {backend}"
        + (f" (oneDNN: {Q.int8_backend_problem('onednn')})" if backend != "onednn" else f", quantizer {Q.int8_quantizer()}")
        + f"; records -> {out / 'records.jsonl'}")
    t0 = time.perf_counter()
    for name in networks:
        run_network(name, (QUICK_BATCHES if args.quick else BATCHES)[name], writer, args, run_id)
    log(f"done in {time.perf_counter() - t0:.0f} s")
    write_table(out)
    return 0


def _markdown(table) -> str:
    cols = [str(c) for c in table.columns]
    rows = [" | ".join(str(v) for v in r) for r in table.itertuples(index=False)]
    return "\n".join([" | ".join(cols), " | ".join("---" for _ in cols)] + rows)


def write_table(out: Path) -> Path:
    """``OUT/table.md``: the qdiffusion reproduction's speed table, regenerated from ``OUT/records.jsonl``, with each
    int8 W8A8 row's target verdict and the top operators of one call per variant (the per-layer profile)."""
    import pandas as pd

    from bench_core.records import RecordStore
    from reproductions.qdiffusion import _speed_tables

    recs = [r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in RecordStore(out / "records.jsonl").load()]
    df = pd.DataFrame(recs)
    lines = []
    for title, table in _speed_tables(df).items():
        lines += [f"## {title}", "", _markdown(table), ""]
    d = df[df["metrics"].map(lambda m: isinstance(m, dict) and m.get("kind") == KIND)]
    d = d.sort_values("timestamp").drop_duplicates(["device_name", "entry"], keep="last")
    lines += ["## Targets (issue 16; reported, not asserted)", ""]
    for _, r in d.iterrows():
        t = r["metrics"].get("target")
        if t:
            m = r["metrics"]
            lines.append(f"- {r['entry']}: {'met' if t['met'] else 'MISSED'} (speed-up {m['speedup_vs_fp32']:.2f}x, target "
                         f">= {t['speedup_min']}x; weights {m['weight_ratio_vs_fp32']:.3f}x"
                         + (f", target <= {t['weight_ratio_max']}x" if "weight_ratio_max" in t else "")
                         + (f"; peak {m['peak_ratio_vs_fp32']:.2f}x of fp32's" if m.get("peak_ratio_vs_fp32") else "")
                         + ")")
    lines += ["", "## Top operators of one call (torch.profiler, self CPU time)", ""]
    for _, r in d.iterrows():
        prof = r["metrics"].get("profile_top") or []
        if prof:
            lines.append(f"- {r['entry']}: " + ", ".join(f"{p['op']} {p['ms']:.0f} ms ({p['share']:.0%}, {p['calls']}x)"
                                                        for p in prof[:6]))
    path = out / "table.md"
    path.write_text("\n".join(lines) + "\n")
    log(f"table -> {path}")
    return path


if __name__ == "__main__":
    sys.exit(main())
