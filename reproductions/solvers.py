"""Fast ODE/SDE solvers beyond the eleven papers: DPM-Solver (Lu et al. 2022), DPM-Solver++ (Lu et al. 2022b),
UniPC (Zhao et al. 2023), DEIS and iPNDM (Zhang & Chen 2023), and k-diffusion's ancestral / LMS samplers.

The samplers live in ``bench_core.samplers`` (shared: they run on every model); this module trains nothing
(``models = {}``) and only states what the papers claim, checked on the records of the other reproductions'
models (suite ``samplers`` and the default suite's ``solvers-*`` entries).
"""
from __future__ import annotations

from bench_core.stats import beats
from reproductions import Claim, ClaimResult, Reproduction, fid_seeds, largest_group, ok_rows, primary, register

NFE = 10
# the sides of the claim: (label, sampler, grid kind, sampler options that must match)
FAST = (("DPM-Solver++(2M)", "dpmpp_2m", "karras", {}),
        ("UniPC-3 (bh1)", "unipc", "karras", {"order": 3, "variant": "bh1"}))
BASELINES = (("DDIM eta=0", "ddim", "uniform", {"eta": 0.0}),
             ("Euler", "euler", "karras", {}))


class Solvers(Reproduction):
    name = "solvers"
    title = "Fast ODE/SDE solvers: DPM-Solver++ (Lu et al. 2022b), UniPC (Zhao et al. 2023)"
    paper_url = "https://arxiv.org/abs/2211.01095"
    models: dict = {}

    def claims(self):
        return [
            Claim("solvers-dpmpp-unipc-beat-ddim-euler-10nfe",
                  f"At {NFE} NFE on the DDPM-trained digits model (reproduction ddpm, model digits), DPM-Solver++(2M) and "
                  "UniPC-3 (bh1), both on the Karras rho=7 grid, each have a lower FID than DDIM eta=0 (uniform "
                  "timesteps, DDIM's own setting) and Euler (Karras grid, EDM's setting). Each of the four comparisons "
                  "is a one-sided test at 95% paired over sampling seeds with margin 0 (the papers give no margin for "
                  "this model); pass if all four pass, fail if any is significantly worse, else inconclusive.",
                  "DPM-Solver++: guided ImageNet 256 in 15-20 steps, about 4x fewer steps than DDIM for the same FID "
                  "(≈); DPM-Solver (Lu et al. 2022) CIFAR-10 FID 4.70 at 10 NFE vs DDIM 13.36 (≈); UniPC: CIFAR-10 "
                  "FID 3.87 at 10 NFE vs DPM-Solver++ 4.36 (≈), better than DPM-Solver++ at 5-10 NFE",
                  check_fast_beat_baselines),
        ]


def _side(df, sampler: str, grid_kind: str, opts: dict) -> dict:
    """Replicates (train_seed, seed) -> FID of one sampler at NFE steps on the DDPM digits model."""
    eq = {f"opt_{k}": v for k, v in opts.items()}
    return fid_seeds(df, reproduction="ddpm", model="digits", sampler=sampler, steps=NFE, grid_kind=grid_kind, **eq)


def check_fast_beat_baselines(df) -> ClaimResult:
    d = ok_rows(df, "fid", reproduction="ddpm", model="digits", steps=NFE)
    if d is None or len(d) == 0:
        return ClaimResult("not run", "", f"no FID records of the ddpm digits model at {NFE} steps")
    d = primary(d)
    d = largest_group(d, "num_samples", "fid_extractor")   # compare like with like
    sides = {label: _side(d, s, g, o) for label, s, g, o in FAST + BASELINES}
    missing = [label for label, v in sides.items() if not v]
    if missing:
        return ClaimResult("not run", "", f"no records at {NFE} NFE for: {', '.join(missing)}")
    verdicts = []
    for fast, *_ in FAST:
        for base, *_ in BASELINES:
            verdicts.append((fast, base, beats(sides[fast], sides[base], what="FID", names=(fast, base))))
    ours = "; ".join(f"{f} vs {b}: {v.status} ({v.text})" for f, b, v in verdicts)
    failed = [f"{f} vs {b}" for f, b, v in verdicts if v.status == "fail"]
    open_ = [f"{f} vs {b}" for f, b, v in verdicts if v.status != "pass"]
    if failed:
        return ClaimResult("fail", ours, f"significantly worse: {', '.join(failed)}")
    if open_:
        return ClaimResult("inconclusive", ours, f"not decided: {', '.join(open_)}")
    return ClaimResult("pass", ours)


SOLVERS_REPRO = register(Solvers())
