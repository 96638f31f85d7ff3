"""Li et al. 2023 — Q-Diffusion: Quantizing Diffusion Models.

Post-training quantization of the DDPM noise-prediction network (``bench_core.methods.quant``): per-channel
weight quantizers, per-tensor activation quantizers, at W8A8, W4A8 and W4A32, simulated (fake-quant)
as the paper does.  The model is the DDPM digits model (``reproductions.ddpm``, its checkpoint cache)
with a quantization config; the calibration result is cached by the hash of both.  The quantized
network is a denoiser wrapper, so every sampler runs on it.

Methods: ``naive`` (calibration inputs all from one sampler step, x_T by default; no shortcut split;
nearest rounding) and ``qdiffusion`` (time-step-aware calibration + shortcut splitting + AdaRound,
layer-wise where the paper reconstructs blocks with BRECQ).  Both use the same range estimators
(squared-error-optimal clipping for weights and activations), so the difference is the paper's three
ingredients.  Beyond the paper: ``execution="int8"`` runs the calibrated W<=8 A8 network in integer
arithmetic on the CPU through PyTorch's oneDNN int8 kernels (``bench_core.methods.quant.to_int8``; the hand-written
``torch._int_mm`` path only as a fallback, with a warning); records say which ran (``metrics.quant_execution``,
``quant_int8_backend``) and carry the executed network's weight bytes.  ``benchmarks/int8_speed.py`` measures
float32 / simulated / int8 per denoiser call side by side; its records feed the speed table here.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field, replace

import pandas as pd
import torch

from bench_core.methods import quant as Q
from bench_core.methods.quant import QuantConfig, QuantizedDenoiser
from bench_core.train import CheckpointCache, CheckpointError, config_hash
from bench_core.stats import at_least, beats, equivalent, summarize
from reproductions import Claim, ClaimResult, LoadedModel, Reproduction, ok_rows, register, seed_values
from reproductions.ddpm import BuiltOnDDPM

EXECUTIONS = ("simulated", "int8")


@dataclass
class QDiffusionConfig:
    """A quantized DDPM model: the full-precision model (a DDPM preset + its overrides), the quantization,
    and how the quantized network executes."""

    base_model: str = "digits"                       # a reproductions.ddpm preset (its checkpoint is reused)
    base_overrides: dict = field(default_factory=dict)
    quant: QuantConfig = field(default_factory=QuantConfig)
    execution: str = "simulated"                     # "simulated" (fake-quant, float32) | "int8" (CPU, oneDNN int8)
    int8_fused_norm: bool = False                    # int8: GroupNorm + SiLU as one compiled kernel (quant.to_int8)


def _naive(w: int, a: int) -> QuantConfig:
    """Traditional PTQ: calibration inputs all from the first sampler step (x_T), no split, nearest rounding."""
    return QuantConfig(w_bits=w, a_bits=a, calib="naive", naive_step=0, split_shortcut=False, rounding="nearest")


def _qdiff(w: int, a: int, **kw) -> QuantConfig:
    """Q-Diffusion: time-step-aware calibration over a 50-step DDIM run, shortcut splitting, AdaRound."""
    return QuantConfig(w_bits=w, a_bits=a, calib="timestep", split_shortcut=True, rounding="adaround", **kw)


# Presets.  digits-*: our CPU scale, 256 calibration inputs, 500 AdaRound steps per layer.
# cifar10-*: the paper's CIFAR-10 setting as far as our harness goes (DDIM 100 steps, 5120 calibration
# inputs, ≈); the paper reports W4A8 FID 4.93 there (full precision DDIM-100: not in our notes).
MODELS: dict[str, QDiffusionConfig] = {
    "digits-fp32": QDiffusionConfig(quant=QuantConfig(w_bits=32, a_bits=32, calib="naive", split_shortcut=False,
                                                      rounding="nearest")),
    "digits-w8a8-naive": QDiffusionConfig(quant=_naive(8, 8)),
    "digits-w4a8-naive": QDiffusionConfig(quant=_naive(4, 8)),
    "digits-w8a8-qdiff": QDiffusionConfig(quant=_qdiff(8, 8)),
    "digits-w4a8-qdiff": QDiffusionConfig(quant=_qdiff(4, 8)),
    "digits-w4a32-qdiff": QDiffusionConfig(quant=_qdiff(4, 32)),
    # the ablation (qd-ablation-each-helps): naive W4A8 with one of the paper's three ingredients switched on
    "digits-w4a8-timestep-only": QDiffusionConfig(quant=replace(_naive(4, 8), calib="timestep")),
    "digits-w4a8-split-only": QDiffusionConfig(quant=replace(_naive(4, 8), split_shortcut=True)),
    "digits-w4a8-adaround-only": QDiffusionConfig(quant=replace(_naive(4, 8), rounding="adaround")),
    "digits-w8a8-naive-int8": QDiffusionConfig(quant=_naive(8, 8), execution="int8"),
    "digits-w8a8-qdiff-int8": QDiffusionConfig(quant=_qdiff(8, 8), execution="int8"),
    "digits-w4a8-qdiff-int8": QDiffusionConfig(quant=_qdiff(4, 8), execution="int8"),
    # the same int8 W8A8 network with its GroupNorm + SiLU compiled into one kernel (benchmarks/int8_speed.py's
    # fastest int8 row on the digits U-Net); compiled at its first call
    "digits-w8a8-qdiff-int8-fused": QDiffusionConfig(quant=_qdiff(8, 8), execution="int8", int8_fused_norm=True),
    "cifar10-w4a8-qdiff": QDiffusionConfig(base_model="cifar10",
                                           quant=_qdiff(4, 8, calib_sampler_steps=100, n_calib=5120, adaround_iters=2000)),
}

# The paper's numbers (PAPERS.md, section 10), CIFAR-10 DDIM 100 steps.
PAPER = {
    ("W4A8", "qdiffusion"): "4.93",
    ("W4A8", "naive"): "FID change > 100",
    ("W4A32", "qdiffusion"): "FID change <= 2.3",
}


class QDiffusion(BuiltOnDDPM, Reproduction):
    name = "qdiffusion"
    title = "Li et al. 2023 — Q-Diffusion: Quantizing Diffusion Models"
    paper_url = "https://arxiv.org/abs/2302.04304"
    models = MODELS

    def check_config(self, model: str, cfg: QDiffusionConfig) -> QDiffusionConfig:
        """Raise ValueError for a bad base model, an unknown execution or an int8 execution of a config it cannot
        run (QuantConfig itself rejects unsupported bit widths when the overrides build it)."""
        self.check_base(cfg)
        if cfg.execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {cfg.execution!r}")
        if cfg.execution == "int8" and (cfg.quant.a_bits != 8 or cfg.quant.w_bits > 8):
            raise ValueError(f"execution 'int8' needs 8-bit activations and <= 8-bit weights, got {cfg.quant.label}")
        if cfg.int8_fused_norm and cfg.execution != "int8":
            raise ValueError(f"int8_fused_norm: applies to execution 'int8' only, got execution {cfg.execution!r}")
        return cfg

    def _hashes(self, cfg: QDiffusionConfig) -> tuple[str, str, str]:
        """(base model hash, calibration hash, model hash)."""
        base = self.base_hash(cfg)
        calib = config_hash({"family": "qdiffusion-calib", "version": Q.CALIB_VERSION},
                            {"base": base, "quant": asdict(cfg.quant)})
        fused = {"int8_fused_norm": True} if cfg.int8_fused_norm else {}  # (earlier models' hashes unchanged)
        model = config_hash({"family": "qdiffusion"}, {"calib": calib, "execution": cfg.execution, **fused})
        return base, calib, model

    def hash_config(self, cfg: QDiffusionConfig) -> str:
        return self._hashes(cfg)[2]

    def needed_checkpoints(self, model: str, overrides: dict, cfg: QDiffusionConfig) -> list[str]:
        """The base model's checkpoint and, when quantized, the cached calibration (shared by the simulated and
        int8 executions)."""
        base = self.base_checkpoints(cfg)
        return base if cfg.quant.is_float else base + [self._hashes(cfg)[1]]

    def load_model(self, model: str, overrides: dict, *, device, cache_dir, progress: bool = True) -> LoadedModel:
        cfg = self.model_config(model, overrides)
        device = torch.device(device)
        if cfg.execution == "int8" and device.type != "cpu":
            raise RuntimeError("execution 'int8' runs on the CPU (oneDNN int8 kernels); use --device cpu or execution "
                               "'simulated'")
        base_hash, calib_hash, h = self._hashes(cfg)
        # the full-precision model, from the DDPM checkpoint cache (trained there when missing); calibration on CPU
        base = self.load_base(cfg, device=torch.device("cpu"), cache_dir=cache_dir, progress=progress)
        q = cfg.quant
        metrics = {"quant_label": q.label, "quant_method": q.method, "quant_w_bits": q.w_bits, "quant_a_bits": q.a_bits,
                   "quant_calib": q.calib, "quant_split": q.split_shortcut, "quant_rounding": q.rounding,
                   "quant_base_hash": base_hash, "quant_calib_hash": calib_hash, "quant_calib_sec": 0.0}
        spent = 0.0
        metrics["weight_bytes_fp32"] = Q.executed_weight_bytes(base.denoiser.model)
        if q.is_float:
            den = QuantizedDenoiser(base.denoiser, base.denoiser.model, q, "float32").to(device)  # (timed calls)
            metrics.update(quant_execution="float32", weight_mb=Q.weight_bytes(den.inner.model) / 2**20,
                           weight_bytes_executed=metrics["weight_bytes_fp32"])
        else:
            net = base.denoiser.model
            qnet = Q.wrap_layers(net, q)
            cache = CheckpointCache(cache_dir)
            try:
                meta = cache.load(calib_hash, qnet)
            except CheckpointError as e:  # derived data, seconds to redo: recompute and overwrite, and say so
                warnings.warn(f"qdiffusion/{model}: cached calibration unusable, recalibrating: {e}")
                meta = None
            if meta is None:  # not cached (or stale): calibrate now
                t0 = time.perf_counter()
                with torch.random.fork_rng():
                    torch.manual_seed(q.seed)
                    calib = Q.gather_calibration(base.denoiser, net, base.sample_shape, q) if _needs_data(q) else None
                    qnet, info = Q.quantize_net(net, q, calib)
                spent = time.perf_counter() - t0
                meta = {"calib_sec": spent, "config": asdict(cfg), **info}
                cache.save(calib_hash, qnet, meta)
            metrics["quant_calib_sec"] = float(meta.get("calib_sec") or 0.0)
            metrics["weight_mb"] = Q.weight_bytes(qnet) / 2**20
            if cfg.execution == "int8":
                qnet = Q.to_int8(qnet, fused_norm=cfg.int8_fused_norm)  # oneDNN; the fallback warns and says why
                backend = qnet.int8_backend
                metrics.update(quant_execution=Q.INT8_EXECUTION[backend], quant_int8_backend=backend,
                               quant_int8_fused_norm=qnet.int8_fused_norm,
                               quant_int8_fallback=Q.int8_backend_problem("onednn") if backend != "onednn" else "")
                if backend == "onednn":
                    metrics.update(quant_int8_quantizer=Q.int8_quantizer(),
                                   quant_int8_weight_passes=Q.onednn_weight_passes())
            else:
                metrics["quant_execution"] = "simulated (fake-quant, float32)"
            metrics["weight_bytes_executed"] = Q.executed_weight_bytes(qnet)
            den = QuantizedDenoiser(base.denoiser, qnet, q, cfg.execution).to(device)
        train_sec = None
        if base.train_sec is not None or spent:
            train_sec = float(base.train_sec or 0.0) + spent
        metrics["weight_ratio_vs_fp32"] = metrics["weight_bytes_executed"] / metrics["weight_bytes_fp32"]
        den.calls.reset()
        return LoadedModel(den, h, base.dataset, base.sample_shape, train_sec=train_sec,
                           dataset_opts=dict(base.dataset_opts), model_metrics=metrics,
                           sample_metrics=lambda samples, d=den: d.calls.metrics(),
                           dtype="int8" if cfg.execution == "int8" else "float32")

    # ---------------------------------------------------------------------------------------
    def tables(self, df):
        out = {}
        for (sampler, steps, grid), d in _groups(df):
            rows = []
            fp = _fid(d, "FP32", "fp32")
            m = d["metrics"].map(lambda x: x if isinstance(x, dict) else {})
            d = d.assign(q_exec_bytes=m.map(lambda x: x.get("weight_bytes_executed", float("nan"))))
            for (label, method, execution, parts), r in d.groupby(["q_label", "q_method", "q_exec", "q_parts"], sort=False):
                fid = float(r["fid"].mean())
                name = _METHOD_NAMES.get(method, method) if method != "custom" else f"naive + {parts}"
                sec = float(r["sec_per_batch"].median())
                nfe = float(r["nfe"].median()) if "nfe" in r and r["nfe"].notna().any() else 0.0
                batch = float(r["batch_size"].median()) if "batch_size" in r and r["batch_size"].notna().any() else 0.0
                rows.append({
                    "_rank": {"fp32": 0, "qdiffusion": 1, "naive": 2}.get(method, 3),
                    "config": f"{label} {name}".strip(),
                    "execution": _execution_label(execution),
                    "FID": f"{fid:.2f}",
                    "ΔFID vs FP32": "—" if fp is None or label == "FP32" else f"{fid - fp:+.2f}",
                    "s / batch": f"{sec:.3g}",
                    "ms / call": f"{sec / nfe * 1e3:.3g}" if nfe > 0 else "—",
                    "ms / sample": f"{sec / batch * 1e3:.3g}" if batch > 0 else "—",
                    "peak MB": f"{float(r['peak_mem_mb'].median()):.1f}" if r["peak_mem_mb"].notna().any() else "—",
                    "weights MB": f"{float(r['q_weight_mb'].median()):.3f}",
                    "executed weights MB": (f"{float(r['q_exec_bytes'].median()) / 2**20:.3f}"
                                            if r["q_exec_bytes"].notna().any() else "—"),
                    "calib s": f"{float(r['q_calib_sec'].max()):.1f}",
                    "paper (CIFAR-10, DDIM-100)": PAPER.get((label, method), "—"),
                })
            order = {"FP32": 0, "W8A8": 1, "W4A8": 2, "W4A32": 3}
            rows.sort(key=lambda x: (order.get(x["config"].split()[0], 9), x["execution"].startswith("real"),
                                     x.pop("_rank"), x["config"]))
            out[f"Q-Diffusion — digits FID by bit width and method ({sampler} {grid}, S={steps}, "
                f"n={int(d['num_samples'].iloc[0])}; weights MB at the nominal bit widths, executed weights MB "
                f"as the running network stores them)"] = pd.DataFrame(rows)
        out.update(_speed_tables(df))
        return out

    def claims(self):
        return [
            Claim("qd-w8a8-near-fp",
                  "W8A8 with the paper's method (simulated) stays near full precision: its FID equals the FP32 model's "
                  f"within ±{W8A8_TOL:g} (two one-sided tests at 95%, paired over sampling seeds).  Tolerance from the "
                  "measured noise: one sampling seed moves FID by 0.7–1.4 (sd, FID 5–9, n=500; issue 12), and a "
                  "retrained model by about 0.5; a W8A8 change below the smallest of the seed sds (0.7, rounded to "
                  "1.0 FID with the retraining spread) is indistinguishable from drawing other samples.  One training "
                  "seed suffices: quantization is applied to the same trained network, so the comparison is paired "
                  "on the network (and on the sampling seeds' initial noise).",
                  "W8A8 near full precision (PAPERS.md §10)",
                  _check_w8a8),
            Claim("qd-naive-w4a8-degrades",
                  "Naive W4A8 PTQ (calibration from one step, no split, nearest rounding) degrades FID by more than "
                  f"{NAIVE_MARGIN:g} (one-sided test at 95%, paired over sampling seeds).  Threshold from the paper: "
                  "2.3 FID is the largest change it reports for a working 4-bit-weight model (Q-Diffusion), so a naive "
                  "model significantly worse than that is on the broken side of the paper's line (it reports > 100 "
                  "for traditional PTQ on CIFAR-10; our 8x8 digits cannot reach a 100-FID change).  Replaces the old "
                  "2x-FP32 ratio, which sat between two observed runs (1.8x, 2.4x).  One training seed: paired on the "
                  "same trained network (see qd-w8a8-near-fp).",
                  "traditional PTQ changes FID by > 100 at 4-bit weights; Q-Diffusion by <= 2.3", _check_naive),
            Claim("qd-recovers-gap",
                  "Q-Diffusion W4A8 (time-step-aware calibration + shortcut splitting + AdaRound) recovers most of the "
                  "gap: the per-seed fraction (FID naive - FID Q-Diffusion) / (FID naive - FID FP32) is above 0.5 "
                  "(one-sided test at 95% over sampling seeds).  'Most' is the plain reading of the paper's claim "
                  "(more than half); the paper itself recovers > 97% (W4A8 4.93 where naive PTQ changes FID by "
                  "> 100).  One training seed: paired on the same trained network.",
                  "W4A8 FID 4.93 on CIFAR-10 (4-bit weights change FID by <= ~2.3; naive PTQ by > 100)",
                  _check_recovers),
            Claim("qd-ablation-each-helps",
                  "Each of the paper's three ingredients alone improves naive W4A8: time-step-aware calibration, "
                  "shortcut splitting and AdaRound (presets digits-w4a8-timestep-only / -split-only / -adaround-only) "
                  "each give a lower FID than naive W4A8 (one-sided test at 95%, margin 0, paired over sampling "
                  "seeds); pass when all three pass, fail when one is significantly worse, otherwise inconclusive.  "
                  "One training seed: every variant quantizes the same trained network.",
                  "the paper's ablations: time-step-aware calibration beats calibrating on one step, splitting the "
                  "shortcut beats not splitting, and BRECQ/AdaRound reconstruction beats nearest rounding, each at "
                  "4-bit weights (the per-ingredient FIDs are not in our notes, PAPERS.md §10: direction only)",
                  _check_ablation),
            Claim("qd-int8-real",
                  f"Beyond the paper: real int8 execution (oneDNN int8 kernels on the CPU) reproduces the simulated FID "
                  f"of the same calibrated model within ±{INT8_TOL:g} FID (two one-sided tests at 95%, paired over "
                  "sampling seeds; issue 16's tolerance: 0.5 FID on the same seeds, half the W8A8 tolerance), for "
                  "every int8 preset run; latency per denoiser call and weight bytes recorded beside it.",
                  "the paper simulates quantization only", _check_int8, kind="target"),
        ]


_METHOD_NAMES = {"fp32": "", "naive": "naive PTQ", "qdiffusion": "Q-Diffusion", "custom": "custom"}


def _execution_label(execution: str) -> str:
    """'float32', 'simulated', 'real-int8 (oneDNN)' or 'real-int8 (hand-written)' from ``metrics.quant_execution``."""
    if not execution.startswith("real"):
        return execution.split(" (")[0]
    return "real-int8 (oneDNN)" if "oneDNN" in execution else "real-int8 (hand-written)"


SPEED_KIND = "int8-speed"       # metrics.kind of benchmarks/int8_speed.py's records
SPEED_VARIANTS = ("fp32", "fp32-fusednorm", "sim-w8a8", "int8-w8a8", "int8-w8a8-fusednorm", "int8-w4a8")


def _speed_tables(df) -> dict:
    """Float32 vs simulated W8A8 vs int8 W8A8 / W4A8 per denoiser call, from benchmarks/int8_speed.py's records
    (reproduction qdiffusion, ``metrics.kind`` int8-speed), one table per CPU; the newest record of each entry.
    The ratios are the run's own (alternating timings in one process), not ratios of medians of different runs."""
    if df is None or len(df) == 0 or "reproduction" not in df:
        return {}
    d = df[(df["reproduction"] == "qdiffusion") & (df["status"] == "ok")]
    d = d[d["metrics"].map(lambda x: isinstance(x, dict) and x.get("kind") == SPEED_KIND)]
    if not len(d):
        return {}
    d = d.sort_values("timestamp").drop_duplicates(["device_name", "entry"], keep="last")
    out = {}
    for dev, g in d.groupby("device_name", sort=True):
        rows = []
        for _, r in g.iterrows():
            m = r["metrics"]
            rows.append({
                "_key": (m.get("network", ""), int(r["batch_size"]), SPEED_VARIANTS.index(m["variant"])
                         if m.get("variant") in SPEED_VARIANTS else 9),
                "network": f"{m.get('network', r['model'])} ({m.get('weights', '?')} weights)",
                "batch": int(r["batch_size"]),
                "execution": m.get("label", m.get("variant", "?")),
                "ms / call": _fmt(m.get("sec_per_call"), 1e3),
                "ms / image": _fmt(_div(m.get("sec_per_call"), r["batch_size"]), 1e3, "{:.3g}"),
                "speed-up vs FP32": _fmt(m.get("speedup_vs_fp32"), 1, "{:.2f}x"),
                "weights MB": _fmt(_div(m.get("weight_bytes"), 2**20), 1, "{:.2f}"),
                "weights vs FP32": _fmt(m.get("weight_ratio_vs_fp32"), 1, "{:.3f}"),
                "peak MB": _fmt(r["peak_mem_mb"], 1, "{:.1f}"),
                "rel. error vs simulated": _fmt(m.get("rel_err_vs_simulated"), 1, "{:.1e}"),
            })
        rows.sort(key=lambda x: x.pop("_key"))
        threads = sorted({int(r["metrics"].get("threads", 0)) for _, r in g.iterrows()})
        reps = sorted({int(r["metrics"].get("call_repeats", 0)) for _, r in g.iterrows()})
        out[f"Q-Diffusion beyond the paper — real int8 vs float32 per denoiser call on {dev} "
            f"({'/'.join(map(str, threads))} thread(s); benchmarks/int8_speed.py: one process, variants alternating, "
            f"median of {'/'.join(map(str, reps))}; peak = extra memory of one call)"] = pd.DataFrame(rows)
    return out


