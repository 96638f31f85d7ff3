"""Speed options of the shared U-Net (Chen et al. 2023): every option computes the reference function.

The reference is the network with naive (materialised-softmax) attention, unfused GroupNorm and SiLU,
fp32, contiguous memory, eager execution.  Each option must give the reference's output within
``bench_core.methods.accel.tolerance`` (relative to the output's largest magnitude): 1e-5 for fp32 options,
5e-2 for bfloat16.  CUDA-only options are tested when a GPU is present (TF32 off there; fp32 is held
to 1e-4 because cuDNN's autotuner may pick FFT / Winograd convolutions).  No timings are asserted here: speed lives in
benchmarks/speed_ablation.py.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench_core.methods.accel import (
    AccelOptions, CUDAGraphDenoiser, CUDAGraphed, CUDAGraphSampler, ablation_options, accelerated_denoiser, apply,
    host_sync_check, random_weights_, relative_error, tolerance,
)
from bench_core.nets import unet as unet_mod
from bench_core.nets import norm_act as norm_act_mod
from bench_core.nets.unet import DIGITS_SMALL, UNet, UNetConfig, chunked_attention
from bench_core.samplers import get_sampler, sample_ddim, sample_euler
from bench_core.schedules import alphas_cumprod, discrete_grid, linear_betas

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA-only speed option: needs a GPU")

# Small, but with every code path: attention at 8x8 (L = 64) and in the 4x4 middle (L = 16), two heads,
# AdaGN (scale-shift) and resblock up/down on a second config.  Two channel widths only (16, and 32 at the
# decoder's concatenations), so the fused GroupNorm+SiLU compiles few kernels.
SMALL = UNetConfig(in_channels=3, resolution=8, ch=16, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(8,),
                   num_heads=2, norm_groups=4, dropout=0.0)
SMALL_ADM = SMALL.replace(scale_shift_norm=True, resblock_updown=True)


def naive_attention(q, k, v):
    """The textbook softmax(q k^T / sqrt(d)) v, in float64: the independent reference."""
    q, k, v = q.double(), k.double(), v.double()
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


def _net(cfg, seed=0):
    return random_weights_(UNet(cfg), seed).eval()


def _inputs(cfg, batch=3, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.resolution, cfg.resolution, generator=g)
    t = torch.tensor([2.0, 410.5, 999.0][:batch])
    return x.to(device), t.to(device)


# --------------------------------------------------------------------------------------------
# Chunked attention
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("L,chunk", [(64, 16), (64, 64), (37, 5), (37, 1), (37, 100), (50, 7)])
def test_chunked_attention_equals_naive(L, chunk):
    """Chunk sizes that divide L, that do not, of one row, and larger than L."""
    g = torch.Generator().manual_seed(L * 100 + chunk)
    q, k, v = (torch.randn(2, 3, L, 8, generator=g) * 2 for _ in range(3))
    ref = naive_attention(q, k, v)
    out = chunked_attention(q, k, v, chunk)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert (out.double() - ref).abs().max() / ref.abs().max() < 2e-6  # fp32 rounding only


def test_chunked_attention_value_width_and_gradient():
    """v may be wider than q/k; gradients match the naive formula's."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 20, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 2, 20, 6, generator=g, dtype=torch.float64, requires_grad=True)
    out = chunked_attention(q, k, v, 7)
    torch.testing.assert_close(out, naive_attention(q, k, v))
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = torch.autograd.grad(naive_attention(q, k, v).square().sum(), (q, k, v))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)


def test_chunked_attention_bf16_close():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 40, 16, generator=g) for _ in range(3))
    out = chunked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 9)
    assert out.dtype == torch.bfloat16
    ref = naive_attention(q, k, v)
    assert (out.double() - ref).abs().max() / ref.abs().max() < 2e-2


@pytest.mark.parametrize("chunk", [16, 10, 1000])
def test_unet_chunked_attention_matches_naive(chunk):
    net = _net(SMALL)
    x, t = _inputs(SMALL)
    with torch.no_grad():
        ref = net.set_attn_impl("naive")(x, t)
        out = net.set_attn_impl("chunked", chunk=chunk)(x, t)
    assert net.cfg.attn_impl == "chunked"
    assert all(m.chunk == chunk for m in net.modules() if isinstance(m, unet_mod.AttnBlock))
    assert relative_error(out, ref) < 1e-5


