"""How separable are a target domain's items from an auxiliary domain's, per modality?

    python bench/modality_separability.py demo/features [--targets Scientific,Office] [--aux Food,Movies]

The paper's section 6.3 analysis on raw frozen-encoder features: for each (target, auxiliary)
pair and each modality (text, image, price encoding), a linear classifier (logistic regression,
balanced pairs, 70/10/20 split) separates the target's items from the auxiliary's. Higher test
accuracy = less transferable. On the built-in synthetic data, texts should be nearly perfectly
separable and images and prices much less (docs/synthetic.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ant_dist.model.irl import sinusoidal_price_encoding


def modality(features: Path, domain: str, kind: str) -> np.ndarray:
    d = features / domain
    if kind == "price":
        p = torch.from_numpy(np.load(d / "price.npy").astype(np.float32))
        known = torch.isfinite(p)
        return sinusoidal_price_encoding(p[known]).numpy()
    x = np.load(d / f"{kind}.npy").astype(np.float32)
    return x[np.load(d / "has_image.npy")] if kind == "image" else x


def separability(a: np.ndarray, b: np.ndarray, seed: int = 0, epochs: int = 300) -> float:
    rng = np.random.default_rng(seed)
    n = min(len(a), len(b))
    x = np.concatenate([a[rng.permutation(len(a))[:n]], b[rng.permutation(len(b))[:n]]])
    y = np.r_[np.ones(n), np.zeros(n)]
    idx = rng.permutation(2 * n)
    train, test = idx[: int(0.7 * 2 * n)], idx[int(0.8 * 2 * n):]
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
    xt, yt = torch.tensor(x), torch.tensor(y, dtype=torch.float32)
    w = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w, bias], lr=0.05)
    for _ in range(epochs):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt[train] @ w + bias, yt[train])
        opt.zero_grad()
        (loss + 1e-3 * w.square().sum()).backward()
        opt.step()
    with torch.no_grad():
        return ((xt[test] @ w + bias > 0).float() == yt[test]).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("features")
    p.add_argument("--targets", default="Scientific,Office")
    p.add_argument("--aux", default="Food,Movies,Home,Clothing")
    args = p.parse_args()
    root = Path(args.features)
    print(f"{'target':12s} {'auxiliary':12s} {'text':>6s} {'image':>6s} {'price':>6s}")
    for t in args.targets.split(","):
        for a in args.aux.split(","):
            acc = [separability(modality(root, t, k), modality(root, a, k)) for k in ("text", "image", "price")]
            print(f"{t:12s} {a:12s} " + " ".join(f"{v:6.3f}" for v in acc))


if __name__ == "__main__":
    main()