def _div(a, b):
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return None
    return a / b if b and a == a else None


def _fmt(v, scale: float = 1.0, spec: str = "{:.3g}") -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "—"
    return "—" if v != v else spec.format(v * scale)


def _needs_data(q: QuantConfig) -> bool:
    return q.a_bits != 32 or (q.rounding == "adaround" and q.w_bits != 32)


def _frame(df):
    """ok qdiffusion records with FID, the quantization fields pulled out of ``metrics``."""
    if df is None or len(df) == 0 or "reproduction" not in df:
        return None
    d = ok_rows(df, "fid", reproduction="qdiffusion").copy()
    if len(d) == 0:
        return None
    m = d["metrics"].map(lambda x: x if isinstance(x, dict) else {})
    d["q_label"] = m.map(lambda x: x.get("quant_label", "?"))
    d["q_method"] = m.map(lambda x: x.get("quant_method", "?"))
    d["q_exec"] = m.map(lambda x: x.get("quant_execution", "?"))
    d["q_base"] = m.map(lambda x: x.get("quant_base_hash", ""))
    d["q_weight_mb"] = m.map(lambda x: x.get("weight_mb", float("nan")))
    d["q_calib_sec"] = m.map(lambda x: x.get("quant_calib_sec", 0.0))
    d["q_parts"] = m.map(lambda x: " + ".join(p for p, on in (
        ("time-step-aware calibration", x.get("quant_calib") == "timestep"), ("shortcut split", x.get("quant_split")),
        ("AdaRound", x.get("quant_rounding") == "adaround")) if on) or "nothing")
    d["q_key"] = (d["sampler"].astype(str) + "|" + d["steps"].astype(str) + "|"
                  + d["grid"].map(lambda g: (g or {}).get("kind", "") if isinstance(g, dict) else "") + "|"
                  + d["sampler_opts"].map(lambda o: str(sorted((o or {}).items()))) + "|"
                  + d["fid_extractor"].astype(str) + "|" + d["num_samples"].astype(str) + "|" + d["q_base"])
    return d