def test_bad_attention_settings_rejected():
    net = UNet(SMALL)
    with pytest.raises(ValueError):
        net.set_attn_impl("flash")
    with pytest.raises(ValueError):
        net.set_attn_impl("chunked", chunk=0)
    with pytest.raises(ValueError):
        AccelOptions(attn="flash")
    with pytest.raises(ValueError):
        AccelOptions(dtype="int8")


# --------------------------------------------------------------------------------------------
# Every option that runs on CPU, alone and all together
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [SMALL, SMALL_ADM], ids=["ddpm", "adm"])
def test_cpu_options_equal_reference(cfg):
    net = _net(cfg)
    x, t = _inputs(cfg)
    with torch.no_grad():
        ref = net.set_attn_impl("naive")(x, t)
        sets = ablation_options("cpu", attn_chunk=24)
        assert set(sets) == {"baseline", "attn_chunked", "attn_sdpa", "fused_norm_act", "channels_last", "bf16", "all"}
        for name, opts in sets.items():
            if opts.fused_norm_act and not cfg.scale_shift_norm:
                continue  # compiled sets once, on the ADM config (it runs both the plain and the AdaGN norm path)
            out = apply(net, opts)(x, t)
            assert out.dtype == x.dtype and out.shape == x.shape and out.is_contiguous()
            err = relative_error(out, ref)
            assert err <= tolerance(opts, "cpu"), f"{name}: relative error {err:.2e} > {tolerance(opts, 'cpu'):.0e}"
            if opts.dtype == "float32":
                assert tolerance(opts, "cpu") == 1e-5
            else:
                assert err > 0  # it really ran in half precision


def test_fused_norm_act_replaces_every_norm_silu_pair():
    """With the switch on, every norm_act site goes through the fused function (and only those)."""
    net = _net(SMALL_ADM).set_fused_norm_act(True)
    calls = []
    orig = norm_act_mod._fused_norm_act_fn

    def spy():
        fn = orig()

        def wrapped(x, *a):
            calls.append(tuple(x.shape))
            return fn(x, *a)
        return wrapped

    x, t = _inputs(SMALL_ADM, batch=2)
    norm_act_mod._fused_norm_act_fn, saved = spy, norm_act_mod._fused_norm_act_fn
    try:
        with torch.no_grad():
            net(x, t)
    finally:
        norm_act_mod._fused_norm_act_fn = saved
    n_res = sum(isinstance(m, unet_mod.ResBlock) for m in net.modules())
    assert len(calls) == 2 * n_res + 1  # norm1 and norm2 of each residual block, plus norm_out


def test_fused_norm_act_eager_fallback(monkeypatch):
    """Without a compiler backend the option warns and runs the same math unfused."""
    monkeypatch.setattr(norm_act_mod, "_FUSED_NORM_ACT", {"fn": None, "backend": ""})

    def broken_compile(*a, **k):
        raise RuntimeError("no backend")

    monkeypatch.setattr(torch, "compile", broken_compile)
    net = _net(SMALL)
    x, t = _inputs(SMALL)
    with torch.no_grad():
        ref = net(x, t)
        with pytest.warns(UserWarning, match="unfused"):
            out = apply(net, AccelOptions(fused_norm_act=True))(x, t)
    assert norm_act_mod.fused_norm_act_backend() == "eager-fallback"
    assert relative_error(out, ref) < 1e-6


def test_apply_leaves_network_and_state_dict_unchanged():
    net = _net(SMALL)
    net.set_attn_impl("sdpa")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    acc = apply(net, ablation_options("cpu")["all"])
    # the original: same values, dtypes and runtime switches
    after = net.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k])
    assert net.cfg.attn_impl == "sdpa" and not net.fused_norm_act
    # the accelerated copy: same keys and shapes, and a cached fp32 checkpoint loads into it
    sd = acc.net.state_dict()
    assert list(sd) == list(before) and all(sd[k].shape == before[k].shape for k in before)
    assert all(v.dtype == torch.bfloat16 for v in sd.values() if v.is_floating_point())
    acc.net.load_state_dict(before, strict=True)
    # options are runtime-only: the architecture hash does not see them
    assert UNetConfig(attn_impl="chunked").arch_dict() == UNetConfig().arch_dict()


