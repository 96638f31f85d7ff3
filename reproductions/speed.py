"""Chen et al. 2023 — Speed Is All You Need: On-Device Acceleration of Large Diffusion Models via
GPU-Aware Optimizations.

The paper's optimizations are switchable runtime options of the shared U-Net (``bench_core.accel``:
chunked / partially fused softmax and FlashAttention-style fused attention, fused GroupNorm + SiLU,
autotuned (Winograd) convolutions and channels-last, half precision, CUDA graphs).  Nothing is
trained: ``benchmarks/speed_ablation.py`` times random-weight networks (the digits U-Net, the DDPM
CIFAR-10 U-Net and an SD-1.5-shaped U-Net) and writes records; this module regenerates the ablation
table, the GPU-target tables and the claims from those records.

Its suite models run a trained network under speed options: the DDPM digits checkpoint (shared with the
``ddpm`` reproduction: same weights, same model hash) wrapped by ``bench_core.accel``, so any sampler runs
on it and the records show the options' effect on FID and sampling latency beside the fp32 runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from bench_core.accel import AccelOptions, accelerated_denoiser
from reproductions import Claim, ClaimResult, LoadedModel, Reproduction, ok_rows, register
from reproductions.ddpm import BuiltOnDDPM


@dataclass
class SpeedModelConfig:
    """A trained ``ddpm`` model preset run under speed options (``bench_core.accel.AccelOptions``)."""

    base_model: str = "digits"                          # a model preset of the ddpm reproduction
    base_overrides: dict = field(default_factory=dict)  # its overrides (e.g. shorter training in the smoke suite)
    options: AccelOptions = field(default_factory=AccelOptions)


# the options that help the digits U-Net on a 2-core CPU: bf16 (matrix units; measured 41 vs 63 ms per call at
# batch 500) and fused attention (where there is attention).  Channels-last made this small network slower (70 ms),
# the fused GroupNorm+SiLU (torch.compile) does not pay for its compile time, CUDA graphs / cuDNN autotuning need
# a GPU.  Any option can be set from a suite: model_overrides: {options: {channels_last: true}}.
MODELS = {
    "ddpm-digits-fast": SpeedModelConfig(options=AccelOptions(attn="sdpa", dtype="bfloat16")),
    # the same checkpoint without options: the fp32 reference, timed right beside the fast runs
    "ddpm-digits-reference": SpeedModelConfig(),
}

NETWORK_ORDER = ("digits_small", "ddpm_cifar10", "sd15_shaped")
LARGE = ("ddpm_cifar10", "sd15_shaped")  # the paper's regime: big convolutions and attention
SET_ORDER = ("baseline", "attn_chunked", "attn_sdpa", "fused_norm_act", "fused_norm_act_triton", "conv_benchmark",
             "channels_last", "bf16", "fp16", "cuda_graph", "all")


def speed_records(df, kind: str = "ablation") -> pd.DataFrame:
    """This paper's records of one kind (``ablation``, ``overhead`` or ``diffusers``), metrics flattened;
    of repeated measurements of one (device, network, batch, option set) the latest wins."""
    if df is None or len(df) == 0 or "reproduction" not in df.columns:
        return pd.DataFrame()
    d = ok_rows(df, reproduction="speed")
    d = d[d["metrics"].map(lambda m: isinstance(m, dict) and m.get("kind") == kind)]
    if len(d) == 0:
        return pd.DataFrame()
    rows = []
    for _, r in d.iterrows():
        m = r["metrics"]
        rows.append({
            "device": r.get("device") or "", "device_name": r.get("device_name") or r.get("device") or "?",
            "network": m.get("network") or r.get("model"), "batch": int(r.get("batch_size") or 0),
            "set": m.get("option_set", ""), "label": m.get("options_label", ""), "dtype": r.get("dtype") or "float32",
            "sec_per_call": m.get("sec_per_call"), "sec_per_sample": r.get("sec_per_batch"),
            "nfe": r.get("nfe"), "peak_mb": r.get("peak_mem_mb"), "rel_err": m.get("rel_err"),
            "tolerance": m.get("tolerance"), "equal": m.get("equal_within_tol"),
            "backend": m.get("fused_norm_act_backend", ""), "overhead_ratio": m.get("overhead_ratio"),
            "sec_bare_calls": m.get("sec_bare_calls"), "timestamp": r.get("timestamp") or "",
            "threads": m.get("threads"),
        })
    out = pd.DataFrame(rows).sort_values("timestamp", kind="stable")
    out = out.drop_duplicates(["device_name", "network", "batch", "set"], keep="last")
    order = {n: i for i, n in enumerate(NETWORK_ORDER)}
    sorder = {n: i for i, n in enumerate(SET_ORDER)}
    out = out.assign(_n=out["network"].map(lambda n: order.get(n, 99)), _s=out["set"].map(lambda s: sorder.get(s, 99)))
    return out.sort_values(["device_name", "_n", "batch", "_s"]).drop(columns=["_n", "_s"]).reset_index(drop=True)


def _num(x):
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _fmt(x, scale=1.0, digits=3):
    v = _num(x)
    if v is None:
        return "–"
    v *= scale
    if v == 0:
        return "0"
    e = math.floor(math.log10(abs(v)))
    return f"{v:.{max(0, digits - 1 - e)}f}" if -4 <= e < 6 else f"{v:.{digits - 1}e}"


def _ratio(a, b):
    a, b = _num(a), _num(b)
    return a / b if a is not None and b else None


def ablation_table(d: pd.DataFrame) -> pd.DataFrame:
    """One device's ablation: per network and batch, every option set against that batch's baseline."""
    rows = []
    for (net, batch), g in d.groupby(["network", "batch"], sort=False):
        base = g[g["set"] == "baseline"]
        b = base.iloc[0] if len(base) else None
        for _, r in g.iterrows():
            speed_call = _ratio(b["sec_per_call"], r["sec_per_call"]) if b is not None else None
            speed_sample = _ratio(b["sec_per_sample"], r["sec_per_sample"]) if b is not None else None
            mem = _ratio(r["peak_mb"], b["peak_mb"]) if b is not None else None
            eq = r["equal"]
            rows.append({
                "network": net, "batch": int(batch), "options": r["set"] + (f" [{r['backend']}]" if r["backend"] else ""),
                "ms / call": _fmt(r["sec_per_call"], 1e3),
                "speedup (call)": f"{speed_call:.2f}x" if speed_call else "–",
                "s / 20-step sample": _fmt(r["sec_per_sample"]),
                "speedup (sample)": f"{speed_sample:.2f}x" if speed_sample else "–",
                "peak MB (call)": _fmt(r["peak_mb"]),
                "memory vs baseline": f"{mem:.2f}x" if mem else "–",
                "rel. error (tol.)": (f"{_fmt(r['rel_err'], digits=2)} ({_fmt(r['tolerance'], digits=1)})"
                                      + ("" if eq in (True, None) else " FAIL")),
            })
    return pd.DataFrame(rows)


class Speed(BuiltOnDDPM, Reproduction):
    name = "speed"
    title = "Chen et al. 2023 — Speed Is All You Need (GPU-aware optimizations)"
    paper_url = "https://arxiv.org/abs/2304.11267"
    models = MODELS  # trained DDPM networks under speed options; the ablation itself: benchmarks/speed_ablation.py

    def check_config(self, model, cfg):
        self.check_base(cfg)
        return cfg

    def hash_config(self, cfg):
        """The base model's hash: the weights are the ddpm reproduction's (the options change no parameter)."""
        return self.base_hash(cfg)

    def cached_modules(self, model, overrides, cfg):
        return []  # nothing of its own: the base model's checkpoint (BuiltOnDDPM) is all it loads

    def preflight(self, model, overrides, *, cache_dir):
        cfg = self.model_config(model, overrides)
        problems = super().preflight(model, overrides, cache_dir=cache_dir)  # the base model's
        if cfg.options.cuda_only() and not _cuda():
            problems.append(f"{self.name}/{model}: speed option(s) {', '.join(cfg.options.cuda_only())} need a "
                            "CUDA device and none is available; drop them from model_overrides.options")
        return problems

    def load_model(self, model, overrides, *, device, cache_dir, progress=True) -> LoadedModel:
        cfg = self.model_config(model, overrides)
        base = self.load_base(cfg, device=device, cache_dir=cache_dir, progress=progress)
        from bench_core.schedules import alphas_cumprod

        # the freshly loaded base network is this model's alone: accelerate it in place, not a copy
        abar = alphas_cumprod(self.base_config(cfg).betas())
        den = accelerated_denoiser(base.denoiser.model, cfg.options, abar, device=device, inplace=True)
        return LoadedModel(den, base.model_hash, base.dataset, base.sample_shape, train_sec=base.train_sec,
                           dataset_opts=base.dataset_opts, dtype=cfg.options.dtype,
                           model_metrics={"speed_options": cfg.options.label(), "speed_base": f"ddpm/{cfg.base_model}"})

    # -------------------------------------------------------------------------------------------
    def tables(self, df):
        out = {}
        d = speed_records(df)
        for dev, g in (d.groupby("device_name", sort=True) if len(d) else ()):
            threads = sorted({int(t) for t in g["threads"] if _num(t) is not None})
            note = f", {'/'.join(map(str, threads))} torch thread(s)" if g["device"].iloc[0] == "cpu" and threads else ""
            out[f"Speed ablation — {dev}{note}: latency per denoiser call and per 20-step Euler sample, "
                f"peak extra memory per call, deviation from the fp32 naive-attention baseline"] = ablation_table(g)
        oh = speed_records(df, "overhead")
        if len(oh):
            out["Sampling-loop overhead: 20-step Euler sample / 20 bare denoiser calls (digits U-Net; target <= 1.02 "
                "at batch 512 on a GPU)"] = pd.DataFrame([{
                    "device": r["device_name"], "network": r["network"], "batch": int(r["batch"]), "mode": r["set"],
                    "ms / call": _fmt(_num(r["sec_bare_calls"]) / max(_num(r["nfe"]) or 1, 1) if _num(r["sec_bare_calls"]) else None, 1e3),
                    "ms / sample": _fmt(r["sec_per_sample"], 1e3), "NFE": int(_num(r["nfe"]) or 0),
                    "overhead": _fmt(r["overhead_ratio"], digits=4)} for _, r in oh.iterrows()])
        cmp_ = speed_records(df, "diffusers")
        if len(cmp_):
            rows = []
            for (dev, batch), g in cmp_.groupby(["device_name", "batch"], sort=True):
                ref = g[g["set"] == "diffusers_compile"]
                t_ref = ref["sec_per_call"].iloc[0] if len(ref) else None
                for _, r in g.iterrows():
                    s = _ratio(t_ref, r["sec_per_call"])
                    rows.append({"device": dev, "batch": int(batch), "network": r["set"], "options": r["label"],
                                 "ms / call": _fmt(r["sec_per_call"], 1e3), "peak MB": _fmt(r["peak_mb"]),
                                 "vs diffusers + compile": f"{s:.2f}x" if s else "–"})
            out["DDPM CIFAR-10 U-Net: ours (bf16, every option) vs diffusers UNet2DModel (bf16) per network call"] = \
                pd.DataFrame(rows)
        return out

    def plots(self, df, outdir):
        """Speedup per option set (per denoiser call), one panel per device, bars per network and batch."""
        from pathlib import Path

        from bench_core.report.plots import new_figure, save_figure

        d = speed_records(df)
        paths = []
        for dev, g in (d.groupby("device_name", sort=True) if len(d) else ()):
            groups = list(dict.fromkeys(zip(g["network"], g["batch"])))
            sets = [s for s in SET_ORDER if s in set(g["set"])]
            if not groups or len(sets) < 2:
                continue
            fig = new_figure(max(6.0, 0.45 * len(sets) * len(groups) ** 0.5 + 4), 3.8)
            ax = fig.add_subplot(1, 1, 1)
            width = 0.8 / len(groups)
            for j, (net, batch) in enumerate(groups):
                gg = g[(g["network"] == net) & (g["batch"] == batch)].set_index("set")
                base = gg["sec_per_call"].get("baseline")
                ys = [(_ratio(base, gg["sec_per_call"].get(s)) or 0.0) if s in gg.index else 0.0 for s in sets]
                ax.bar([i + (j - (len(groups) - 1) / 2) * width for i in range(len(sets))], ys, width,
                       label=f"{net} b={batch}")
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xticks(range(len(sets)))
            ax.set_xticklabels(sets, rotation=30, ha="right", fontsize=7)
            ax.set_ylabel("speedup per call vs baseline")
            ax.set_title(f"Speed ablation — {dev}", fontsize=9)
            ax.legend(fontsize=6, ncol=2)
            slug = "".join(c if c.isalnum() else "-" for c in dev.lower()).strip("-")[:40]
            paths.append(save_figure(fig, Path(outdir) / f"speed_ablation_{slug}.png"))
        return paths

    def claims(self):
        return [
            Claim("speed-options-equal",
                  "Every speed option (alone and all together) leaves the network's output equal to the fp32 "
                  "naive-attention reference within its stated tolerance (fp32 1e-5 on CPU, 1e-4 on CUDA, 5e-3 with TF32; "
                  "bf16 5e-2; fp16 1e-2; relative to the output's largest magnitude)",
                  "qualitative: the optimizations do not change the model's outputs", _check_equal),
            Claim("speed-all-faster",
                  "All options together are faster per denoiser call than the baseline on the large networks "
                  "(DDPM CIFAR-10 and SD-shaped U-Nets), on every device and batch measured",
                  "SD 1.4, 20 iterations at 512x512: -52% latency on a Galaxy S23 Ultra, -33% on an iPhone 14 Pro",
                  _check_all_faster),
            Claim("speed-attention-memory",
                  "Chunked (partially fused) and fused (sdpa) attention need less peak memory per call than naive "
                  "attention on the SD-shaped network (64x64 latent: 4096 x 4096 attention weights per head)",
                  "qualitative (Sec. 3: the full attention matrix is never materialised)", _check_attention_memory),
            Claim("speed-trained-same-fid",
                  "On the trained DDPM digits model, the speed options (sdpa, bf16) keep the FID "
                  "(within max(1.0, 15%) of fp32 with the same sampler and steps) and sample faster",
                  "qualitative: the optimizations do not change the model's outputs; -33% to -52% latency",
                  _check_trained),
            Claim("speed-gpu-loop-overhead",
                  "On a GPU, the sampling loop costs at most 1.02x NFE denoiser calls at batch 512 (digits U-Net, "
                  "with CUDA graphs: per call, or the whole loop captured)",
                  "issue target (not from the paper)", _check_overhead),
            Claim("speed-gpu-vs-diffusers",
                  "On a GPU, our DDPM CIFAR-10 U-Net in bf16 with every option is at least as fast as diffusers' "
                  "UNet2DModel (same configuration, bf16, torch.compile) at the same batch",
                  "issue target (not from the paper)", _check_diffusers),
        ]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_equal(df) -> ClaimResult:
    d = speed_records(df)
    d = d[d["equal"].notna()] if len(d) else d
    if len(d) == 0:
        return ClaimResult("not run", "no speed ablation records (benchmarks/speed_ablation.py)")
    bad = d[~d["equal"].astype(bool)]
    worst = {}
    for dt, g in d.groupby("dtype"):
        worst[dt] = max(float(x) for x in g["rel_err"])
    text = f"{len(d) - len(bad)}/{len(d)} within tolerance; worst relative error " + ", ".join(
        f"{k} {v:.1e}" for k, v in sorted(worst.items()))
    if len(bad):
        text += "; outside: " + ", ".join(f"{r.network}/b{r.batch}/{r.set} ({r.rel_err:.1e})" for r in bad.itertuples())
    return ClaimResult("pass" if len(bad) == 0 else "fail", text)


def _speedups(d) -> list[tuple]:
    out = []
    if len(d) == 0:
        return out
    for (dev, net, batch), g in d.groupby(["device_name", "network", "batch"], sort=False):
        g = g.set_index("set")
        if "baseline" in g.index and "all" in g.index:
            s = _ratio(g.loc["baseline", "sec_per_call"], g.loc["all", "sec_per_call"])
            if s:
                out.append((dev, net, int(batch), s))
    return out


def _check_all_faster(df) -> ClaimResult:
    sp = _speedups(speed_records(df))
    large = [x for x in sp if x[1] in LARGE]
    if not large:
        return ClaimResult("not run", "need baseline and all-options records of the CIFAR-10 or SD-shaped network")
    ok = all(s > 1.0 for *_, s in large)
    devs = sorted({x[0] for x in sp})
    text = "; ".join(f"{dev}: " + ", ".join(f"{net} b{b} {s:.2f}x" for d_, net, b, s in sp if d_ == dev) for dev in devs)
    return ClaimResult("pass" if ok else "fail", "speedup of all options per call: " + text)


def _check_attention_memory(df) -> ClaimResult:
    d = speed_records(df)
    if len(d) == 0:
        return ClaimResult("not run", "no speed ablation records")
    d = d[d["network"] == "sd15_shaped"]
    parts, ok, seen = [], True, False
    for (dev, batch), g in d.groupby(["device_name", "batch"], sort=True):
        g = g.set_index("set")
        naive = _num(g["peak_mb"].get("baseline")) if "baseline" in g.index else None
        for s in ("attn_chunked", "attn_sdpa"):
            v = _num(g["peak_mb"].get(s)) if s in g.index else None
            if naive is None or v is None:
                continue
            seen = True
            ok &= v < naive
            parts.append(f"{dev} b{batch} {s} {v:.0f} MB vs naive {naive:.0f} MB")
    if not seen:
        return ClaimResult("not run", "need SD-shaped records with naive, chunked and sdpa attention and peak memory")
    return ClaimResult("pass" if ok else "fail", "; ".join(parts))


def _check_overhead(df) -> ClaimResult:
    d = speed_records(df, "overhead")
    d = d[(d["device"] == "cuda") & (d["batch"] >= 512)] if len(d) else d
    if len(d) == 0:
        return ClaimResult("not run", "no GPU sampling-overhead record at batch 512 (benchmarks/gpu_ablation.sh)")
    best = d.loc[d["overhead_ratio"].astype(float).idxmin()]
    text = ", ".join(f"{r.device_name} {r.set} {float(r.overhead_ratio):.3f}" for r in d.itertuples())
    return ClaimResult("pass" if float(best["overhead_ratio"]) <= 1.02 else "fail", text)


def _check_diffusers(df) -> ClaimResult:
    d = speed_records(df, "diffusers")
    d = d[d["device"] == "cuda"] if len(d) else d
    if len(d) == 0:
        return ClaimResult("not run", "no GPU diffusers comparison (needs diffusers: pip install -e '.[compare]')")
    parts, ok, seen = [], True, False
    for (dev, batch), g in d.groupby(["device_name", "batch"]):
        g = g.set_index("set")
        ours = [v for v in ("ours_all", "ours_all_compile") if v in g.index]
        if ours and "diffusers_compile" in g.index:
            b = float(g.loc["diffusers_compile", "sec_per_call"])
            a = min(float(g.loc[v, "sec_per_call"]) for v in ours)  # every option: with or without compile
            seen = True
            ok &= a <= b
            parts.append(f"{dev} b{batch}: ours " + ", ".join(
                f"{v} {float(g.loc[v, 'sec_per_call']) * 1e3:.2f} ms" for v in ours)
                + f" vs diffusers+compile {b * 1e3:.2f} ms")
    if not seen:
        return ClaimResult("not run", "need both ours_all and diffusers_compile records at one batch")
    return ClaimResult("pass" if ok else "fail", "; ".join(parts))


SPEED_REPRO = register(Speed())


def _check_trained(df) -> ClaimResult:
    """Suite records of reproduction ``speed`` (a ddpm checkpoint under options) against the fp32 ddpm/ddim
    records of the same model hash, sampler, options and steps."""
    try:
        if df is None or len(df) == 0 or "reproduction" not in df:
            return ClaimResult("not run", "no records")
        d = ok_rows(df, "fid")
        fast = d[(d["reproduction"] == "speed") & (d["dtype"] != "float32")]
        # fp32 references: the speed reproduction's own (timed beside the fast runs) first, then ddpm/ddim's
        ref = d[d["reproduction"].isin(["speed", "ddpm", "ddim"]) & (d["dtype"] == "float32")]
        ref = ref.assign(_own=ref["reproduction"] != "speed").sort_values("_own", kind="stable")
        parts, ok, n = [], True, 0
        for _, r in fast.iterrows():
            same = ref[(ref["model_hash"] == r["model_hash"]) & (ref["sampler"] == r["sampler"])
                       & (ref["steps"] == r["steps"]) & (ref["num_samples"] == r["num_samples"])
                       & (ref["batch_size"] == r["batch_size"]) & (ref["device_name"] == r["device_name"])
                       & (ref["sampler_opts"].map(repr) == repr(r["sampler_opts"]))
                       & (ref["grid"].map(repr) == repr(r["grid"]))]
            if len(same) == 0:
                continue
            b = same.iloc[0]
            n += 1
            close = abs(r["fid"] - b["fid"]) <= max(1.0, 0.15 * b["fid"])
            faster = r["sec_per_batch"] < b["sec_per_batch"]
            ok &= bool(close and faster)
            parts.append(f"{r['sampler']} S={int(r['steps'])} {r['dtype']}: FID {r['fid']:.2f} vs fp32 {b['fid']:.2f}, "
                         f"{r['sec_per_batch']:.2f} s vs {b['sec_per_batch']:.2f} s per batch "
                         f"({b['sec_per_batch'] / r['sec_per_batch']:.2f}x)")
        if not n:
            return ClaimResult("not run", "need speed suite records and fp32 ddpm/ddim records of the same model, "
                                          "sampler and steps (default suite, entry speed-digits)")
        return ClaimResult("pass" if ok else "fail", "; ".join(parts))
    except Exception as e:
        return ClaimResult("not run", f"check failed: {type(e).__name__}: {e}")