def _groups(df):
    """Comparable groups (same sampler, options, grid, steps, extractor, n, base model), largest first."""
    d = _frame(df)
    if d is None:
        return []
    out = []
    for key in d["q_key"].value_counts().index:
        g = d[d["q_key"] == key]
        r = g.iloc[0]
        out.append(((r["sampler"], int(r["steps"]), (r["grid"] or {}).get("kind", "")), g))
    return out


W8A8_TOL = 1.0      # qd-w8a8-near-fp: FID tolerance (measured seed noise, see the claim text)
NAIVE_MARGIN = 2.3  # qd-naive-w4a8-degrades: the paper's largest FID change of a working 4-bit-weight model
RECOVER_MIN = 0.5   # qd-recovers-gap: "most" of the gap
INT8_TOL = 0.5      # qd-int8-real: issue 16's "within 0.5 FID on the same seeds"
ABLATION = (("time-step-aware calibration", "time-step-aware calibration"), ("shortcut split", "shortcut splitting"),
            ("AdaRound", "AdaRound"))


def _rows(d, label: str, method: str, simulated: bool = True, parts: str | None = None):
    r = d[(d["q_label"] == label) & (d["q_method"] == method)]
    if parts is not None:
        r = r[r["q_parts"] == parts]
    if simulated is not None:
        real = r["q_exec"].str.startswith("real")
        r = r[~real] if simulated else r[real]
    return r