def test_options_label_and_device_checks():
    assert AccelOptions().label() == "baseline"
    assert AccelOptions(attn="sdpa", dtype="bfloat16").label() == "attn=sdpa+dtype=bfloat16"
    assert AccelOptions(attn="chunked", attn_chunk=256).label() == "attn=chunked+attn_chunk=256"
    assert AccelOptions(fused_norm_act=True).changes() == {"fused_norm_act": True}
    assert AccelOptions(fused_norm_act=True, norm_act_kernel="triton").label() == "fused_norm_act+norm_act_kernel=triton"
    assert AccelOptions(norm_act_kernel="triton").changes() == {}  # the kernel choice alone changes nothing
    assert AccelOptions(compile=True).label() == "compile"
    with pytest.raises(ValueError, match="norm_act_kernel"):
        AccelOptions(norm_act_kernel="cuda")
    with pytest.raises(ValueError, match="fused GroupNorm"):
        UNet(SMALL).set_fused_norm_act("bogus")
    for opts in (AccelOptions(cuda_graph=True), AccelOptions(conv_benchmark=True)):
        with pytest.raises(RuntimeError, match="CUDA"):
            opts.check_device("cpu")
        with pytest.raises(RuntimeError, match="CUDA"):
            accelerated_denoiser(UNet(DIGITS_SMALL), opts, alphas_cumprod(linear_betas(1000)), device="cpu")
    assert tolerance(AccelOptions(dtype="bfloat16")) > tolerance(AccelOptions(dtype="float16")) > tolerance(AccelOptions())


@pytest.mark.skipif(CUDA, reason="checks the CPU message; on a GPU the CUDA tests below run instead")
def test_cuda_graph_on_cpu_raises_clearly():
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        CUDAGraphed(lambda x: x)


def test_accelerated_denoiser_samples_like_reference():
    """A 4-step Euler sample through the accelerated denoiser (all CPU options, fp32) equals the reference's."""
    abar = alphas_cumprod(linear_betas(1000))
    net = _net(DIGITS_SMALL)
    sig = discrete_grid(abar, 4, "uniform")
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * sig[0]
    fp32_all = AccelOptions(attn="chunked", attn_chunk=3, channels_last=True)
    with torch.no_grad():
        ref = sample_euler(accelerated_denoiser(net, AccelOptions(), abar), x, sig)
        out = sample_euler(accelerated_denoiser(net, fp32_all, abar), x, sig)
    assert relative_error(out, ref) < 1e-5


