"""The precision matrix: every loss path and every re-learning method takes one step in float32
and one under bf16 autocast (CPU autocast supports bf16, so CI runs what a GPU user runs by
default), from the same weights, batch and random draws. The engines (DDP, DeepSpeed ZeRO-2) run
bf16 through the real entry point in test_pretrain's equivalence test.

Tolerances and their reasons: tests/precision_step.py.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ant_dist.methods import method_options
from ant_dist.pipeline.launcher import free_port
from precision_step import BF16_STEPS, DEVICE, GRAD_COSINE, GRAD_RTOL, LOSS_RTOL
from test_pretrain import ENV
from test_relearn import pretrained  # noqa: F401  (the module-scoped fixture: a tiny pre-trained model)

SCRIPT = Path(__file__).with_name("precision_step.py")

# name -> (stage, options, the loss path it must take)
ONE_PROCESS = {
    "pretrain exact dense": ("pretrain", ["loss=exact"], "exact-dense"),
    "pretrain exact chunked": ("pretrain", ["loss=exact", "exact_chunk=64"], "exact-chunked"),
    "pretrain sampled": ("pretrain", ["loss=sampled", "n_negatives=64"], "sampled"),
    "pretrain sampled in-batch": ("pretrain", ["loss=sampled", "n_negatives=64", "in_batch_negatives=true"],
                                  "sampled+in-batch"),
    "pretrain unisrec": ("pretrain", ["model=unisrec"], "unisrec-in-batch"),
}
TWO_PROCESSES = {
    "pretrain exact split (2 processes)": ("pretrain", ["loss=exact", "exact_chunk=64"], "exact-split"),
    "pretrain sampled gathered (2 processes)": ("pretrain", ["loss=sampled", "n_negatives=64"], "sampled+gathered"),
    "pretrain sampled in-batch gathered (2 processes)": (
        "pretrain", ["loss=sampled", "n_negatives=64", "in_batch_negatives=true"], "sampled+global-in-batch+gathered"),
}
# UniSRec's FT needs a UniSRec pre-trained model; its GB and ReL (onto the fixture's user model) do not
for _label in ("ReL", "FT", "GB", "ANT_e", "ID-SASRec", "SASRec++", "NOVA", "UniSRec-GB", "UniSRec-ReL"):
    _opts = method_options(_label)
    ONE_PROCESS[f"relearn {_label} dense"] = ("relearn", _opts, "exact-dense")
    ONE_PROCESS[f"relearn {_label} chunked"] = ("relearn", [*_opts, "exact_chunk=16"], "exact-chunked")


def _run_cases(world, pretrained, cases: dict, processes: int, tmp_path, label: str) -> dict:
    spec = json.dumps([{"name": n, "stage": s, "args": a} for n, (s, a, _) in cases.items()])
    out, port = tmp_path / "precision.json", str(free_port())
    env = {**ENV, "PYTHONPATH": str(SCRIPT.parent)}
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(world), str(pretrained), str(out), str(r),
                               str(processes), port, spec], env=env, stderr=subprocess.PIPE, text=True)
             for r in range(processes)]
    try:
        errors = [p.communicate(timeout=600)[1] for p in procs]
        assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in errors)
    finally:
        for p in procs:
            p.kill()
    if os.environ.get("ANT_PRECISION_RESULTS_DIR"):  # bench/gpu_checks.py keeps the figures
        shutil.copy(out, Path(os.environ["ANT_PRECISION_RESULTS_DIR"]) / f"precision_{label}.json")
    return json.loads(out.read_text())


def _check(results: dict, cases: dict) -> None:
    assert set(results) == set(cases)
    failures = []
    for name, r in results.items():
        expected_path = cases[name][2]
        rel = abs(r["loss_bf16"] - r["loss_fp32"]) / r["loss_fp32"]
        ok = (r["finite"] and len(r["later_bf16_losses"]) == BF16_STEPS and r["path_fp32"] == r["path_bf16"] == expected_path and 0 < rel < LOSS_RTOL
              and r["grad_cosine"] > GRAD_COSINE and r["grad_rel_error"] < GRAD_RTOL)
        if not ok:
            failures.append(f"{name}: {r} (loss rel diff {rel:.2e})")
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_precision_matrix_one_process(world, pretrained, tmp_path):  # noqa: F811
    _check(_run_cases(world, pretrained, ONE_PROCESS, 1, tmp_path, "one_process"), ONE_PROCESS)


@pytest.mark.slow
@pytest.mark.skipif(DEVICE.type == "cuda", reason="two processes need two GPUs for NCCL; gloo runs them on CPU")
def test_precision_matrix_two_processes(world, pretrained, tmp_path):  # noqa: F811
    _check(_run_cases(world, pretrained, TWO_PROCESSES, 2, tmp_path, "two_processes"), TWO_PROCESSES)


@pytest.mark.slow
@pytest.mark.skipif(DEVICE.type == "cuda", reason="two processes need two GPUs for NCCL; gloo runs them on CPU")
def test_alignment_loss_is_per_process(world, pretrained, tmp_path):  # noqa: F811
    # what docs/training.md says: each process's R_c is alignment_loss over its own batch's items
    # (the processes' terms are then averaged), not over the global batch's
    got = _run_cases(world, pretrained, {"R_c": ("alignment", [], "")}, 2, tmp_path, "alignment")["R_c"]
    for rank in got:
        assert rank["trainer"] == pytest.approx(rank["own_rows"], rel=1e-5)
        assert abs(rank["trainer"] - rank["global_rows"]) > 1e-3


def test_evaluation_ranks_the_same_under_bf16_autocast(world):
    # a bf16 run validates and tests its model in float32: the same weights give the same
    # per-user ranks whether or not the caller's autocast is on (on DEVICE: bench/gpu_checks.py
    # runs it on the GPU)
    import torch

    from ant_dist.config import PretrainConfig, load_config
    from ant_dist.train.data import validation_users
    from ant_dist.train.evaluate import evaluate
    from ant_dist.train.loop import build_model
    from precision_step import _corpus_and_features

    corpus, features = _corpus_and_features(str(world), ["Food", "Home"])
    cfg = load_config(PretrainConfig, None, ["domains=[Food,Home]", "hidden=32"])
    torch.manual_seed(0)
    model = build_model(cfg, features.text_dim, features.image_dim).to(DEVICE)
    users = validation_users(corpus, 60, 0)
    every_rank = 10**9  # NDCG@k with k past the catalog is 1 / log2(rank + 2): one value per rank

    def ranks():
        res = evaluate(model, features, corpus, users, "valid", cfg.max_len, True, 97, DEVICE, 0, 1,
                       lambda x: x, ks=(every_rank,))
        return {d: r["per_user"][f"ndcg@{every_rank}"] for d, r in res.items()}

    plain = ranks()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        x = torch.ones(2, 2, device=DEVICE)
        assert (x @ x).dtype == torch.bfloat16  # autocast really is on
        under_autocast = ranks()
    assert under_autocast == plain and len(set(plain["Food"])) > 10