def _fid(d, label: str, method: str, simulated: bool = True, parts: str | None = None):
    r = _rows(d, label, method, simulated, parts)
    return float(r["fid"].mean()) if len(r) else None


def _seeds(d, label: str, method: str, simulated: bool = True, parts: str | None = None) -> dict:
    """{(train_seed, seed): FID} of one configuration in a comparable group (two sides keyed alike are paired)."""
    return seed_values(_rows(d, label, method, simulated, parts), "fid")


def _best_group(df, need):
    """The largest comparable group that has every (label, method[, parts]) in ``need``."""
    for _, d in _groups(df):
        if all(_fid(d, *n) is not None for n in need):
            return d
    return None


def _check_w8a8(df) -> ClaimResult:
    d = _best_group(df, [("FP32", "fp32"), ("W8A8", "qdiffusion")])
    if d is None:
        return ClaimResult("not run", "", "need FP32 and W8A8 Q-Diffusion records from the same sampler and steps")
    v = equivalent(_seeds(d, "W8A8", "qdiffusion"), _seeds(d, "FP32", "fp32"), tol=W8A8_TOL,
                   names=("W8A8 Q-Diffusion", "FP32"))
    naive = _fid(d, "W8A8", "naive")
    extra = f"; W8A8 naive FID {naive:.2f}" if naive is not None else ""
    return ClaimResult(v.status, v.text + extra, v.why)