# --------------------------------------------------------------------------------------------
# The hand-written Triton GroupNorm+SiLU kernel, in Triton's CPU interpreter (a subprocess: Triton reads
# TRITON_INTERPRET when it is imported)
# --------------------------------------------------------------------------------------------
TRITON_CHECK = r"""
import json, torch
import torch.nn.functional as F
from bench_core.methods.accel import AccelOptions, apply, random_weights_, relative_error, tolerance
from bench_core.nets.triton_norm import group_norm_silu
from bench_core.nets.unet import UNet, UNetConfig

def by_hand(x, w, b, groups, eps, scale, shift):
    # GroupNorm from its definition in float64: per (sample, group) mean and biased variance
    x, w, b = x.double(), w.double(), b.double()
    B, C = x.shape[:2]
    xg = x.reshape(B, groups, -1)
    mu = xg.mean(-1, keepdim=True)
    var = ((xg - mu) ** 2).mean(-1, keepdim=True)
    h = ((xg - mu) / (var + eps).sqrt()).reshape(x.shape) * w.view(1, C, 1, 1) + b.view(1, C, 1, 1)
    if scale is not None:
        h = h * (1 + scale.double().view(B, C, 1, 1)) + shift.double().view(B, C, 1, 1)
    return h * torch.sigmoid(h)

out = []
g = torch.Generator().manual_seed(0)
# (shape, groups): odd sizes, and groups of 8 * 32 * 32 = 8192 elements (8 loop iterations of 1024)
for shape, groups in [((2, 12, 5, 7), 4), ((3, 64, 8, 8), 32), ((1, 16, 32, 32), 2)]:
    for channels_last in (False, True):
        for mod in (False, True):
            for dtype in (torch.float32, torch.bfloat16):
                x = (3 * torch.randn(shape, generator=g) + 1).to(dtype)
                if channels_last:
                    x = x.to(memory_format=torch.channels_last)
                C = shape[1]
                w, b = torch.randn(C, generator=g).to(dtype), torch.randn(C, generator=g).to(dtype)
                sc = torch.randn(shape[0], C, 1, 1, generator=g).to(dtype) if mod else None
                sh = torch.randn(shape[0], C, 1, 1, generator=g).to(dtype) if mod else None
                with torch.no_grad():
                    y = group_norm_silu(x, w, b, groups, 1e-6, sc, sh)
                same_layout = y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                out.append(dict(case=f"{shape}/{groups}/cl={channels_last}/mod={mod}/{dtype}", tol=tol,
                                err=relative_error(y, by_hand(x, w, b, groups, 1e-6, sc, sh)),
                                ok_meta=bool(same_layout and y.dtype == dtype)))
# the U-Net with the switch, plain and ADM (AdaGN), alone and with channels-last + bf16
base = UNetConfig(in_channels=3, resolution=8, ch=16, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(8,),
                  num_heads=2, norm_groups=4, dropout=0.0)
for cfg in (base, base.replace(scale_shift_norm=True, resblock_updown=True)):
    net = random_weights_(UNet(cfg), 0).eval()
    x = torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([2.0, 410.5, 999.0])
    with torch.no_grad():
        ref = net.set_attn_impl("naive")(x, t)
        for opts in (AccelOptions(fused_norm_act=True, norm_act_kernel="triton"),
                     AccelOptions(fused_norm_act=True, norm_act_kernel="triton", channels_last=True, dtype="bfloat16")):
            opts.check_device("cpu")  # allowed under the interpreter
            y = apply(net, opts)(x, t)
            out.append(dict(case=f"unet/adm={cfg.scale_shift_norm}/{opts.label()}", tol=tolerance(opts, "cpu"),
                            err=relative_error(y, ref), ok_meta=True))
    # training (autograd recording) runs the torch ops: gradients flow
    net.set_fused_norm_act("triton").train()
    loss = net(x, t).square().mean()
    loss.backward()
    out.append(dict(case=f"unet/adm={cfg.scale_shift_norm}/grad", tol=0.0, err=0.0,
                    ok_meta=all(p.grad is not None for p in net.parameters() if p.requires_grad)))
print(json.dumps(out))
"""


