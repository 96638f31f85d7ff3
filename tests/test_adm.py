"""ADM: classifier guidance and classifier-free guidance as denoiser wrappers, against exact oracles.

The Gaussian mixture with K components is a K-class problem with exact class posteriors, so the
guided denoiser with s = 1 must equal the exact class-conditional denoiser (the component's posterior
mean), and CFG with weight w must equal classifier guidance with s = 1 + w.
"""
import math

import pandas as pd

import pytest
import torch

from bench_core.denoiser import DiscreteVPEpsDenoiser, GMMDenoiser, NFECounter, expand_sigma
from bench_core.methods.guidance import ClassifierFreeGuidance, ClassifierGuidance, balanced_labels
from bench_core.nets.classifier import ClassifierConfig, NoisyClassifier, noisy_classifier_loss
from bench_core.nets.unet import DIGITS_SMALL, UNet
from bench_core.schedules import alphas_cumprod, linear_betas

MEANS = [[2.0, 0.0], [-1.0, 1.5], [0.0, -2.5]]
STDS = [0.3, 0.6, 0.45]
WEIGHTS = [0.5, 0.3, 0.2]


@pytest.fixture
def gmm():
    return GMMDenoiser(WEIGHTS, MEANS, STDS)


def exact_log_posterior(x, sigma):
    """log p(y | x, sigma) of the mixture, written out here (independent of GMMDenoiser)."""
    w = torch.tensor(WEIGHTS, dtype=torch.float64)
    mu = torch.tensor(MEANS, dtype=torch.float64)
    var = torch.tensor(STDS, dtype=torch.float64) ** 2 + expand_sigma(sigma, x).double()[:, None] ** 2  # (B, K)
    d2 = ((x.double()[:, None, :] - mu[None]) ** 2).sum(-1)
    logp = w.log()[None] - 0.5 * d2 / var - 0.5 * 2 * torch.log(2 * math.pi * var)
    return torch.log_softmax(logp, dim=1)


def component_denoiser(x, sigma, y):
    """E[x0 | x, y]: the posterior mean of component y, mu_y + s_y^2 / (s_y^2 + sigma^2) (x - mu_y)."""
    mu = torch.tensor(MEANS, dtype=torch.float64)[y]
    v0 = torch.tensor(STDS, dtype=torch.float64)[y] ** 2
    s2 = expand_sigma(sigma, x).double() ** 2
    return mu + (v0 / (v0 + s2))[:, None] * (x.double() - mu)


class ConditionalGMM:
    """Exact conditional denoiser D(x | y), with the null label K meaning the unconditional mixture."""

    def __init__(self, gmm, K):
        self.gmm, self.K = gmm, K
        self.sigma_min, self.sigma_max = gmm.sigma_min, gmm.sigma_max
        self.batch_sizes = []

    def __call__(self, x, sigma, y=None):
        self.batch_sizes.append(x.shape[0])
        sigma = expand_sigma(sigma, x)
        out = self.gmm(x, sigma).double()
        cond = y != self.K
        if cond.any():
            out[cond] = component_denoiser(x[cond], sigma[cond], y[cond])
        return out


def _points(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    sigma = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(0.05), math.log(5.0), generator=g))
    y = torch.randint(0, 3, (n,), generator=g)
    return x + sigma[:, None] * 0, sigma, y


def test_guided_gmm_with_scale_one_is_the_exact_class_conditional_denoiser(gmm):
    x, sigma, y = _points()
    guided = ClassifierGuidance(gmm, exact_log_posterior, scale=1.0)
    out = guided(x, sigma, y=y)
    torch.testing.assert_close(out.double(), component_denoiser(x, sigma, y), rtol=1e-8, atol=1e-8)
    assert guided.grad_evals == 1


def test_guidance_is_linear_in_the_scale_and_scale_zero_skips_the_classifier(gmm):
    x, sigma, y = _points(seed=1)
    d = gmm(x, sigma)
    d1 = ClassifierGuidance(gmm, exact_log_posterior, 1.0)(x, sigma, y=y)
    g3 = ClassifierGuidance(gmm, exact_log_posterior, 3.0)
    torch.testing.assert_close(g3(x, sigma, y=y), d + 3.0 * (d1 - d), rtol=1e-8, atol=1e-8)
    g0 = ClassifierGuidance(gmm, exact_log_posterior, 0.0)
    torch.testing.assert_close(g0(x, sigma, y=y), d)
    assert g0.grad_evals == 0
    torch.testing.assert_close(g3(x, sigma), d)  # no label: unguided