def _check_naive(df) -> ClaimResult:
    d = _best_group(df, [("FP32", "fp32"), ("W4A8", "naive")])
    if d is None:
        return ClaimResult("not run", "", "need FP32 and W4A8 naive records from the same sampler and steps")
    # "FP32 beats naive W4A8 by more than the margin" = naive degrades FID by more than the margin
    return ClaimResult.of(beats(_seeds(d, "FP32", "fp32"), _seeds(d, "W4A8", "naive"), margin=NAIVE_MARGIN,
                                names=("FP32", "W4A8 naive")))


def _check_recovers(df) -> ClaimResult:
    d = _best_group(df, [("FP32", "fp32"), ("W4A8", "naive"), ("W4A8", "qdiffusion")])
    if d is None:
        return ClaimResult("not run", "", "need FP32, W4A8 naive and W4A8 Q-Diffusion records from the same sampler "
                                          "and steps")
    fp, nv, qd = _seeds(d, "FP32", "fp32"), _seeds(d, "W4A8", "naive"), _seeds(d, "W4A8", "qdiffusion")
    keys = sorted(set(fp) & set(nv) & set(qd))
    gaps = {k: nv[k] - fp[k] for k in keys}
    if not keys:
        return ClaimResult("not run", "", "no sampling seed common to FP32, naive and Q-Diffusion W4A8")
    if all(g <= 0 for g in gaps.values()):
        return ClaimResult("fail", f"FP32 FID {summarize(fp.values()).text()}, naive {summarize(nv.values()).text()}",
                           "no gap to recover: naive W4A8 is not worse than FP32 on any seed")
    frac = {k: (nv[k] - qd[k]) / gaps[k] for k in keys if gaps[k] > 0}
    v = at_least(frac, RECOVER_MIN, what="fraction of the gap recovered")
    return ClaimResult(v.status, f"FP32 {summarize(fp.values()).text()}, naive {summarize(nv.values()).text()}, "
                                 f"Q-Diffusion {summarize(qd.values()).text()}; {v.text}", v.why)