def test_triton_group_norm_silu_matches_the_definition():
    """The Triton kernel (run by Triton's interpreter on CPU) against GroupNorm + SiLU worked from their
    definitions in float64, on NCHW and channels-last, with and without AdaGN, fp32 and bf16; and inside
    the U-Net against the reference network."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", TRITON_CHECK], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == 3 * 2 * 2 * 2 + 2 * 3
    bad = [r for r in rows if not (r["err"] <= r["tol"] and r["ok_meta"])]
    assert not bad, bad
    # it really ran in reduced precision where asked (bf16 cases are not exact)
    assert all(r["err"] > 0 for r in rows if "bfloat16" in r["case"])


@pytest.mark.skipif(CUDA or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="checks the CPU message")
def test_triton_kernel_on_cpu_says_what_to_do():
    from bench_core.nets.triton_norm import group_norm_silu

    opts = AccelOptions(fused_norm_act=True, norm_act_kernel="triton")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        opts.check_device("cpu")
    x = torch.randn(1, 4, 2, 2)
    with torch.no_grad(), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        group_norm_silu(x, torch.ones(4), torch.zeros(4), 2, 1e-6)


# --------------------------------------------------------------------------------------------
# Whole-network torch.compile and the graph-captured sampling loop
# --------------------------------------------------------------------------------------------
def test_whole_network_compile_equals_reference():
    """torch.compile of the whole U-Net (inductor's C++ on CPU): the reference's output; weights untouched."""
    net = _net(SMALL)
    x, t = _inputs(SMALL)
    with torch.no_grad():
        ref = net.set_attn_impl("naive")(x, t)
        acc = apply(net, AccelOptions(compile=True, fused_norm_act=True))
        out = acc(x, t)
    assert relative_error(out, ref) <= tolerance(AccelOptions(), "cpu")
    assert not acc.net.fused_norm_act  # under compile the compiler does the fusing
    assert set(acc.state_dict()) == {f"net.{k}" for k in net.state_dict()}


def test_host_sync_check_tells_capturable_samplers():
    """Euler and DDIM (eta = 0) never read a grid value on the host; Heun's `if t_next > 0` does."""
    sig = discrete_grid(alphas_cumprod(linear_betas(1000)), 5, "uniform")
    assert host_sync_check(sample_euler, None, sig, (2, 1, 8, 8)) is None
    assert host_sync_check(sample_ddim, None, sig, (2, 1, 8, 8)) is None
    problem = host_sync_check(get_sampler("heun").fn, None, sig, (2, 1, 8, 8))
    assert problem and "meta" in problem


def test_ddim_last_step_is_the_denoised_estimate_exactly():
    """Branch-free DDIM: the step to sigma = 0 returns the last denoiser output bit for bit (eta 0 and 1)."""
    sig = discrete_grid(alphas_cumprod(linear_betas(1000)), 4, "uniform")
    assert sig[-1] == 0
    outs = []

    def den(x, s):
        outs.append(torch.tanh(x) * 0.7 + 0.01 * s.view(-1, 1, 1, 1))
        return outs[-1]

    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * sig[0]
    for eta in (0.0, 1.0):
        outs.clear()
        y = sample_ddim(den, x, sig, eta=eta, generator=torch.Generator().manual_seed(1))
        assert len(outs) == 4 and torch.equal(y, outs[-1])


@pytest.mark.skipif(CUDA, reason="checks the CPU message; on a GPU the CUDA tests below run instead")
def test_graph_sampler_on_cpu_raises_clearly():
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        CUDAGraphSampler(sample_euler, lambda x, s: x, torch.tensor([1.0, 0.0]))


# --------------------------------------------------------------------------------------------
# CUDA (run on a GPU; skipped on CPU)
# --------------------------------------------------------------------------------------------
@pytest.fixture
def no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@needs_cuda
@pytest.mark.parametrize("cfg", [SMALL, SMALL_ADM], ids=["ddpm", "adm"])
def test_cuda_options_equal_reference(cfg, no_tf32):
    net = _net(cfg).cuda()
    x, t = _inputs(cfg, device="cuda")
    with torch.no_grad():
        ref = net.set_attn_impl("naive")(x, t)
        sets = ablation_options("cuda", attn_chunk=24)
        assert {"conv_benchmark", "fp16", "cuda_graph", "fused_norm_act_triton"} <= set(sets)
        for name, opts in sets.items():
            if opts.cuda_graph:  # the graph holds a whole denoiser call: tested below
                opts = opts.replace(cuda_graph=False)
            out = apply(net, opts, device="cuda")(x, t)
            err = relative_error(out, ref)
            assert tolerance(opts, "cuda") == (1e-4 if opts.dtype == "float32" else tolerance(opts))
            assert err <= tolerance(opts, "cuda"), f"{name}: relative error {err:.2e}"


def _digits_on_cuda(steps=6, batch=16):
    """DDPM schedule, a random-weight digits U-Net, a uniform grid and x_T at its first sigma, on CUDA."""
    abar = alphas_cumprod(linear_betas(1000))
    sig = discrete_grid(abar, steps, "uniform").cuda()
    x = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0)).cuda() * sig[0]
    return abar, _net(DIGITS_SMALL), sig, x


@needs_cuda
def test_cuda_graph_denoiser_replays_the_same_function(no_tf32):
    abar, net, sig, x = _digits_on_cuda()
    with torch.no_grad():
        eager = accelerated_denoiser(net, AccelOptions(), abar, device="cuda")
        graphed = accelerated_denoiser(net, AccelOptions(cuda_graph=True), abar, device="cuda")
        assert isinstance(graphed, CUDAGraphDenoiser)
        assert graphed.sigma_max == eager.sigma_max
        ref = sample_euler(eager, x, sig)
        out = sample_euler(graphed, x, sig)
        out2 = sample_euler(graphed, x, sig)  # replays: same graph, same answer
        # a new batch size captures a second graph
        out_small = sample_euler(graphed, x[:3], sig)
    assert relative_error(out, ref) < 1e-4
    assert torch.equal(out, out2)
    assert relative_error(out_small, ref[:3]) < 1e-4
    assert len(graphed._graphed._graphs) == 2


