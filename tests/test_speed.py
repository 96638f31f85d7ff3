"""Speed options of the shared U-Net (Chen et al. 2023): every option computes the reference function.

The reference is the network with naive (materialised-softmax) attention, unfused GroupNorm and SiLU,
fp32, contiguous memory, eager execution.  Each option must give the reference's output within
``bench_core.accel.tolerance`` (relative to the output's largest magnitude): 1e-5 for fp32 options,
5e-2 for bfloat16.  CUDA-only options are tested when a GPU is present (TF32 off there; fp32 is held
to 1e-4 because cuDNN's autotuner may pick FFT / Winograd convolutions).  No timings are asserted here: speed lives in benchmarks/speed_ablation.py.
"""
import pytest
import torch

from bench_core.accel import (
    AccelOptions, CUDAGraphDenoiser, CUDAGraphed, ablation_options, accelerated_denoiser, apply,
    random_weights_, relative_error, tolerance,
)
from bench_core.nets import unet as unet_mod
from bench_core.nets.unet import DIGITS_SMALL, UNet, UNetConfig, chunked_attention
from bench_core.samplers import sample_euler
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
    orig = unet_mod._fused_norm_act_fn

    def spy():
        fn = orig()

        def wrapped(x, *a):
            calls.append(tuple(x.shape))
            return fn(x, *a)
        return wrapped

    x, t = _inputs(SMALL_ADM, batch=2)
    unet_mod._fused_norm_act_fn, saved = spy, unet_mod._fused_norm_act_fn
    try:
        with torch.no_grad():
            net(x, t)
    finally:
        unet_mod._fused_norm_act_fn = saved
    n_res = sum(isinstance(m, unet_mod.ResBlock) for m in net.modules())
    assert len(calls) == 2 * n_res + 1  # norm1 and norm2 of each residual block, plus norm_out


def test_fused_norm_act_eager_fallback(monkeypatch):
    """Without a compiler backend the option warns and runs the same math unfused."""
    monkeypatch.setattr(unet_mod, "_FUSED_NORM_ACT", {"fn": None, "backend": ""})

    def broken_compile(*a, **k):
        raise RuntimeError("no backend")

    monkeypatch.setattr(torch, "compile", broken_compile)
    net = _net(SMALL)
    x, t = _inputs(SMALL)
    with torch.no_grad():
        ref = net(x, t)
        with pytest.warns(UserWarning, match="unfused"):
            out = apply(net, AccelOptions(fused_norm_act=True))(x, t)
    assert unet_mod.fused_norm_act_backend() == "eager-fallback"
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
        assert {"conv_benchmark", "fp16", "cuda_graph"} <= set(sets)
        for name, opts in sets.items():
            if opts.cuda_graph:  # the graph holds a whole denoiser call: tested below
                opts = opts.replace(cuda_graph=False)
            out = apply(net, opts, device="cuda")(x, t)
            err = relative_error(out, ref)
            assert tolerance(opts, "cuda") == (1e-4 if opts.dtype == "float32" else tolerance(opts))
            assert err <= tolerance(opts, "cuda"), f"{name}: relative error {err:.2e}"


@needs_cuda
def test_cuda_graph_denoiser_replays_the_same_function(no_tf32):
    abar = alphas_cumprod(linear_betas(1000))
    net = _net(DIGITS_SMALL)
    sig = discrete_grid(abar, 6, "uniform").cuda()
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)).cuda() * sig[0]
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
    assert rep.model_hash("ddpm-digits-fast", ov) == DDPM_REPRO.model_hash("digits", tiny)  # same weights
    assert rep.override_errors("ddpm-digits-fast", {"options": {"attn": "bogus"}})
    assert rep.override_errors("ddpm-digits-fast", {"base_model": "nope"})
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
