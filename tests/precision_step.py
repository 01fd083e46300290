"""One training step of the real objective in float32 and again under bf16 autocast, for the
precision matrix (tests/test_precision.py). Run as a script on 1 process, or as rank r of 2 gloo
processes:
    python tests/precision_step.py WORLD_DIR PRETRAINED_MODEL OUT.json RANK WORLD_SIZE PORT CASES_JSON

Each case names a stage (pretrain: the pre-training model over Food+Home; or a re-learning
method on Office) and loss options. For each case both precisions start from the same weights,
the same batch (batch 0 of epoch 0, this rank's share), no dropout or gate noise; the gradient
is averaged over the ranks as data parallelism does. Rank 0 writes, per case: the global
rec-loss sum in each precision, the gradient cosine, the relative gradient error, and the loss
path each precision took.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

from ant_dist.config import PretrainConfig, RelearnConfig, load_config
from ant_dist.train.losses import NegativeSampler
from ant_dist.train.data import Corpus, EpochBatches, epoch_batches, epoch_order, read_domain
from ant_dist.features.catalog import load_catalog_features
from ant_dist.train.loop import build_model, make_objective
from ant_dist.train.objective import TrainObjective
from ant_dist.train.target import build_target_model

# Tolerances, and why (measured on this matrix: loss 0.8-3.2e-4 relative, gradient cosine
# 0.99989-1.0, relative gradient error 0.2-1.5 %):
# - loss: 0 < |bf16 - fp32| / fp32 < 5e-3. bf16 keeps 8 significant bits (unit round-off
#   u = 2^-9 ~ 2e-3): a product of two rounded unit vectors is off by up to 2u, 0.06 on a logit at
#   tau = 0.07 in the worst case, ~0.06 / sqrt(d) typically, and the loss (~log of the catalog
#   size) moves by ~1e-4 relative; 5e-3 is 15x the largest measured. "> 0" proves bf16 ran.
#   This matrix proves every path RUNS under bf16 and stays close to fp32; it cannot tell
#   float32 softmax arithmetic from bf16 (at the first step both are ~1e-4 from fp32): the
#   precision rule itself is tested path by path in tests/test_losses.py, against a reference
#   whose product alone is bf16 (2e-6), including the chunked backward's autocast replay.
# - gradient: cosine with the fp32 gradient > 0.999 and relative error |g16 - g32| / |g32| < 5 %:
#   3x the largest measured error; a gradient of another function (a wrong term, a missing
#   chunk, a stale recompute) lands outside.
# - dropout and gate noise are off: their random draws depend on the dtype of the tensor they act
#   on, so the two precisions could not share them.
# - every case must take the path it names (dense, chunked, split across processes, ...): the
#   chunks are smaller than the catalog where the chunked paths are meant.
# - after the compared step, BF16_STEPS more bf16 steps (AdamW) must stay finite: training, not
#   only one forward, runs under bf16.
LOSS_RTOL, GRAD_COSINE, GRAD_RTOL, BF16_STEPS = 5e-3, 0.999, 0.05, 3
DEVICE = torch.device(os.environ.get("ANT_TEST_DEVICE", "cpu"))  # bench/gpu_checks.py runs it on cuda


def _corpus_and_features(world_dir: str, domains: list[str]):
    doms, offset = [], 0
    for name in domains:
        doms.append(read_domain(f"{world_dir}/shards", name, offset))
        offset += doms[-1].n_items
    corpus = Corpus(doms)
    features = load_catalog_features(f"{world_dir}/features", f"{world_dir}/shards", corpus.names,
                                      [d.n_items for d in doms], "device", 1.0, DEVICE)
    return corpus, features


def _step(case: dict, world_dir: str, pretrained: str, rank: int, world: int, bf16: bool):
    # no dropout and no gate noise: their random draws depend on the dtype of the tensor they
    # act on (bf16 under autocast), so the two precisions would not share them
    common = [f"shards={world_dir}/shards", f"features={world_dir}/features", "hidden=32", "dropout=0",
              "irl_dropout=0", "gate_noise=false", "batch_size=48", *case["args"]]
    if case["stage"] == "pretrain":
        cfg = load_config(PretrainConfig, None, ["domains=[Food,Home]", *common])
    else:
        cfg = load_config(RelearnConfig, None, ["domain=Office", f"pretrained={pretrained}", *common])
        cfg.domains = ["Office"]
    corpus, features = _corpus_and_features(world_dir, cfg.domains)
    popularity = torch.from_numpy(corpus.popularity()).float()
    sampler = (NegativeSampler(corpus.n_items, popularity, cfg.sampler_alpha)
               if cfg.loss == "sampled" and cfg.model == "ant" else None)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, features.text_dim, features.image_dim) if case["stage"] == "pretrain" else \
        build_target_model(cfg, features, corpus)
    model.to(DEVICE)
    objective = make_objective(cfg, model, features, sampler, popularity, None)  # the loop's choice of loss
    n = len(corpus.train_users)
    batches = EpochBatches(corpus, epoch_order(n, cfg.seed, 0), epoch_batches(n, cfg.batch_size), 0, rank, world,
                           cfg.max_len, cfg.seed, cfg.n_negatives if sampler else 0,
                           sampler.probs if sampler else None, draws=cfg.model == "unisrec")
    batch = batches[0]
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
        out = objective(batch)
    out["loss"].backward()
    grads = torch.cat([p.grad.flatten() if p.grad is not None else p.new_zeros(p.numel())
                       for p in model.parameters() if p.requires_grad])
    rec_sum = out["rec_sum"].float().reshape(1)
    if world > 1:  # what DDP does to the gradient, and the global loss sum for the record
        dist.all_reduce(grads)
        grads /= world
        dist.all_reduce(rec_sum)
    later = _more_steps(objective, batches, world) if bf16 else []
    return float(rec_sum), grads.double(), objective.loss_path, batch["n_global"], later


def _more_steps(objective: torch.nn.Module, batches: EpochBatches, world: int) -> list[float]:
    """BF16_STEPS optimizer steps under bf16 after the compared one (gradients averaged over the
    ranks as DDP does): their losses, which must stay finite."""
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for j in range(BF16_STEPS):
        if world > 1:
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            out = objective(batches[(j + 1) % len(batches)])
        out["loss"].backward()
        losses.append(float(out["loss"]))
    return losses


def _alignment_per_process(world_dir: str, rank: int, world: int) -> dict:
    """docs/training.md: R_c is per process. The trainer's align term on this rank must be
    alignment_loss over this rank's own batch rows (not the global batch's)."""
    from ant_dist.train.losses import alignment_loss
    from ant_dist.features.catalog import BatchFeatures

    cfg = load_config(PretrainConfig, None, ["domains=[Food,Home]", f"shards={world_dir}/shards", "hidden=32",
                                             f"features={world_dir}/features", "dropout=0", "irl_dropout=0",
                                             "gate_noise=false", "batch_size=48", "n_negatives=64"])
    corpus, features = _corpus_and_features(world_dir, cfg.domains)
    popularity = torch.from_numpy(corpus.popularity()).float()
    sampler = NegativeSampler(corpus.n_items, popularity, cfg.sampler_alpha)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, features.text_dim, features.image_dim).to(DEVICE)
    objective = TrainObjective(model, features, cfg.loss, cfg.tau, cfg.align_weight, sampler, popularity + 1.0)
    n = len(corpus.train_users)
    order, bounds = epoch_order(n, cfg.seed, 0), epoch_batches(n, cfg.batch_size)

    def rows_of(r: int) -> torch.Tensor:
        return EpochBatches(corpus, order, bounds, 0, r, world, cfg.max_len, cfg.seed, 64, sampler.probs)[0]["rows"]

    batch = EpochBatches(corpus, order, bounds, 0, rank, world, cfg.max_len, cfg.seed, 64, sampler.probs)[0]
    trainer_align = float(objective(batch)["align"])

    def reference(rows: torch.Tensor) -> float:
        with torch.no_grad():
            items = model.encode_items(rows.to(DEVICE), features)
            return float(alignment_loss(items.z_image, items.z_text, BatchFeatures(features.gather_all(rows), rows,
                                                                                    DEVICE).has_image))

    both = torch.unique(torch.cat([rows_of(r) for r in range(world)]))
    return {"trainer": trainer_align, "own_rows": reference(batch["rows"]), "global_rows": reference(both)}


def main(argv: list[str]) -> None:
    world_dir, pretrained, out_path, port, cases = argv[0], argv[1], argv[2], argv[5], argv[6]
    rank, world = int(argv[3]), int(argv[4])
    if world > 1 or DEVICE.type == "cuda":  # on a GPU, one NCCL process (the losses' collectives see world 1)
        dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world)
    results = {}
    for case in json.loads(cases):
        if case["stage"] == "alignment":
            got = _alignment_per_process(world_dir, rank, world)
            every = [None] * world
            dist.all_gather_object(every, got) if world > 1 else every.__setitem__(0, got)
            results[case["name"]] = every
            continue
        rec32, g32, path32, n_global, _ = _step(case, world_dir, pretrained, rank, world, bf16=False)
        rec16, g16, path16, _, later = _step(case, world_dir, pretrained, rank, world, bf16=True)
        results[case["name"]] = {
            "loss_fp32": rec32 / n_global, "loss_bf16": rec16 / n_global, "path_fp32": path32, "path_bf16": path16,
            "grad_cosine": float(torch.nn.functional.cosine_similarity(g32, g16, dim=0)),
            "grad_rel_error": float((g16 - g32).norm() / g32.norm()), "grad_params": int(g32.numel()),
            "later_bf16_losses": later,
            "finite": bool(np.isfinite(rec16) and torch.isfinite(g16).all() and np.isfinite(later).all())}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