@needs_cuda
def test_cuda_all_options_with_graph_close_to_reference():
    """bf16 + sdpa + fused GN/SiLU + cuDNN autotune + channels_last + CUDA graph, through a sampler."""
    abar = alphas_cumprod(linear_betas(1000))
    net = _net(SMALL)
    sig = discrete_grid(abar, 4, "uniform").cuda()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)).cuda() * sig[0]
    opts = ablation_options("cuda")["all"]
    assert opts.cuda_graph and opts.dtype == "bfloat16"
    with torch.no_grad():
        ref = sample_euler(accelerated_denoiser(net, AccelOptions(), abar, device="cuda"), x, sig)
        out = sample_euler(accelerated_denoiser(net, opts, abar, device="cuda"), x, sig)
    assert relative_error(out, ref) < tolerance(opts, "cuda")


# --- the speed reproduction's suite models: a trained ddpm checkpoint under options ----------------------------
def test_speed_models_share_the_ddpm_checkpoint_and_validate_options(tmp_path):
    import reproductions
    from reproductions.ddpm import DDPM_REPRO

    rep = reproductions.get("speed")
    tiny = {"train": {"steps": 3, "warmup": 1, "batch_size": 8}}
    ov = {"base_overrides": tiny}
    # (same weights as the ddpm model, and the base model's validation: tests/test_base_model.py)
    assert rep.override_errors("ddpm-digits-fast", {"options": {"attn": "bogus"}})
    assert not rep.override_errors("ddpm-digits-fast", {"options": {"dtype": "float32"}, **ov})
    # the accelerated denoiser computes the fp32 denoiser's function (bf16 tolerance), and records its dtype
    cache = tmp_path / "ckpt"
    fast = rep.load_model("ddpm-digits-fast", ov, device="cpu", cache_dir=cache, progress=False)
    ref = DDPM_REPRO.load_model("digits", tiny, device="cpu", cache_dir=cache, progress=False)
    assert ref.train_sec is None  # trained once, by the first load
    assert fast.dtype == "bfloat16" and fast.model_metrics["speed_options"] == "attn=sdpa+dtype=bfloat16"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g) * 3
    sigma = torch.tensor([0.1, 1.0, 3.0, 20.0])
    with torch.no_grad():
        a, b = fast.denoiser(x, sigma), ref.denoiser(x, sigma)
    assert a.dtype == torch.float32
    assert relative_error(a, b) < tolerance(AccelOptions(dtype="bfloat16"))


@needs_cuda
def test_cuda_graph_sampler_replays_the_whole_loop(no_tf32):
    """Euler and DDIM captured as one graph each equal their eager runs; Heun is refused with the reason."""
    abar, net, sig, x = _digits_on_cuda()
    with torch.no_grad():
        den = accelerated_denoiser(net, AccelOptions(attn="sdpa"), abar, device="cuda")
        for fn in (sample_euler, sample_ddim):
            loop = CUDAGraphSampler(fn, den, sig)
            ref = fn(den, x, sig)
            out, out2 = loop(x), loop(x)
            assert relative_error(out, ref) < 1e-4
            assert torch.equal(out, out2)
        with pytest.raises(RuntimeError, match="cannot be captured"):
            CUDAGraphSampler(get_sampler("heun").fn, den, sig)(x)


# --- claims on synthetic records ---------------------------------------------------------------------------
def _df(recs):
    from bench_core.report.leaderboard import records_df

    return records_df(recs)


def _abl(set_name, times_ms, *, network="sd15_shaped", batch=1, dev="gpu0", device="cuda", peak=None, err=0.0,
         tol=1e-4, kind="ablation", **extra):
    """One speed_ablation.py-style record: per-call timings (ms) in metrics.sec_per_call_all."""
    from dataclasses import asdict
    from statistics import median

    from bench_core.records import Record

    m = {"kind": kind, "network": network, "option_set": set_name, "sec_per_call": median(times_ms) / 1e3,
         "sec_per_call_all": [t / 1e3 for t in times_ms], "rel_err": err, "tolerance": tol,
         "equal_within_tol": err <= tol, **extra}
    return asdict(Record(suite="speed-ablation", entry=f"{network}/b{batch}/{set_name}", reproduction="speed",
                         model=network, model_hash="h", dataset="random-inputs", sampler="euler", steps=20, nfe=20.0,
                         num_samples=batch, batch_size=batch, seed=0, device=device, device_name=dev,
                         peak_mem_mb=peak, timing_repeats=len(times_ms), metrics=m, status="ok",
                         timestamp="2026-01-01T00:00:00+0000"))


