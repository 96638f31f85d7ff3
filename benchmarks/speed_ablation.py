#!/usr/bin/env python
"""Speed-option ablation of the shared U-Net (Chen et al. 2023, "Speed is all you need").

For three networks -- the digits U-Net (``digits_small``), the DDPM CIFAR-10 U-Net (``ddpm_cifar10``)
and a Stable-Diffusion-1.5-shaped U-Net at a 64x64x4 latent (``sd15_shaped``: channels
320/640/1280/1280, attention at the three highest resolutions, random weights; our U-Net has
self-attention blocks only, no cross-attention / transformer blocks, see ``bench_core.methods.accel``) --
and for the baseline, each speed option alone and all of them together
(``bench_core.methods.accel.ablation_options``), it measures with ``bench_core.measure``'s one protocol:

- latency of one denoiser call (median of repeats after warm-up, device synchronised),
- latency of one 20-step sample (Euler on the discrete-VP denoiser, uniform DDPM timesteps; NFE
  counted by the harness's ``NFECounter``),
- peak extra memory of one denoiser call,
- the output's relative deviation from the baseline's (fp32, naive attention) on the same input,
  against the option's stated tolerance (``bench_core.methods.accel.tolerance``),

at a latency batch (1 or 2) and a throughput batch, and writes one record per (network, batch,
option set) through ``bench_core.records`` into ``OUT/records.jsonl`` (reproduction ``speed``).

CPU sizes (2 cores; the whole CPU ablation took 5 minutes at one thread on a loaded machine, half
of it the SD-shaped net): digits at batch 2 and 500 (the default suite's batch),
call + sample, 5 timed calls; DDPM CIFAR-10 at batch 2 (call + sample, 3 timed calls) and 16 (call
only, 2 timed calls after one warm-up call); SD-shaped at batch 1, call only, one warm-up call and
one timed call.  CUDA sizes: digits 2 and 512, CIFAR-10 2 and 128, SD-shaped 1 and 8, all call +
sample, 5 (SD: 4) timed calls and 2 timed samples; on an H100 about 4.5 minutes, two thirds of it
torch.compile / cuDNN autotuning / graph capture on the first call of the fused and "all" sets.  ``--quick`` shrinks
everything (code-path check, not numbers).  On a shared CPU use
``--threads 1``: two intra-op threads on two busy cores spin-wait and make timings erratic.

``--targets`` adds the issue's GPU targets (meaningful on CUDA, runnable on CPU): the sampling
loop's overhead over NFE x one denoiser call (digits U-Net at batch 512: the CIFAR-10 U-Net at 512
does not fit the intent of a cheap loop test; eager and CUDA-graphed), and -- when diffusers is
importable (``pip install -e '.[compare]'``) -- the DDPM CIFAR-10 U-Net in bf16 with every option
against diffusers' ``UNet2DModel`` of the same configuration with torch.compile, at the same batch.

    python benchmarks/speed_ablation.py --device cpu --out results/speed/cpu
    python benchmarks/speed_ablation.py --device cuda --out results/speed/gpu --targets
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from bench_core.methods.accel import (
    NETWORKS, AccelOptions, CUDAGraphed, CUDAGraphSampler, ablation_options, accelerated_denoiser, apply, random_weights_,
    relative_error, tolerance,
)
from bench_core.denoiser import NFECounter
from bench_core.measure import PeakMemory, device_info, resolve_device, synchronize, time_fn
from bench_core.nets.norm_act import fused_norm_act_backend
from bench_core.nets.unet import UNet, count_parameters
from bench_core.records import Record, RecordStore, git_sha, now, versions
from bench_core.samplers import sample_euler
from bench_core.schedules import alphas_cumprod, discrete_grid, linear_betas

SUITE = "speed-ablation"
STEPS = 20
SIGMA_CALL = 1.0  # noise level of the per-call measurement (t ~ 230 of 1000)


@dataclass
class Size:
    batch: int
    sample: bool        # also time a 20-step sample
    repeats: int        # timed repeats of a call (samples: max(1, repeats // 2))
    warmup: int | None = None  # untimed calls before timing, the first included (None: the device's default)


# network -> sizes, per device kind; (quick) variants for a code-path check
PLANS = {
    "cpu": {
        "digits_small": [Size(2, True, 5), Size(500, True, 5)],
        "ddpm_cifar10": [Size(2, True, 3), Size(16, False, 2, warmup=1)],
        "sd15_shaped": [Size(1, False, 1, warmup=1)],
    },
    "cuda": {
        "digits_small": [Size(2, True, 5), Size(512, True, 5)],
        "ddpm_cifar10": [Size(2, True, 5), Size(128, True, 5)],
        "sd15_shaped": [Size(1, True, 4), Size(8, True, 4)],
    },
    "quick": {
        "digits_small": [Size(2, True, 1), Size(16, True, 1)],
        "ddpm_cifar10": [Size(1, True, 1)],
        "sd15_shaped": [Size(1, False, 1)],
    },
}
QUICK_NETWORKS = ("digits_small", "ddpm_cifar10")


def model_hash(cfg) -> str:
    return hashlib.sha256(json.dumps(cfg.arch_dict(), sort_keys=True).encode()).hexdigest()[:16]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Writer:
    """Records for one run: common fields filled in, appended as soon as measured (also used by
    benchmarks/int8_speed.py with its own suite and reproduction)."""

    def __init__(self, out: Path, device: torch.device, quick: bool, suite: str = SUITE, reproduction: str = "speed"):
        self.store = RecordStore(out / "records.jsonl")
        self.info = device_info(device)
        self.common = dict(suite=suite, reproduction=reproduction, dataset="random-inputs", git_sha=git_sha(),
                           versions=versions(), **self.info)
        self.extra = {"threads": torch.get_num_threads(), "quick": quick}

    def write(self, *, entry, network, cfg, batch, dtype="float32", metrics, status="ok", error=None,
              sec_per_batch=None, nfe=0.0, steps=0, peak=None, peak_method="", repeats=0):
        rec = Record(**self.common, entry=entry, model=network, model_hash=model_hash(cfg), sampler="euler",
                     grid={"kind": "uniform"}, steps=steps, nfe=float(nfe), num_samples=batch, batch_size=batch,
                     seed=0, dtype=dtype, sec_per_batch=sec_per_batch,
                     samples_per_sec=(batch / sec_per_batch) if sec_per_batch else None, timing_repeats=repeats,
                     peak_mem_mb=peak, peak_mem_method=peak_method, metrics={**self.extra, **metrics},
                     timestamp=now(), status=status, error=error)
        self.store.append(rec)

    def error(self, exc: BaseException, *, entry, network, cfg, batch, dtype="float32", metrics):
        """Log a failed measurement with its traceback and record it (status error); the run goes on."""
        msg = f"{type(exc).__name__}: {exc}"
        log(f"  {entry}: ERROR {msg}")
        traceback.print_exc(limit=3)
        self.write(entry=entry, network=network, cfg=cfg, batch=batch, dtype=dtype, metrics=metrics,
                   status="error", error=msg[:2000])


# --------------------------------------------------------------------------------------------
# The ablation
# --------------------------------------------------------------------------------------------
def measure_set(net, cfg, opts, size, device, abar, ref_out, x_call, warmup):
    """One option set at one batch: per-call latency, peak memory, deviation, per-sample latency."""
    den = accelerated_denoiser(net, opts, abar, device=device)
    sigma = torch.full((size.batch,), SIGMA_CALL, device=device)
    with torch.no_grad():
        out = den(x_call, sigma)  # the first warm-up call: compilation, cuDNN autotuning, graph capture
        synchronize(device)
        eps = (x_call - out) / SIGMA_CALL  # compare the network's prediction, not x-dominated D
        err = relative_error(eps, ref_out) if ref_out is not None else 0.0
        with PeakMemory(device) as pm:  # reading the peak costs nothing inside the timed calls
            call = time_fn(lambda: den(x_call, sigma), warmup=max(0, warmup - 1), repeats=size.repeats, device=device)
        call["warmup"] = warmup
        res = {"eps": eps, "call": call, "peak": pm.peak_mb, "peak_method": pm.method, "err": err}
        if size.sample:
            # the calls above warmed every kernel at this shape: the sample's timed runs need no warm-up
            sig = discrete_grid(abar, STEPS, "uniform")
            g = torch.Generator().manual_seed(0)
            x_T = (torch.randn(x_call.shape, generator=g) * sig[0]).to(device)
            sig = sig.to(device)
            counter = NFECounter(den)
            k = max(1, size.repeats // 2)
            with PeakMemory(device) as pms:
                samp = time_fn(lambda: sample_euler(counter, x_T, sig), warmup=0, repeats=k, device=device)
            res.update(sample=samp, nfe=counter.count / k, peak_sample=pms.peak_mb)
    return res


def run_network(name, sizes, device, writer, sets, warmup, attn_chunk):
    cfg = NETWORKS[name]
    torch.manual_seed(0)
    net = random_weights_(UNet(cfg), seed=0).eval().to(device)  # latency does not depend on the values
    n_params = count_parameters(net)
    abar = alphas_cumprod(linear_betas(1000))
    log(f"{name}: {n_params / 1e6:.1f}M parameters, batches {[s.batch for s in sizes]}")
    for size in sizes:
        g = torch.Generator().manual_seed(1)
        x_call = (torch.randn(size.batch, cfg.in_channels, cfg.resolution, cfg.resolution, generator=g)
                  * (1 + SIGMA_CALL**2) ** 0.5).to(device)
        ref = None
        base_call = None
        for set_name, opts in sets.items():
            entry = f"{name}/b{size.batch}/{set_name}"
            meta = {"kind": "ablation", "network": name, "option_set": set_name, "options": opts.to_dict(),
                    "options_label": opts.label(), "params": n_params, "attn_chunk": attn_chunk}
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # e.g. sdpa kernel notes; the fallback is recorded
                    r = measure_set(net, cfg, opts, size, device, abar, ref, x_call, size.warmup or warmup)
            except Exception as e:  # noqa: BLE001 - one failing option never stops the ablation
                writer.error(e, entry=entry, network=name, cfg=cfg, batch=size.batch, dtype=opts.dtype, metrics=meta)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if ref is None:
                ref = r["eps"]  # the baseline (first set) is the reference
                base_call = r["call"]["median"]
            tol = tolerance(opts, device)
            meta.update(
                sec_per_call=r["call"]["median"], sec_per_call_all=r["call"]["all"], call_repeats=r["call"]["repeats"],
                rel_err=r["err"], tolerance=tol, equal_within_tol=bool(r["err"] <= tol),
                peak_mem_mb_call=r["peak"], peak_mem_mb_sample=r.get("peak_sample"),
                fused_norm_act_backend=_norm_act_backend(opts),
                wall_s=time.perf_counter() - t0,
            )
            samp = r.get("sample")
            if samp is not None:
                meta.update(sec_per_sample_run_all=samp["all"])
            writer.write(entry=entry, network=name, cfg=cfg, batch=size.batch, dtype=opts.dtype, metrics=meta,
                         sec_per_batch=samp["median"] if samp else None, nfe=r.get("nfe", 0),
                         steps=STEPS if samp else 0, peak=r["peak"], peak_method=r["peak_method"],
                         repeats=r["call"]["repeats"])
            speed = base_call / r["call"]["median"] if base_call else float("nan")
            log(f"  {entry:40s} call {r['call']['median'] * 1e3:9.2f} ms (x{speed:5.2f})"
                + (f"  sample {samp['median']:8.3f} s" if samp else "")
                + f"  peak {r['peak'] if r['peak'] is not None else float('nan'):8.1f} MB  err {r['err']:.1e}"
                + ("" if r["err"] <= tol else f"  > tol {tol:.0e}!"))
    del net
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _norm_act_backend(opts: AccelOptions) -> str:
    """Which kernel ran the fused GroupNorm+SiLU: "", "triton" (hand-written), "inductor" or "eager-fallback"."""
    if not opts.fused_norm_act or opts.compile:
        return ""
    return "triton" if opts.norm_act_kernel == "triton" else fused_norm_act_backend()


# --------------------------------------------------------------------------------------------
# GPU targets
# --------------------------------------------------------------------------------------------
def sampler_overhead(writer, device, batch, repeats):
    """Sampler wall time / wall time of the same NFE bare denoiser calls (Euler, 20 steps, digits U-Net)."""
    name = "digits_small"
    cfg = NETWORKS[name]
    net = random_weights_(UNet(cfg), seed=0).eval().to(device)
    abar = alphas_cumprod(linear_betas(1000))
    sig = discrete_grid(abar, STEPS, "uniform")
    x_T = (torch.randn(batch, cfg.in_channels, cfg.resolution, cfg.resolution,
                       generator=torch.Generator().manual_seed(0)) * sig[0]).to(device)
    sig = sig.to(device)
    variants = {"eager": AccelOptions(attn="sdpa")}
    if device.type == "cuda":
        variants["cuda_graph"] = AccelOptions(attn="sdpa", cuda_graph=True)
        variants["cuda_graph_loop"] = AccelOptions(attn="sdpa", cuda_graph=True)  # + the whole loop captured
    for vname, opts in variants.items():
        entry = f"overhead/{name}/b{batch}/{vname}"
        meta = {"kind": "overhead", "network": name, "option_set": vname, "options": opts.to_dict(),
                "options_label": opts.label()}
        try:
            den = accelerated_denoiser(net, opts, abar, device=device)
            inputs = []

            def recording(x, s, **cond):
                inputs.append((x.clone(), s.clone()))
                return den(x, s)

            with torch.no_grad():
                counter = NFECounter(recording)  # one run: the inputs of every call, and their count
                sample_euler(counter, x_T, sig)

                def bare():
                    for x, s in inputs:
                        den(x, s)

                if vname == "cuda_graph_loop":  # one graph for the whole run, against per-call graph replays
                    loop = CUDAGraphSampler(sample_euler, accelerated_denoiser(net, opts.replace(cuda_graph=False),
                                                                               abar, device=device), sig)
                    meta.update(loop_graph=True, loop_rel_err=relative_error(loop(x_T), sample_euler(den, x_T, sig)))
                    run = functools.partial(loop, x_T)
                else:
                    run = functools.partial(sample_euler, den, x_T, sig)

                bare(), run()  # warm-up (graph capture, lazy init), untimed
                t_bare, t_run = [], []
                for _ in range(repeats):  # alternate, so machine noise hits both alike
                    t_bare += time_fn(bare, warmup=0, repeats=1, device=device)["all"]
                    t_run += time_fn(run, warmup=0, repeats=1, device=device)["all"]
            med = statistics.median
            ratio = med(t_run) / med(t_bare)
            meta.update(nfe=counter.count, sec_bare_calls=med(t_bare), sec_sample=med(t_run),
                        sec_per_call=med(t_bare) / counter.count, overhead_ratio=ratio, target=1.02,
                        sec_bare_all=t_bare, sec_sample_all=t_run)
            writer.write(entry=entry, network=name, cfg=cfg, batch=batch, metrics=meta, sec_per_batch=med(t_run),
                         nfe=counter.count, steps=STEPS, repeats=repeats)
            log(f"  {entry}: sampler {med(t_run) * 1e3:.2f} ms / {counter.count} bare calls "
                f"{med(t_bare) * 1e3:.2f} ms = {ratio:.4f} (target <= 1.02)")
        except Exception as e:  # noqa: BLE001
            writer.error(e, entry=entry, network=name, cfg=cfg, batch=batch, metrics=meta)


def diffusers_unet(cfg):
    """diffusers' UNet2DModel with the DDPM CIFAR-10 configuration (google/ddpm-cifar10-32's layout)."""
    from diffusers import UNet2DModel

    ch = [cfg.ch * m for m in cfg.ch_mult]
    res, down, up = cfg.resolution, [], []
    for level in range(len(ch)):
        down.append("AttnDownBlock2D" if res in cfg.attn_resolutions else "DownBlock2D")
        res //= 2
    up = ["AttnUpBlock2D" if b == "AttnDownBlock2D" else "UpBlock2D" for b in reversed(down)]
    return UNet2DModel(
        sample_size=cfg.resolution, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        layers_per_block=cfg.num_res_blocks, block_out_channels=tuple(ch), down_block_types=tuple(down),
        up_block_types=tuple(up), attention_head_dim=None, norm_num_groups=cfg.norm_groups, norm_eps=1e-6,
        downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, dropout=0.0,
    )


def diffusers_compare(writer, device, batch, repeats, warmup):
    """Our DDPM CIFAR-10 U-Net, bf16 with every option, against diffusers' UNet2DModel (bf16,
    torch.compile, and eager) at the same batch: latency of one network call."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        log("  diffusers is not importable: skipping the UNet2DModel comparison (pip install -e '.[compare]')")
        return
    name = "ddpm_cifar10"
    cfg = NETWORKS[name]
    x = torch.randn(batch, cfg.in_channels, cfg.resolution, cfg.resolution,
                    generator=torch.Generator().manual_seed(0)).to(device)
    t = torch.full((batch,), 500.0, device=device)
    all_opts = ablation_options(device)["all"]
    half = torch.bfloat16

    def ours(compiled: bool = False):
        opts = all_opts.replace(compile=compiled)
        acc = apply(random_weights_(UNet(cfg), 0).eval(), opts.replace(cuda_graph=False), device=device)
        f = (lambda: acc(x, t))
        if all_opts.cuda_graph:
            g = CUDAGraphed(lambda a, b: acc(a, b))
            f = (lambda: g(x, t))
        return f, count_parameters(acc.net), opts.label()

    def theirs(compiled: bool):
        m = diffusers_unet(cfg).eval().to(device=device, dtype=half)
        fn = torch.compile(m) if compiled else m
        xt, tt = x.to(half), t.to(half)
        return (lambda: fn(xt, tt).sample), count_parameters(m), "bf16 + torch.compile" if compiled else "bf16 eager"

    for vname, make in (("ours_all", ours), ("ours_all_compile", lambda: ours(True)),
                        ("diffusers_compile", lambda: theirs(True)),
                        ("diffusers_eager", lambda: theirs(False))):
        entry = f"compare/{name}/b{batch}/{vname}"
        meta = {"kind": "diffusers", "network": name, "option_set": vname}
        try:
            t0 = time.perf_counter()
            with torch.no_grad():
                f, n_params, label = make()
                f()  # compile / capture
                synchronize(device)
                meta.update(first_call_s=time.perf_counter() - t0)
                call = time_fn(f, warmup=warmup, repeats=repeats, device=device)
                with PeakMemory(device) as pm:
                    f()
            meta.update(sec_per_call=call["median"], sec_per_call_all=call["all"], params=n_params,
                        options_label=label, diffusers_version=__import__("diffusers").__version__)
            writer.write(entry=entry, network=name, cfg=cfg, batch=batch, dtype="bfloat16", metrics=meta,
                         peak=pm.peak_mb, peak_method=pm.method, repeats=call["repeats"])
            log(f"  {entry}: {call['median'] * 1e3:.2f} ms per call ({label}, {n_params / 1e6:.2f}M params)")
        except Exception as e:  # noqa: BLE001
            writer.error(e, entry=entry, network=name, cfg=cfg, batch=batch, dtype="bfloat16", metrics=meta)
        if device.type == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    ap.add_argument("--out", default=None, help="folder for records.jsonl (default: results/speed/cpu or results/speed/gpu)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and one repeat: checks the code paths, not the numbers")
    ap.add_argument("--networks", default=None,
                    help=f"comma-separated subset of {','.join(NETWORKS)} (default: all; with --quick: "
                         f"{','.join(QUICK_NETWORKS)})")
    ap.add_argument("--sets", default=None, help="comma-separated subset of the option sets (default: all for the device)")
    ap.add_argument("--attn-chunk", type=int, default=1024, help="queries per chunk for the chunked attention")
    ap.add_argument("--targets", action="store_true",
                    help="also measure the GPU targets: sampler overhead at batch 512 and the diffusers comparison")
    ap.add_argument("--overhead-batch", type=int, default=512)
    ap.add_argument("--compare-batch", type=int, default=None, help="batch of the diffusers comparison (default: "
                    "the CIFAR-10 throughput batch)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--no-ablation", action="store_true", help="only the --targets measurements")
    args = ap.parse_args(argv)

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as the suite runner does
    out = Path(args.out or f"results/speed/{'gpu' if device.type == 'cuda' else 'cpu'}")
    out.mkdir(parents=True, exist_ok=True)
    plan = PLANS["quick" if args.quick else device.type]
    networks = args.networks.split(",") if args.networks else list(QUICK_NETWORKS if args.quick else NETWORKS)
    unknown = [n for n in networks if n not in NETWORKS]
    if unknown:
        ap.error(f"unknown network(s) {unknown}; known: {', '.join(NETWORKS)}")
    sets = ablation_options(device, attn_chunk=args.attn_chunk)
    if args.sets:
        want = args.sets.split(",")
        bad = [s for s in want if s not in sets]
        if bad:
            ap.error(f"unknown option set(s) {bad} on {device.type}; known: {', '.join(sets)}")
        sets = {"baseline": sets["baseline"], **{k: sets[k] for k in want}}  # the baseline is the reference
    writer = Writer(out, device, args.quick)
    warmup = 1 if args.quick else 2  # untimed calls, the first one (compilation, autotuning, capture) included
    log(f"device {writer.info['device_name']} ({device}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; option sets: {', '.join(sets)}; records -> {out / 'records.jsonl'}")
    t0 = time.perf_counter()
    if not args.no_ablation:
        for name in networks:
            run_network(name, plan[name], device, writer, sets, warmup, args.attn_chunk)
    if args.targets:
        log("targets: sampling-loop overhead (digits U-Net) and the diffusers comparison (DDPM CIFAR-10 U-Net)")
        batch = 32 if args.quick else args.overhead_batch
        sampler_overhead(writer, device, batch, repeats=3 if args.quick else 11)
        cb = args.compare_batch or (4 if args.quick else plan["ddpm_cifar10"][-1].batch)
        diffusers_compare(writer, device, cb, repeats=1 if args.quick else 10, warmup=warmup)
    log(f"done in {time.perf_counter() - t0:.0f} s; records: {out / 'records.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
