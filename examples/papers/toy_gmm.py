"""A minimal paper module: the whole of what a twelfth paper needs (README, "Add a paper").

The "paper" claims that on a 2-D Gaussian mixture, with its exact denoiser (no training), Heun's method at 10
steps lands closer to the data than Euler's at 10 steps.  One model preset, one claim; the harness samples,
measures (sliced Wasserstein, MMD) and writes the records; ``diffbench report`` decides the claim.
"""
from __future__ import annotations

from dataclasses import dataclass

from bench_core.claims import fid_seeds, ok_rows
from bench_core.data import load_dataset
from bench_core.plugin import Claim, ClaimResult, LoadedModel, Reproduction, register
from bench_core.stats import beats
from bench_core.train import config_hash


@dataclass
class ToyConfig:
    preset: str = "ring8"   # a mixture of bench_core.data.GMM_PRESETS
    n: int = 2000           # reference points for the metrics


class ToyGMM(Reproduction):
    name = "toy_gmm"
    title = "Example paper: Heun beats Euler on an exact mixture denoiser"
    models = {"ring8": ToyConfig()}

    def hash_config(self, cfg: ToyConfig) -> str:
        return config_hash({"family": self.name}, {"preset": cfg.preset, "n": cfg.n})

    def load_model(self, model, overrides, *, device, cache_dir, progress=True) -> LoadedModel:
        cfg = self.model_config(model, overrides)
        oracle = load_dataset("gmm2d", preset=cfg.preset, n=cfg.n).oracle  # exact E[x0 | x]: nothing to train
        return LoadedModel(oracle, self.hash_config(cfg), "gmm2d", (2,), dataset_opts={"preset": cfg.preset, "n": cfg.n})

    def claims(self) -> list[Claim]:
        def check(df) -> ClaimResult:
            d = ok_rows(df, reproduction=self.name)
            if d is None or len(d) == 0:
                return ClaimResult("not run", "", "no toy_gmm records")
            d = d.assign(sw=d["metrics"].map(lambda m: m.get("sliced_wasserstein") if isinstance(m, dict) else None))
            heun, euler = (fid_seeds(d, "sw", sampler=s, steps=10) for s in ("heun", "euler"))
            return ClaimResult.of(beats(heun, euler, what="sliced W2", names=("Heun", "Euler"), fmt=".3f"))

        return [Claim("toy-heun-beats-euler",
                      "Heun at 10 steps has a lower sliced Wasserstein distance to the data than Euler at 10 steps "
                      "(one-sided 95% test over sampling seeds)", "none (an example)", check, kind="sanity")]


register(ToyGMM())