def _speed_claim(cid):
    import reproductions

    return next(c for c in reproductions.get("speed").claims() if c.id == cid)


BASE = [10.0, 10.2, 9.9, 10.1, 10.0]            # ms per call, sd 0.11
FASTER = [8.0, 8.1, 7.9, 8.2, 8.0]              # 2 ms faster: Welch bounds far above 0 -> pass
SAME = [10.4, 9.6, 10.3, 9.7, 10.1]             # mean 10.02: inside the noise -> inconclusive
SLOWER = [12.0, 12.2, 11.9, 12.1, 12.0]         # 2 ms slower -> fail


@pytest.mark.parametrize("times,expected", [(FASTER, "pass"), (SAME, "inconclusive"), (SLOWER, "fail")])
def test_option_gains_per_paper_option(times, expected):
    check = _speed_claim("speed-option-gains").check
    recs = [_abl("baseline", BASE), _abl("attn_sdpa", times), _abl("attn_chunked", FASTER),
            _abl("bf16", SLOWER)]  # bf16 is beyond the paper: shown, never decides
    res = check(_df(recs))
    assert res.status == expected, res
    assert "bf16" in res.ours and "beyond the paper" in res.ours and "sd15_shaped b1" in res.ours
    assert (res.why == "") == (expected == "pass")


def test_option_gains_fall_back_from_a_single_sd_timing_to_cifar10_and_say_when_not_run():
    check = _speed_claim("speed-option-gains").check
    assert check(_df([])).status == "not run"
    assert "speed_ablation.py" in check(_df([])).why
    # the SD-shaped baseline has one timed call (CPU plan): decided on the CIFAR-10 U-Net at its smallest batch
    recs = [_abl("baseline", [100.0], dev="cpu0", device="cpu"), _abl("attn_sdpa", [50.0], dev="cpu0", device="cpu"),
            *(_abl(s, t, network="ddpm_cifar10", batch=2, dev="cpu0", device="cpu")
              for s, t in (("baseline", BASE), ("attn_sdpa", SLOWER))),
            *(_abl(s, t, network="ddpm_cifar10", batch=16, dev="cpu0", device="cpu")
              for s, t in (("baseline", BASE), ("attn_sdpa", FASTER)))]
    res = check(_df(recs))
    assert res.status == "fail" and "ddpm_cifar10 b2" in res.ours


@pytest.mark.parametrize("times,expected", [(FASTER, "pass"), (SAME, "inconclusive"), (SLOWER, "fail")])
def test_all_faster(times, expected):
    check = _speed_claim("speed-all-faster").check
    recs = [_abl("baseline", BASE, network="ddpm_cifar10"), _abl("all", times, network="ddpm_cifar10"),
            _abl("baseline", [100.0], dev="cpu0", device="cpu"), _abl("all", [500.0], dev="cpu0", device="cpu")]
    res = check(_df(recs))
    assert res.status == expected, res
    assert "one timed call, not decided" in res.ours  # the single-call CPU pair is shown, not decided


def test_options_equal_and_attention_memory():
    eq = _speed_claim("speed-options-equal").check
    assert eq(_df([_abl("baseline", BASE), _abl("bf16", BASE, err=0.01, tol=0.05)])).status == "pass"
    res = eq(_df([_abl("baseline", BASE), _abl("bf16", BASE, err=0.06, tol=0.05)]))
    assert res.status == "fail" and res.why
    mem = _speed_claim("speed-attention-memory").check
    # naive attention at 64x64 with 8 heads holds 8 * 4096^2 * 4 B = 512 MiB: the saving must exceed 256 MiB
    ok = [_abl("baseline", BASE, peak=1100.0), _abl("attn_chunked", BASE, peak=400.0), _abl("attn_sdpa", BASE, peak=150.0)]
    assert mem(_df(ok)).status == "pass"
    short = [_abl("baseline", BASE, peak=1100.0), _abl("attn_chunked", BASE, peak=900.0), _abl("attn_sdpa", BASE, peak=150.0)]
    res = mem(_df(short))
    assert res.status == "fail" and "attn_chunked" in res.why and "required > 256 MB" in res.ours
    assert mem(_df([])).status == "not run"