def _check_ablation(df) -> ClaimResult:
    """Each ingredient alone vs naive W4A8: pass when all pass; fail when one fails; else inconclusive."""
    d = None
    for _, g in _groups(df):
        if _fid(g, "W4A8", "naive") is not None and any(_fid(g, "W4A8", "custom", True, p) is not None
                                                          for p, _ in ABLATION):
            d = g
            break
    if d is None:
        return ClaimResult("not run", "", "need W4A8 naive and the one-ingredient W4A8 presets from the same sampler "
                                          "and steps (digits-w4a8-timestep-only, -split-only, -adaround-only)")
    naive = _seeds(d, "W4A8", "naive")
    parts, statuses, whys = [], [], []
    for part, name in ABLATION:
        one = _seeds(d, "W4A8", "custom", True, part)
        if not one:
            statuses.append("not run")
            whys.append(f"{name}: not run")
            parts.append(f"{name}: not run")
            continue
        v = beats(one, naive, names=(f"naive + {name}", "naive"))
        statuses.append(v.status)
        parts.append(f"{name}: {v.status} ({v.text})")
        if v.status != "pass":
            whys.append(f"{name}: {v.why}")
    if "fail" in statuses:
        status = "fail"
    elif all(st == "pass" for st in statuses):
        status = "pass"
    elif all(st == "not run" for st in statuses):
        status = "not run"
    else:
        status = "inconclusive"
    return ClaimResult(status, "; ".join(parts), "; ".join(whys) if status != "pass" else "")


