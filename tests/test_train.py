"""Training loop, EMA, config hash and checkpoint cache."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from bench_core.data import default_data_root
from bench_core.train import (EMA, CheckpointCache, CheckpointError, TrainConfig, TrainingDiverged, config_hash,
                              default_cache_dir, lr_at, train)


def _regression_data(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([1.5, -2.0, 0.5]) + 0.3
    return torch.cat([x, y[:, None]], 1)  # target in the last column


def _mse(model, batch, y, generator):
    return ((model(batch[:, :3]).squeeze(1) - batch[:, 3]) ** 2).mean()


def _small_cfg(**kw):
    base = dict(lr=1e-2, batch_size=32, steps=300, warmup=10, grad_clip=1.0, ema_decay=0.0, seed=0)
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------------------------
# loop
# --------------------------------------------------------------------------------------------
def test_loss_decreases_on_toy_regression():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    data = _regression_data()
    before = _mse(model, data, None, None).item()
    stats = train(model, _mse, data, _small_cfg(), progress=False)
    after = _mse(model, data, None, None).item()
    assert after < 0.01 * before and stats["final_loss"] < 0.05 * before
    assert stats["steps"] == 300 and stats["train_sec"] > 0
    assert 1 <= len(stats["loss_curve"]) <= 100 and stats["loss_curve"][-1][0] == 300
    assert stats["loss_curve"][0][1] > stats["loss_curve"][-1][1]
    json.dumps(stats)  # json-able (goes into checkpoint meta)
    assert not model.training


def test_training_is_deterministic_and_leaves_global_rng_alone():
    def run(seed):
        torch.manual_seed(123)
        model = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.2), nn.Linear(16, 1))
        noisy = lambda m, b, y, g: _mse(m, b + 0.01 * torch.randn(b.shape, generator=g), y, g)  # noqa: E731
        train(model, noisy, _regression_data(), _small_cfg(steps=50, seed=seed, ema_decay=0.9), progress=False)
        return torch.cat([p.flatten() for p in model.parameters()])

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    model = nn.Linear(3, 1)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    train(model, _mse, _regression_data(), _small_cfg(steps=5), progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_dataset_object_and_labels_are_passed():
    from bench_core.data import load_dataset

    d = load_dataset("gmm2d", preset="ring8", n=256)
    seen = []

    def loss_fn(model, x, y, g):
        seen.append((x.shape, y.shape, y.dtype))
        return model(x).pow(2).mean()

    train(nn.Linear(2, 1), loss_fn, d, _small_cfg(steps=3, batch_size=64), progress=False)
    assert seen == [(torch.Size([64, 2]), torch.Size([64]), torch.long)] * 3


def test_batches_larger_than_the_dataset_wrap_around():
    sizes = []
    train(nn.Linear(3, 1), lambda m, x, y, g: (sizes.append(x.shape[0]), _mse(m, x, y, g))[1],
          _regression_data(n=10), _small_cfg(steps=2, batch_size=32), progress=False)
    assert sizes == [32, 32]


def test_warmup_is_linear():
    cfg = TrainConfig(lr=2e-4, warmup=5000)
    assert lr_at(0, cfg) == pytest.approx(2e-4 / 5000)
    assert lr_at(2499, cfg) == pytest.approx(1e-4)
    assert lr_at(4999, cfg) == lr_at(10**6, cfg) == 2e-4
    assert lr_at(0, TrainConfig(lr=1e-3, warmup=0)) == 1e-3


def test_divergence_raises():
    with pytest.raises(TrainingDiverged) as e:
        train(nn.Linear(3, 1), lambda m, x, y, g: _mse(m, x, y, g) * float("nan"), _regression_data(),
              _small_cfg(steps=10), progress=False)
    assert e.value.step == 0


def test_paper_defaults():
    c = TrainConfig()
    assert (c.lr, c.batch_size, c.warmup, c.grad_clip, c.ema_decay, c.seed, c.weight_decay) == (
        2e-4, 128, 5000, 1.0, 0.9999, 0, 0.0)
    assert c.to_dict()["adam_betas"] == [0.9, 0.999]


# --------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------
def test_ema_against_hand_computation():
    m = nn.BatchNorm1d(1)  # weight, bias (params), running_mean (float buffer), num_batches_tracked (int)
    with torch.no_grad():
        m.weight.fill_(0.0)
    ema = EMA(m, decay=0.9)
    with torch.no_grad():
        m.weight.fill_(1.0)
        m.running_mean.fill_(10.0)
        m.num_batches_tracked.fill_(3)
    ema.update(m)
    # 0.9 * 0 + 0.1 * 1 = 0.1 ; running_mean 0.9 * 0 + 0.1 * 10 = 1 ; counters copied
    assert ema.shadow["weight"].item() == pytest.approx(0.1)
    assert ema.shadow["running_mean"].item() == pytest.approx(1.0)
    assert ema.shadow["num_batches_tracked"].item() == 3
    with torch.no_grad():
        m.weight.fill_(2.0)
    ema.update(m)
    assert ema.shadow["weight"].item() == pytest.approx(0.9 * 0.1 + 0.1 * 2.0)  # 0.29
    ema.copy_to(m)
    assert m.weight.item() == pytest.approx(0.29)
    st = ema.state_dict()
    e2 = EMA(nn.BatchNorm1d(1), decay=0.5)
    e2.load_state_dict(st)
    assert e2.decay == 0.9 and torch.equal(e2.shadow["weight"], ema.shadow["weight"])


def test_train_returns_the_ema_weights():
    """With a linear loss sum(w) Adam moves every weight by exactly -lr per step (m_hat / sqrt(v_hat)
    = 1), so w_t = -lr * t from w_0 = 0 and the EMA after T steps is sum_t (1-d) d^(T-t) w_t."""
    lr, d, T = 0.1, 0.9, 7
    model = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    cfg = TrainConfig(lr=lr, batch_size=2, steps=T, warmup=0, grad_clip=0.0, ema_decay=d, seed=0)
    train(model, lambda m, x, y, g: m.weight.sum(), torch.zeros(8, 4), cfg, progress=False)
    by_hand = sum((1 - d) * d ** (T - t) * (-lr * t) for t in range(1, T + 1))
    assert torch.allclose(model.weight, torch.full((1, 4), by_hand), atol=1e-6)


# --------------------------------------------------------------------------------------------
# config hash
# --------------------------------------------------------------------------------------------
@dataclass
class _Net:
    width: int = 64
    mults: tuple = (1, 2)


def test_config_hash_stable_and_sensitive():
    h = config_hash(TrainConfig(steps=100), _Net())
    assert len(h) == 16 and all(c in "0123456789abcdef" for c in h)
    assert h == config_hash(TrainConfig(steps=100), _Net())
    assert h != config_hash(TrainConfig(steps=101), _Net())
    assert h != config_hash(TrainConfig(steps=100), _Net(width=65))
    assert h != config_hash(_Net(), TrainConfig(steps=100))  # order of the parts matters
    # dict key order does not matter; tuples hash like lists
    assert config_hash({"a": 1, "b": (1, 2)}) == config_hash({"b": [1, 2], "a": 1})
    # the canonical JSON by hand: sorted keys, no whitespace, sha256, 16 hex digits
    expected = hashlib.sha256(b'[{"a":1,"b":[1,2]}]').hexdigest()[:16]
    assert config_hash({"b": (1, 2), "a": 1}) == expected
    with pytest.raises(TypeError):
        config_hash({"f": object()})


# --------------------------------------------------------------------------------------------
# checkpoint cache
# --------------------------------------------------------------------------------------------
def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def test_checkpoint_round_trip(tmp_path):
    cache = CheckpointCache(tmp_path)
    a = _net(0)
    meta = {"config": TrainConfig().to_dict(), "train_sec": 1.5, "stats": {"final_loss": 0.1}}
    path = cache.save("abc123", a, meta)
    assert path == cache.path("abc123") == tmp_path / "abc123.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abc123.pt", "abc123.pt.sha256"]  # no temporary left behind
    b = _net(1)
    assert cache.load("abc123", b) == meta
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "diffbench-ckpt-1" and raw["hash"] == "abc123"
    assert cache.load("other", _net()) is None


def test_load_or_train_trains_once(tmp_path):
    cache = CheckpointCache(tmp_path)
    calls = []

    def train_fn(model):
        calls.append(1)
        with torch.no_grad():
            model[0].weight.fill_(0.5)
        return {"train_sec": 2.0}

    meta, now = cache.load_or_train("h1", _net(), train_fn)
    assert now and meta == {"train_sec": 2.0} and calls == [1]
    m2 = _net(5)
    meta2, now2 = cache.load_or_train("h1", m2, train_fn)
    assert not now2 and meta2 == {"train_sec": 2.0} and calls == [1]
    assert (m2[0].weight == 0.5).all()


def test_truncated_checkpoint(tmp_path):
    cache = CheckpointCache(tmp_path)
    path = cache.save("h", _net(), {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        cache.load("h", _net())
    msg = str(e.value)
    assert str(path) in msg and "corrupted" in msg and "delete it to retrain" in msg


def test_garbage_checkpoint(tmp_path):
    cache = CheckpointCache(tmp_path)
    cache.path("h").write_bytes(b"\x00garbage, not a torch file" * 10)
    with pytest.raises(CheckpointError, match="corrupted.*delete it to retrain"):
        cache.load("h", _net())


def test_mismatched_checkpoints(tmp_path):
    cache = CheckpointCache(tmp_path)
    cache.save("h", nn.Sequential(nn.Linear(3, 16), nn.BatchNorm1d(16), nn.Linear(16, 2)), {})
    model = _net(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"shape mismatch 0\.weight: file \(16, 3\) vs model \(8, 3\)"):
        cache.load("h", model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    cache.save("k", nn.Sequential(nn.Linear(3, 8)), {})
    with pytest.raises(CheckpointError, match="missing keys 1.bias"):
        cache.load("k", _net())
    # another hash's file under this name
    cache.path("h2").write_bytes(cache.path("k").read_bytes())
    with pytest.raises(CheckpointError, match="holds hash 'k', expected 'h2'"):
        cache.load("h2", nn.Sequential(nn.Linear(3, 8)))
    # a torch file that is not ours
    torch.save({"weights": torch.zeros(2)}, cache.path("foreign"))
    with pytest.raises(CheckpointError, match="not a diffbench-ckpt-1 file"):
        cache.load("foreign", _net())


def test_meta_must_be_json_able(tmp_path):
    with pytest.raises(TypeError, match="json-able"):
        CheckpointCache(tmp_path).save("h", _net(), {"x": object()})


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFBENCH_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    assert CheckpointCache().dir == tmp_path / "c"
    monkeypatch.delenv("DIFFBENCH_CACHE")
    monkeypatch.delenv("DIFFBENCH_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "diffbench"
    assert default_data_root() == tmp_path / "xdg" / "diffbench" / "data"
    # unset, or relative (which the XDG specification says to ignore): ~/.cache, never the source tree
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for xdg in ("", "relative/cache"):
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
        assert default_cache_dir() == tmp_path / "home" / ".cache" / "diffbench"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "diffbench"
    assert default_data_root() == tmp_path / "home" / ".cache" / "diffbench" / "data"