def test_gpu_targets_are_targets_and_not_run_without_a_gpu():
    over, diff = _speed_claim("speed-gpu-loop-overhead"), _speed_claim("speed-gpu-vs-diffusers")
    assert over.kind == diff.kind == "target"
    cpu_only = _df([_abl("baseline", BASE, dev="cpu0", device="cpu")])
    for c in (over, diff):
        res = c.check(cpu_only)
        assert res.status == "not run" and "no GPU in this run" in res.why
    # loop overhead: 20-step runs against 1.02 x the bare calls' time, per CUDA-graph variant
    bare = [10.0, 10.1, 9.9, 10.0, 10.05]

    def ovh(sample):
        return _df([_abl("cuda_graph", [1.0], network="digits_small", batch=512, kind="overhead",
                         sec_bare_all=[t / 1e3 for t in bare], sec_sample_all=[t / 1e3 for t in sample],
                         overhead_ratio=sum(sample) / sum(bare))])

    assert over.check(ovh([10.0, 10.05, 9.95, 10.0, 10.1])).status == "pass"       # ratio 1.00
    assert over.check(ovh([10.2, 10.0, 10.4, 10.1, 10.3])).status == "inconclusive"  # ratio 1.02 +- noise
    assert over.check(ovh([11.0, 11.1, 10.9, 11.0, 11.05])).status == "fail"       # ratio 1.10
    # ours vs diffusers + compile
    for times, expected in ((FASTER, "pass"), (SAME, "inconclusive"), (SLOWER, "fail")):
        recs = [_abl("diffusers_compile", BASE, network="ddpm_cifar10", batch=128, kind="diffusers"),
                _abl("ours_all", times, network="ddpm_cifar10", batch=128, kind="diffusers")]
        assert diff.check(_df(recs)).status == expected


def _trained(reproduction, dtype, fids, secs, steps=20):
    from dataclasses import asdict

    from bench_core.records import Record

    return [asdict(Record(suite="t", entry="e", reproduction=reproduction, model="m", model_hash="H", dataset="digits",
                          sampler="ddim", sampler_opts={"eta": 0.0}, grid={"kind": "uniform"}, steps=steps, nfe=20.0,
                          num_samples=500, batch_size=500, seed=seed, fid=f, sec_per_batch=t, dtype=dtype,
                          device="cpu", device_name="cpu", status="ok"))
            for seed, (f, t) in enumerate(zip(fids, secs))]


def test_trained_same_fid_is_an_equivalence_test():
    """Paired by seed, TOST at ±0.7 FID.  By hand (t(0.95, 2) = 2.920): bf16 - fp32 = [-0.05, 0.05, 0.0] -> 90%
    interval [-0.15, 0.15] inside ±0.7: pass; [0.8, -0.9, 0.3] -> sem 0.50, interval wider than ±0.7: inconclusive;
    [1.5, 1.6, 1.4] -> [1.2, 1.8], outside: fail.  Latency is shown, never deciding."""
    check = _speed_claim("speed-trained-same-fid").check
    ref = [8.0, 8.6, 7.5]
    slow = [1.0, 1.0, 1.0]
    for d, expected in (([-0.05, 0.05, 0.0], "pass"), ([0.8, -0.9, 0.3], "inconclusive"), ([1.5, 1.6, 1.4], "fail")):
        fast = [r + x for r, x in zip(ref, d)]
        res = check(_df(_trained("speed", "float32", ref, [0.5] * 3) + _trained("speed", "bfloat16", fast, slow)))
        assert res.status == expected, res
        assert "latency (not deciding)" in res.ours
    # the speed reproduction's own fp32 runs are preferred over ddim's
    res = check(_df(_trained("ddim", "float32", [20.0] * 3, [9.0] * 3) + _trained("speed", "float32", ref, [0.9] * 3)
                    + _trained("speed", "bfloat16", ref, [0.6] * 3)))
    assert res.status == "pass" and "0.90" in res.ours
    res = check(_df(_trained("ddim", "float32", ref, [0.9] * 3)))
    assert res.status == "not run" and res.why
