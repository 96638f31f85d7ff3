#!/usr/bin/env python
"""Train the digits feature extractor used for FID/KID/precision-recall on the 8x8 digits.

Deterministic (fixed seed, one CPU thread, deterministic algorithms), a few seconds on a CPU.
Writes ``bench_core/metrics/weights/digits_cnn.pt`` and ``digits_cnn.json`` (sha256 of the
weights, held-out accuracy, split sizes, seed, feature dimension, the command that made them).

    python scripts/train_digits_extractor.py
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from bench_core.metrics.extractors import (  # noqa: E402
    DIGITS_FEATURE_DIM,
    DIGITS_WEIGHTS,
    TRAIN_COMMAND,
    DigitsCNN,
    load_digits_cnn,
    load_digits_uint8,
    sha256_file,
)


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with zeros."""
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # (n, h)
    cols = (dx[:, None] + torch.arange(w)[None, :])  # (n, w)
    idx_n = torch.arange(n)[:, None, None]
    return pad[idx_n, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


@torch.no_grad()
def accuracy(model: DigitsCNN, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x)[1].argmax(1) == y).float().mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DIGITS_WEIGHTS, help="weights file (json written beside it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--test-fraction", type=float, default=0.2)
    args = p.parse_args(argv)

    # Determinism: one thread (float sums do not depend on the core count), fixed seeds.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    # Data: stratified train / held-out split of the 1797 digits.
    images, labels = load_digits_uint8()
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=args.test_fraction, stratify=labels.numpy(), random_state=args.seed
    )
    idx_train, idx_test = torch.from_numpy(np.sort(idx_train)), torch.from_numpy(np.sort(idx_test))
    x_train, y_train = DigitsCNN.preprocess(images[idx_train]), labels[idx_train]
    x_test, y_test = DigitsCNN.preprocess(images[idx_test]), labels[idx_test]

    # Training: AdamW with cosine decay, +-1 pixel shift augmentation.
    model = DigitsCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps_per_epoch)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        for b in perm.split(args.batch_size):
            xb = random_shift(x_train[b], gen)
            loss = F.cross_entropy(model(xb)[1], y_train[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1:3d}  loss {loss.item():.4f}  held-out acc {accuracy(model, x_test, y_test):.4f}")
    seconds = time.perf_counter() - t0

    # Output: weights, then the checksum json; reload through the checked loader.
    model.eval()
    heldout = accuracy(model, x_test, y_test)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, args.out)
    cmd_args = [a for a in (argv if argv is not None else sys.argv[1:])]
    meta = {
        "sha256": sha256_file(args.out),
        "heldout_accuracy": round(heldout, 6),
        "n_train": int(len(idx_train)),
        "n_test": int(len(idx_test)),
        "seed": args.seed,
        "feature_dim": DIGITS_FEATURE_DIM,
        "epochs": args.epochs,
        "torch_version": torch.__version__.split("+")[0],
        "command": " ".join([TRAIN_COMMAND, *cmd_args]),
    }
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    reloaded, _ = load_digits_cnn(args.out)
    assert accuracy(reloaded, x_test, y_test) == heldout
    emb = reloaded.embed(x_test)
    dead = int((emb.std(0) < 1e-3 * emb.std(0).max()).sum())
    print(f"trained in {seconds:.1f}s; held-out accuracy {heldout:.4f} on {len(idx_test)} digits; "
          f"{dead}/{DIGITS_FEATURE_DIM} feature units never active on held-out")
    print(f"wrote {args.out} (sha256 {meta['sha256']}) and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