def _check_int8(df) -> ClaimResult:
    parts, statuses, whys = [], [], []
    for _, d in _groups(df):
        real = d[d["q_exec"].str.startswith("real")]
        for (label, method, qparts), r in real.groupby(["q_label", "q_method", "q_parts"]):
            sim = _rows(d, label, method, True, qparts)
            if not len(sim):
                continue
            name = f"{label} {_METHOD_NAMES.get(method, method)}"
            v = equivalent(seed_values(r, "fid"), seed_values(sim, "fid"), tol=INT8_TOL,
                           names=(f"{name} int8", "simulated"))
            m = r["metrics"].iloc[0] if isinstance(r["metrics"].iloc[0], dict) else {}
            ms = [x.get("sec_per_call") for x in r["metrics"] if isinstance(x, dict) and x.get("sec_per_call")]
            ms_sim = [x.get("sec_per_call") for x in sim["metrics"] if isinstance(x, dict) and x.get("sec_per_call")]
            lat = (f", {1e3 * sorted(ms)[len(ms) // 2]:.3g} vs {1e3 * sorted(ms_sim)[len(ms_sim) // 2]:.3g} ms per "
                   f"denoiser call" if ms and ms_sim else "")
            wb = m.get("weight_ratio_vs_fp32")
            parts.append(f"{name}: {v.status} ({v.text}{lat}"
                         + (f", weights {wb:.3f}x FP32's bytes" if wb else "") + ")")
            statuses.append(v.status)
            if v.status != "pass":
                whys.append(f"{name}: {v.why}")
        if parts:
            break
    if not parts:
        return ClaimResult("not run", "", "need a real-int8 record and the simulated record of the same config")
    status = "fail" if "fail" in statuses else ("pass" if all(x == "pass" for x in statuses) else "inconclusive")
    return ClaimResult(status, "; ".join(parts), "; ".join(whys) if status != "pass" else "")


QDIFFUSION_REPRO = register(QDiffusion())
