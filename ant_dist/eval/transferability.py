"""Cross-task transferability of item texts, images and prices (the paper's section 6.3, Figure 2).

    python -m ant_dist.transferability model=runs/pretrain/model targets=[Scientific,Office] [key=value ...]

For each (target, auxiliary) pair of domains and each modality, a linear classifier learns to
tell the target's items from the auxiliary's using the pre-trained item model's transformed
embeddings z_t, z_m, z_p (eq. 6). High accuracy = the modality's embeddings are task-sensitive
= low cross-task transferability; 0.5 = indistinguishable. Classes are balanced by subsampling
the larger domain, items are split 70/10/20 (train/valid/test, stratified), and the validation
split picks the inverse regularisation C of a logistic regression from `c_grid`.

Output in <out>/: transferability.md (accuracy table), transferability.json (every number,
with sizes and 95% intervals) and transferability.png (one heatmap per modality, targets x
auxiliaries). Exit codes: 0 done, 2 bad input (the message says what).
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from ant_dist.config import TransferabilityConfig, parse_cli
from ant_dist.features.feature_table import FeatureTableError, load_features
from ant_dist.model.io import load_model
from ant_dist.runtime.exit_codes import EXIT_BAD_INPUT, EXIT_OK, BadInput

MODALITIES = ("text", "image", "price")
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)  # train, valid, test (paper section 6.3)


class TransferabilityError(ValueError):
    """Bad input: unknown domain, missing model, mismatched features."""


# ----------------------------------------------------------------------------- pure parts
def split_counts(n: int, fractions=SPLIT_FRACTIONS) -> tuple[int, int, int]:
    """(train, valid, test) sizes of n items; test takes the rounding remainder."""
    n_train, n_valid = int(round(fractions[0] * n)), int(round(fractions[1] * n))
    return n_train, n_valid, n - n_train - n_valid


def balanced_split(target_rows: np.ndarray, aux_rows: np.ndarray, rng: np.random.Generator) -> dict:
    """Balance two classes by subsampling the larger one, then split each class 70/10/20.

    Returns {"train"|"valid"|"test": (target_rows, aux_rows)}; every class has the same count
    in every split (a stratified split), so chance accuracy is exactly 0.5 on each.
    """
    n = min(len(target_rows), len(aux_rows))
    picked = [rng.permutation(np.asarray(rows))[:n] for rows in (target_rows, aux_rows)]
    n_train, n_valid, _ = split_counts(n)
    bounds = {"train": (0, n_train), "valid": (n_train, n_train + n_valid), "test": (n_train + n_valid, n)}
    return {s: (picked[0][a:b], picked[1][a:b]) for s, (a, b) in bounds.items()}


def fit_and_score(x: dict, y: dict, c_grid: list, max_iter: int, seed: int) -> dict:
    """Standardise, fit one logistic regression per C on train, keep the best on valid, score test."""
    from scipy.stats import binomtest
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    best = None
    for c in c_grid:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=float(c), max_iter=max_iter, random_state=seed))
        clf.fit(x["train"], y["train"])
        valid_acc = float((clf.predict(x["valid"]) == y["valid"]).mean())
        if best is None or valid_acc > best[0]:  # ties keep the smaller C (stronger regularisation)
            best = (valid_acc, float(c), clf)
    valid_acc, c, clf = best
    correct = int((clf.predict(x["test"]) == y["test"]).sum())
    n_test = len(y["test"])
    ci = binomtest(correct, n_test).proportion_ci(confidence_level=0.95)
    converged = bool(clf[-1].n_iter_.max() < max_iter)
    return {"accuracy": correct / n_test, "correct": correct, "n_test": n_test, "ci95": [ci.low, ci.high],
            "C": c, "valid_accuracy": valid_acc, "converged": converged}


def _rng(seed: int, *names: str) -> np.random.Generator:
    # a stream per (seed, names): one cell's draws do not shift when other domains are added
    return np.random.default_rng([seed, *(zlib.crc32(n.encode()) for n in names)])


# ----------------------------------------------------------------------------- inputs
def _load_domain(cfg: TransferabilityConfig, name: str) -> dict:
    fdir = Path(cfg.features) / name
    if not fdir.is_dir():
        known = sorted(p.name for p in Path(cfg.features).iterdir() if p.is_dir()) \
            if Path(cfg.features).is_dir() else []
        raise TransferabilityError(f"unknown domain {name!r}: no feature table {fdir} (found: {known or 'none'})")
    try:
        return load_features(fdir, expect_shards=Path(cfg.shards) / name)
    except FeatureTableError as exc:
        raise TransferabilityError(f"domain {name!r}: {exc}") from None


def _check_encoders(tables: dict, irl_cfg) -> None:
    first_name, first = next(iter(tables.items()))
    for name, t in tables.items():
        for enc, want_dim in (("text", irl_cfg.text_dim), ("image", irl_cfg.image_dim)):
            dim = t[enc].shape[1]
            if dim != want_dim:
                raise TransferabilityError(f"domain {name!r}: {enc} features have {dim} dims but the model expects "
                                           f"{want_dim}; embed with the pre-training encoders")
            a, b = first["manifest"].get(enc, {}), t["manifest"].get(enc, {})
            if a.get("fingerprint") != b.get("fingerprint"):
                raise TransferabilityError(f"domains {first_name!r} and {name!r} were embedded with different {enc} "
                                           f"encoders; embed all domains with the pre-training encoders")


@torch.no_grad()
def embed_domain(irl: torch.nn.Module, table: dict, rows: np.ndarray, batch_size: int,
                 device: torch.device) -> dict:
    """z_text, z_image, z_price (float32 numpy) of the given rows, plus has_image and has_price."""
    parts: dict[str, list] = {m: [] for m in MODALITIES}
    for a in range(0, len(rows), batch_size):
        r = rows[a:a + batch_size]
        feats = (torch.from_numpy(np.asarray(table[n][r])).to(device) for n in ("text", "image", "price"))
        out = irl(*feats)
        for m, z in zip(MODALITIES, (out.z_text, out.z_image, out.z_price)):
            parts[m].append(z.float().cpu().numpy())
    emb = {m: np.concatenate(parts[m]) for m in MODALITIES}
    emb["has_image"] = np.asarray(table["has_image"][rows], dtype=bool)
    emb["has_price"] = np.isfinite(np.asarray(table["price"][rows]))
    return emb


def usable(emb: dict, modality: str, exclude_missing: bool) -> np.ndarray:
    """Positions (into the domain's embedded rows) that take part for this modality."""
    keep = np.ones(len(emb["text"]), dtype=bool)
    if exclude_missing and modality == "image":
        keep = emb["has_image"]
    elif exclude_missing and modality == "price":
        keep = emb["has_price"]
    return np.flatnonzero(keep)


# ----------------------------------------------------------------------------- the analysis
def run(cfg: TransferabilityConfig) -> dict:
    if not cfg.targets:
        raise TransferabilityError("targets is empty: name at least one target domain, e.g. targets=[Scientific]")
    try:
        model, model_config = load_model(cfg.model)
    except (BadInput, FileNotFoundError) as exc:
        raise TransferabilityError(f"model={cfg.model}: {exc}") from None
    if model.irl is None:
        raise TransferabilityError(f"model={cfg.model} has no IRL item model (item_source="
                                   f"{model.cfg.item_source!r}): the probe reads IRL's text, image and price "
                                   f"embeddings, which only ANT's models have")
    aux = list(cfg.auxiliary) or list(model_config.get("domains") or [])
    if not aux:
        raise TransferabilityError("auxiliary is empty and the model's config names no domains: set auxiliary=[...]")
    pairs = [(t, a) for t in cfg.targets for a in aux if t != a]  # a domain paired with itself says nothing
    if not pairs:
        raise TransferabilityError(f"no (target, auxiliary) pair of different domains in {cfg.targets} x {aux}")
    names = list(dict.fromkeys(n for pair in pairs for n in pair))
    tables = {n: _load_domain(cfg, n) for n in names}
    _check_encoders(tables, model.irl.cfg)

    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    irl = model.irl.to(device).eval()  # eval: no gate noise, no dropout (the mean routing)
    embedded, domain_rows = {}, {}
    for n in tqdm(names, desc="embed domains", disable=not cfg.progress):
        total = len(tables[n]["text"])
        rows = np.arange(total)
        if 0 < cfg.max_items_per_domain < total:
            rows = np.sort(_rng(cfg.seed, "items", n).choice(total, cfg.max_items_per_domain, replace=False))
        embedded[n] = embed_domain(irl, tables[n], rows, cfg.batch_size, device)
        domain_rows[n] = {"items": total, "embedded": len(rows), "with_image": int(embedded[n]["has_image"].sum()),
                          "with_price": int(embedded[n]["has_price"].sum())}

    cells, skipped = [], []
    for target, a in tqdm(pairs, desc="classify pairs", disable=not cfg.progress):
        for m in MODALITIES:
            pos_t, pos_a = usable(embedded[target], m, cfg.exclude_missing), usable(embedded[a], m, cfg.exclude_missing)
            n = min(len(pos_t), len(pos_a))
            cell = {"target": target, "auxiliary": a, "modality": m, "n_per_class": n}
            if n < cfg.min_items_per_class:
                skipped.append({**cell, "reason": f"only {len(pos_t)} usable {target} and {len(pos_a)} usable {a} "
                                                  f"items (min_items_per_class={cfg.min_items_per_class})"})
                continue
            split = balanced_split(pos_t, pos_a, _rng(cfg.seed, "split", target, a, m))
            x = {s: np.concatenate([embedded[target][m][pt], embedded[a][m][pa]]) for s, (pt, pa) in split.items()}
            y = {s: np.concatenate([np.ones(len(pt), int), np.zeros(len(pa), int)]) for s, (pt, pa) in split.items()}
            cells.append({**cell, "n_train": len(y["train"]), "n_valid": len(y["valid"]),
                          **fit_and_score(x, y, cfg.c_grid, cfg.max_iter, cfg.seed)})
    return {"config": asdict(cfg), "model_stage": model_config.get("stage"), "targets": list(cfg.targets),
            "auxiliary": aux, "domains": domain_rows, "results": cells, "skipped": skipped}


# ----------------------------------------------------------------------------- outputs
def accuracy_of(report: dict, target: str, aux: str, modality: str) -> Optional[float]:
    for c in report["results"]:
        if (c["target"], c["auxiliary"], c["modality"]) == (target, aux, modality):
            return c["accuracy"]
    return None


def _pairs(report: dict) -> list[tuple[str, str]]:
    return [(t, a) for t in report["targets"] for a in report["auxiliary"] if t != a]


def markdown(report: dict) -> str:
    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    lines = ["# Transferability (cross-task separability, paper section 6.3)", "",
             f"Model: `{report['config']['model']}`. Test accuracy of a linear classifier telling the target's items "
             "from the auxiliary's (balanced classes, so 0.5 = indistinguishable = transferable; higher = more "
             "task-sensitive).", "", "| target | auxiliary | " + " | ".join(MODALITIES) + " |",
             "|---|---|" + "---:|" * len(MODALITIES)]
    for t, a in _pairs(report):
        lines.append(f"| {t} | {a} | " + " | ".join(fmt(accuracy_of(report, t, a, m)) for m in MODALITIES) + " |")
    lines += ["", "## Details", "", "| target | auxiliary | modality | items per class | test items | "
              "95% interval | C | valid accuracy |", "|---|---|---|---:|---:|---|---:|---:|"]
    for c in report["results"]:
        lines.append(f"| {c['target']} | {c['auxiliary']} | {c['modality']} | {c['n_per_class']} | {c['n_test']} | "
                     f"{c['ci95'][0]:.3f}-{c['ci95'][1]:.3f} | {c['C']:g} | {c['valid_accuracy']:.3f} |")
    for s in report["skipped"]:
        lines.append(f"\nSkipped {s['target']} vs {s['auxiliary']} ({s['modality']}): {s['reason']}.")
    if report["config"]["exclude_missing"]:
        lines.append("\nItems without an image are left out of the image column, items without a price out of the "
                     "price column (exclude_missing=true).")
    return "\n".join(lines) + "\n"


def heatmap(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets, aux = report["targets"], report["auxiliary"]
    fig, axes = plt.subplots(1, len(MODALITIES), figsize=(1.2 + 1.3 * len(aux) * len(MODALITIES),
                                                          1.6 + 0.6 * len(targets)), squeeze=False,
                             layout="constrained")
    for ax, m in zip(axes[0], MODALITIES):
        grid = np.array([[np.nan if (v := accuracy_of(report, t, a, m)) is None else v for a in aux] for t in targets])
        im = ax.imshow(grid, vmin=0.5, vmax=1.0, cmap="viridis", aspect="auto")
        for i in range(len(targets)):
            for j in range(len(aux)):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center",
                            color="black" if grid[i, j] > 0.8 else "white", fontsize=9)
        ax.set_xticks(range(len(aux)), aux, rotation=45, ha="right")
        ax.set_yticks(range(len(targets)), targets)
        ax.set_title(m)
        ax.set_xlabel("auxiliary")
    axes[0][0].set_ylabel("target")
    fig.colorbar(im, ax=list(axes[0]), label="test accuracy", shrink=0.8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_outputs(report: dict, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transferability.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "transferability.md").write_text(markdown(report))
    heatmap(report, out / "transferability.png")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = parse_cli(TransferabilityConfig, argv, "python -m ant_dist.transferability", __doc__)
    try:
        report = run(cfg)
    except TransferabilityError as exc:
        print(f"transferability: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = write_outputs(report, cfg.out)
    for m in MODALITIES:
        accs = [c["accuracy"] for c in report["results"] if c["modality"] == m]
        mean = f"{np.mean(accs):.3f}" if accs else "n/a"
        print(f"transferability: {m}: mean accuracy {mean} over {len(accs)} pair(s)")
    print(f"transferability: wrote {out / 'transferability.md'}, .json and .png")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