def test_denoiser_form_equals_adm_epsilon_form_on_the_vp_adapter():
    """D + s sigma^2 grad_x log p equals ADM Alg. 2: eps_hat = eps - s sqrt(1 - abar) grad_{x_t} log p."""
    torch.manual_seed(0)
    net = UNet(DIGITS_SMALL.replace(dropout=0.0)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the output conv is zero-initialised: make eps non-trivial
    abar = alphas_cumprod(linear_betas(1000, 1e-4, 0.02)).double()
    den = DiscreteVPEpsDenoiser(net, abar).double()
    clf = NoisyClassifier(ClassifierConfig(ch=8)).double()
    s_scale = 2.5
    t = torch.tensor([10, 250, 600, 999])
    a = abar[t]
    sigma = ((1 - a) / a).sqrt()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64) * (1 + sigma.reshape(-1, 1, 1, 1))
    y = torch.tensor([0, 3, 7, 9])
    ours = ClassifierGuidance(den, clf, s_scale)(x, sigma, y=y)
    # ADM, in VP coordinates
    x_t = (a.sqrt().reshape(-1, 1, 1, 1) * x).requires_grad_(True)
    logp = torch.log_softmax(clf(x_t / a.sqrt().reshape(-1, 1, 1, 1), sigma), -1).gather(1, y[:, None]).sum()
    (grad_xt,) = torch.autograd.grad(logp, x_t)
    with torch.no_grad():
        eps = net(x_t, t.double())
        eps_hat = eps - s_scale * (1 - a).sqrt().reshape(-1, 1, 1, 1) * grad_xt
        x0_hat = (x_t - (1 - a).sqrt().reshape(-1, 1, 1, 1) * eps_hat) / a.sqrt().reshape(-1, 1, 1, 1)
    # (the adapter maps sigma -> t through float32 log-sigmas: t is integer only to ~1e-6)
    torch.testing.assert_close(ours, x0_hat, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert (ours - den(x, sigma)).abs().max() > 1e-2  # the guidance term is not negligible


def test_cfg_weight_zero_is_the_conditional_denoiser_and_one_nfe_per_doubled_batch(gmm):
    x, sigma, y = _points(seed=2)
    inner = ConditionalGMM(gmm, 3)
    cfg0 = ClassifierFreeGuidance(inner, 0.0, null_label=3)
    torch.testing.assert_close(cfg0(x, sigma, y=y), component_denoiser(x, sigma, y))
    inner.batch_sizes.clear()
    counter = NFECounter(ClassifierFreeGuidance(inner, 2.0, null_label=3))
    counter(x, sigma, y=y)
    assert counter.count == 1 and inner.batch_sizes == [2 * len(x)]  # one call on the doubled batch
    torch.testing.assert_close(counter(x, sigma), gmm(x, sigma).double())  # y=None: unconditional


@pytest.mark.parametrize("w", [0.5, 3.0])
def test_cfg_equals_classifier_guidance_with_scale_one_plus_w_on_exact_denoisers(gmm, w):
    x, sigma, y = _points(seed=3)
    cfg = ClassifierFreeGuidance(ConditionalGMM(gmm, 3), w, null_label=3)(x, sigma, y=y)
    cg = ClassifierGuidance(gmm, exact_log_posterior, 1.0 + w)(x, sigma, y=y)
    torch.testing.assert_close(cfg.double(), cg.double(), rtol=1e-8, atol=1e-8)


def _run(sampler, steps, scale, batch_size, tmp_path, sampler_opts=None, grid=None):
    from bench_core.data import load_gmm2d
    from bench_core.runner import Evaluator, run_one
    from bench_core.suite import Run
    from reproductions import LoadedModel

    ds = load_gmm2d("ring8", n=2000)
    oracle = ds.oracle

    def clf(x, sigma):  # exact log posterior of the ring's components
        _, _, logp = oracle._responsibilities(x, sigma)
        return logp

    den = ClassifierGuidance(oracle, clf, scale)
    lm = LoadedModel(den, "test", "gmm2d", (2,), dataset_opts={"preset": "ring8", "n": 2000},
                     batch_cond=lambda idx: {"y": balanced_labels(idx, 8)})
    run = Run(suite="t", entry="e", reproduction="adm", model="m", model_overrides={}, sampler=sampler,
              sampler_opts=sampler_opts or {}, grid=grid or {"kind": "karras"}, steps=steps, seed=0, num_samples=32,
              batch_size=batch_size)
    rec = run_one(run, lm, Evaluator(tmp_path, None), torch.device("cpu"))
    return rec, den


def test_harness_counts_classifier_gradients_apart_from_nfe(tmp_path):
    rec, den = _run("heun", 5, 2.0, 16, tmp_path)
    assert rec.status == "ok"
    assert rec.nfe == 2 * 5 - 1           # Heun: the last step is Euler
    assert rec.grad_evals == rec.nfe      # one classifier gradient per denoiser call, not counted as NFE
    rec0, _ = _run("heun", 5, 0.0, 16, tmp_path)
    assert rec0.grad_evals == 0 and rec0.nfe == 9


def test_requested_labels_follow_the_sample_index_not_the_batch(tmp_path):
    from bench_core.records import decode_preview

    a, _ = _run("ddim", 10, 4.0, 32, tmp_path, sampler_opts={"eta": 0.0}, grid={"kind": "karras"})
    b, _ = _run("ddim", 10, 4.0, 8, tmp_path, sampler_opts={"eta": 0.0}, grid={"kind": "karras"})
    pa, pb = decode_preview(a.preview), decode_preview(b.preview)
    assert abs(pa - pb).max() < 1e-2  # float16 previews
    # strongly guided samples sit on the requested component: ring mode (index mod 8)
    pts = torch.tensor(pa.astype("float32"))
    ang = torch.atan2(pts[:, 1], pts[:, 0])
    mode = torch.round(ang / (2 * math.pi / 8)).long() % 8
    assert (mode == balanced_labels(torch.arange(len(pa)), 8)).float().mean() >= 0.9


def test_noisy_classifier_shapes_and_loss():
    cfg = ClassifierConfig(ch=8)
    net = NoisyClassifier(cfg)
    x = torch.randn(5, 1, 8, 8)
    assert net(x, torch.full((5,), 3.0)).shape == (5, 10)
    assert net(x, 0.5).shape == (5, 10)
    sig = ((1 - alphas_cumprod(linear_betas(1000, 1e-4, 0.02))) / alphas_cumprod(linear_betas(1000, 1e-4, 0.02))).sqrt()
    loss = noisy_classifier_loss(sig.float())(net, x, torch.arange(5), torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert abs(float(loss.detach()) - math.log(10)) < 1.0  # near chance at init
    with pytest.raises(ValueError):
        ClassifierConfig(resolution=7, ch_mult=(1, 2))


def test_config_validation_errors():
    import reproductions
    from bench_core.suite import SuiteError, parse_suite

    adm = reproductions.get("adm")
    assert adm.override_errors("guided", {"scale": -1.0})
    # (the base model's validation, for every reproduction built on a ddpm preset: tests/test_base_model.py)
    assert adm.override_errors("guided", {"scael": 1.0})
    assert adm.override_errors("cfg", {"p_uncond": 1.5})
    assert adm.override_errors("nope", {})
    assert adm.override_errors("guided", {"scale": 2.0}) == []
    # the guided model's hash depends on the scale; the ablation baseline is the ddpm digits model
    assert adm.model_hash("guided", {"scale": 1.0}) != adm.model_hash("guided", {"scale": 2.0})
    assert adm.model_hash("unet-ddpm", {}) == reproductions.get("ddpm").model_hash("digits", {})
    with pytest.raises(SuiteError) as e:
        parse_suite({"name": "x", "entries": [
            {"name": "a", "reproduction": "adm", "model": "guided", "model_overrides": {"scale": -2.0},
             "sampler": "ddim", "steps": 5},
            {"name": "b", "reproduction": "adm", "model": "cfg", "model_overrides": {"guidance_weight": "big"},
             "sampler": "ddim", "steps": 5}]})
    assert len(e.value.problems) == 2
    with pytest.raises(ValueError):
        ClassifierGuidance(GMMDenoiser(WEIGHTS, MEANS, STDS), exact_log_posterior, -1.0)


# --- claims on synthetic records --------------------------------------------------------------------------
SEEDS = (0, 1, 2)


def _guided_records(series: dict) -> "pd.DataFrame":
    """series: scale -> {metric: [value per sampling seed]} (metrics fid, precision, recall, class_accuracy)."""
    rows = []
    for s, m in series.items():
        for i, seed in enumerate(SEEDS):
            rows.append({"status": "ok", "reproduction": "adm", "model": "guided", "sampler": "ddim",
                         "sampler_opts": {"eta": 1.0}, "steps": 20, "grid": {"kind": "quadratic"}, "num_samples": 500,
                         "fid_extractor": "e", "seed": seed, "train_seed": 0, "nfe": 20.0,
                         "grad_evals": 20.0 if s else 0.0, "samples_per_sec": 100.0,
                         "fid": m.get("fid", [5.0] * 3)[i], "precision": m.get("precision", [0.8] * 3)[i],
                         "recall": m.get("recall", [0.8] * 3)[i],
                         "metrics": {"guidance_scale": s, "class_accuracy": m.get("class_accuracy", [0.5] * 3)[i]}})
    return pd.DataFrame(rows)


def _claim(cid):
    import reproductions

    return next(c for c in reproductions.get("adm").claims() if c.id == cid)


# paired differences (largest scale minus scale 0) per seed; by hand, one-sided t(0.95, 2) = 2.920:
# [0.10, 0.12, 0.08]: mean 0.10, sem 0.0115, bounds [0.066, 0.134] -> pass
# [0.05, -0.04, 0.02]: mean 0.01, sem 0.0265, bounds [-0.067, 0.087] -> inconclusive
# [-0.10, -0.12, -0.08]: bounds [-0.134, -0.066] -> fail
DIFFS = {"pass": [0.10, 0.12, 0.08], "inconclusive": [0.05, -0.04, 0.02], "fail": [-0.10, -0.12, -0.08]}


@pytest.mark.parametrize("expected", list(DIFFS))
@pytest.mark.parametrize("cid,col,rises", [("adm-guidance-precision", "precision", True),
                                           ("adm-guidance-class-accuracy", "class_accuracy", True),
                                           ("adm-guidance-recall", "recall", False)])
def test_end_to_end_claims_decide_by_paired_seeds(cid, col, rises, expected):
    base = [0.50, 0.60, 0.55]
    top = [b + (d if rises else -d) for b, d in zip(base, DIFFS[expected])]
    df = _guided_records({0.0: {col: base}, 1.0: {col: [0.5] * 3}, 8.0: {col: top}})
    res = _claim(cid).check(df)
    assert res.status == expected, res
    assert (res.why == "") == (expected == "pass")
    assert "s=8" in res.ours and "s=0" in res.ours


def test_end_to_end_claims_need_scale_zero():
    res = _claim("adm-guidance-precision").check(_guided_records({1.0: {}, 4.0: {}}))
    assert res.status == "not run" and "scale 0" in res.why


def _fid_sweep(mid_by_seed, ends=(8.0, 10.0)):
    """FID at scales 0, 1, 2, 4, 8: ends fixed per seed (+ a seed offset), the three middle scales given."""
    off = [0.0, 0.3, -0.2]
    series = {0.0: {"fid": [ends[0] + o for o in off]}, 8.0: {"fid": [ends[1] + o for o in off]}}
    for s, v in zip((1.0, 2.0, 4.0), mid_by_seed):
        series[s] = {"fid": v}
    return _guided_records(series)


def test_u_shape_pass_inconclusive_fail():
    check = _claim("adm-fid-u-shape").check
    off = [0.0, 0.3, -0.2]
    # s=2 is 4 below both ends on every seed (paired differences 4.0, 4.1, 3.9): pass
    deep = [[7.0 + o for o in off], [4.0 + o + e for o, e in zip(off, (0.0, -0.1, 0.1))], [7.5 + o for o in off]]
    assert check(_fid_sweep(deep)).status == "pass"
    # flat within the noise: inconclusive
    noisy = [[8.0 + e for e in (1.0, -1.2, 0.4)], [8.5 + e for e in (-0.9, 1.1, 0.2)], [9.0 + e for e in (0.8, -0.7, -0.4)]]
    res = check(_fid_sweep(noisy))
    assert res.status == "inconclusive" and res.why
    # FID falls monotonically: every middle scale is significantly worse than the largest (FID 4): fail
    mono = [[9.0 + o for o in off], [8.0 + o for o in off], [7.0 + o for o in off]]
    res = check(_fid_sweep(mono, ends=(10.0, 4.0)))
    assert res.status == "fail" and res.why
    assert check(_guided_records({0.0: {}, 1.0: {}})).status == "not run"


def test_u_shape_corrects_for_choosing_the_best_of_the_middle_scales():
    """Paired differences [0.6, 1.0, 1.4] against both ends: mean 1.0, sem 0.231.  At one-sided 95% (t = 2.920) the
    lower bound is +0.33 (a pass for a single pre-chosen scale), at 1 - 0.05/3 (t(0.9833, 2) = 5.64, scipy) it is
    -0.30: with three middle scales to choose from, inconclusive."""
    from scipy import stats

    assert 1.0 - stats.t.ppf(0.95, 2) * 0.4 / 3 ** 0.5 > 0 > 1.0 - stats.t.ppf(1 - 0.05 / 3, 2) * 0.4 / 3 ** 0.5
    off = [0.0, 0.3, -0.2]
    best = [8.0 + o - d for o, d in zip(off, (0.6, 1.0, 1.4))]
    far = [[12.0 + o for o in off]] * 2
    res = _claim("adm-fid-u-shape").check(_fid_sweep([far[0], best, far[1]], ends=(8.0, 8.0)))
    assert res.status == "inconclusive", res


def _ablation_records(fid_adm, fid_ddpm, train_seeds=(0,)):
    import pandas as pd

    rows = []
    for model, fids in (("unet-adm", fid_adm), ("unet-ddpm", fid_ddpm)):
        for j, ts in enumerate(train_seeds):
            for i, seed in enumerate(SEEDS):
                rows.append({"status": "ok", "reproduction": "adm", "model": model, "sampler": "ddim",
                             "sampler_opts": {"eta": 1.0}, "steps": 20, "grid": {"kind": "quadratic"},
                             "num_samples": 500, "fid_extractor": "e", "seed": seed, "train_seed": ts,
                             "fid": fids[j][i], "precision": 0.8, "recall": 0.8, "samples_per_sec": 1.0,
                             "metrics": {"params": 1}})
    return pd.DataFrame(rows)


def test_architecture_claim():
    import pandas as pd

    check = _claim("adm-architecture").check
    res = check(pd.DataFrame())
    assert res.status == "not run" and "adm_ldm.yaml" in res.why
    ddpm = [[6.0, 6.4, 5.8]]
    # one training seed: the improvement must clear the 0.5 retraining spread
    assert check(_ablation_records([[5.0, 5.3, 4.9]], ddpm)).status == "pass"         # 1.0 better, tight
    res = check(_ablation_records([[5.7, 6.1, 5.5]], ddpm))                              # 0.3 better, tight
    assert res.status == "inconclusive" and "retraining" in res.why
    assert check(_ablation_records([[7.0, 7.4, 6.8]], ddpm)).status == "fail"          # 1.0 worse
    # two training seeds: Welch over the training seeds' means, margin 0
    two = dict(train_seeds=(0, 1))
    assert check(_ablation_records([[5.0] * 3, [5.2] * 3], [[6.0] * 3, [6.1] * 3], **two)).status == "pass"
    assert check(_ablation_records([[5.0] * 3, [7.0] * 3], [[6.0] * 3, [6.1] * 3], **two)).status == "inconclusive"


def test_claim_kinds_and_tables():
    import reproductions

    adm = reproductions.get("adm")
    kinds = {c.id: c.kind for c in adm.claims()}
    assert kinds == {"adm-guidance-precision": "paper", "adm-guidance-class-accuracy": "sanity",
                     "adm-guidance-recall": "paper", "adm-fid-u-shape": "paper", "adm-architecture": "paper"}
    import pandas as pd

    assert {c.check(pd.DataFrame()).status for c in adm.claims()} == {"not run"}
    df = _guided_records({0.0: {}, 1.0: {}, 4.0: {}})
    (title, table), = adm.tables(df).items()
    assert "unconditional" in title and list(table["FID"]) == ["5.00 ± 0.00 (n=3)"] * 3


def test_seeded_init_makes_the_classifier_reproducible():
    from bench_core.train import seeded_init

    a = seeded_init(lambda: NoisyClassifier(ClassifierConfig(ch=8)), 3)
    b = seeded_init(lambda: NoisyClassifier(ClassifierConfig(ch=8)), 3)
    c = seeded_init(lambda: NoisyClassifier(ClassifierConfig(ch=8)), 4)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
