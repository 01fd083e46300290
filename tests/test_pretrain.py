"""Pre-training end to end: real launches (python -m, accelerate launch on 2 CPU processes,
DeepSpeed ZeRO-2), data-parallel equivalence, resume after SIGKILL, stop on SIGUSR1, resume on
another process count, the non-finite guard and bad input. Tiny synthetic data, tiny encoders."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from ant_dist.pipeline.launcher import launch_command
from precision_step import GRAD_RTOL, LOSS_RTOL


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "WANDB_MODE": "offline"}
ENV.pop("ACCELERATE_USE_CPU", None)
ENV.pop("ACCELERATE_USE_DEEPSPEED", None)


def _args(world, run, *extra):
    return [f"shards={world / 'shards'}", f"features={world / 'features'}", "domains=[Food,Home]",
            f"out={world / 'runs'}", f"run_name={run}", "hidden=32", "batch_size=64", "n_negatives=128",
            "eval_users=50", "progress=false", "tracker=none", "num_workers=1", *extra]


def _cmd(world, run, *extra, processes=1, engine="ddp"):
    args = ["-m", "ant_dist.pretrain", *_args(world, run, *extra)]
    if processes == 1 and engine == "ddp":
        return [sys.executable, *args]
    config = str(Path(__file__).parents[1] / "configs/accelerate/zero2.yaml") if engine == "deepspeed" else None
    return launch_command(args, processes, config_file=config, cpu=False)[0]  # _run's environment: _env


def _env(engine="ddp"):
    # DDP on CPU needs ACCELERATE_USE_CPU; DeepSpeed on CPU must not have it (it would fall back to DDP)
    return ENV if engine == "deepspeed" else {**ENV, "ACCELERATE_USE_CPU": "1"}


def _run(cmd, engine="ddp", timeout=600):
    return subprocess.run(cmd, env=_env(engine), capture_output=True, text=True, timeout=timeout)


def _records(run_dir, event=None):
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if event is None or r["event"] == event]


def _params(run_dir):
    return load_file(str(Path(run_dir) / "model" / "model.safetensors"))


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _wait_for(predicate, proc, what, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _kill_tree(proc):
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)


def _ranks(launcher):
    """The training processes of an `accelerate launch` (its direct children)."""
    return psutil.Process(launcher.pid).children()


# ----------------------------------------------------------------------------- launches
@pytest.mark.slow
def test_two_process_launch_trains_logs_and_exports(world):
    # no WANDB_MODE and no key: the run must choose offline mode itself
    env = {k: v for k, v in _env().items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    res = subprocess.run(_cmd(world, "two", "tracker=wandb", "max_epochs=3", "checkpoint_every=10", "log_every=2",
                              processes=2), env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    run = world / "runs" / "two"
    assert _records(run, "start")[0]["world_size"] == 2
    train = [r["train/rec_loss"] for r in _records(run, "train")]
    assert np.mean(train[-3:]) < np.mean(train[:3]) - 0.3, train
    end = _records(run, "end")[0]
    assert len(end["param_digests"]) == 2 and len(set(end["param_digests"])) == 1
    assert "val/Food/ndcg@10" in end["validation"] and "val/Home/recall@10" in end["validation"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000040", "step-00000048"]
    assert (run / "model" / "model.safetensors").is_file() and (run / "model" / "model_config.json").is_file()
    assert (run / "pretrain_config.yaml").is_file()
    # the offline W&B run holds the logged keys
    offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1
    blob = offline[0].read_bytes()
    for key in (b"train/rec_loss", b"train/align_loss", b"train/grad_norm", b"train/lr", b"perf/positions_per_s",
                b"val/Food/ndcg@10"):
        assert key in blob, key


# loss -> (options, the loss path of a 2-process step)
EQUIVALENCE_LOSSES = {"exact": (["loss=exact"], "exact-dense"),
                      "exact-sharded": (["loss=exact", "exact_chunk=128"], "exact-split"),
                      "sampled": (["loss=sampled"], "sampled"),
                      "sampled-inbatch": (["loss=sampled", "in_batch_negatives=true"], "sampled+global-in-batch"),
                      # UniSRec's two tasks, in-batch over the global batch (its seq-seq weight on: the
                      # augmented views are drawn per user, the same on any process count)
                      "unisrec": (["model=unisrec", "align_weight=0.5"], "unisrec-in-batch+gathered")}


@pytest.mark.slow
@pytest.mark.parametrize("loss", sorted(EQUIVALENCE_LOSSES))
def test_two_processes_step_like_one_process_on_the_joint_batch(world, loss):
    # no randomness inside the step (dropout, gate noise off; one negative set for both
    # processes), no per-process term (R_c off): then DDP with B per process must equal one
    # process with 2B, and differ clearly from one process with B. "exact" takes the dense
    # logits (the catalog fits one chunk); "exact-sharded" the chunked path, where 2 processes
    # split the catalog between them and 1 process streams all of it; "sampled-inbatch" adds
    # the global batch's targets as negatives (gathered across the processes); "unisrec" UniSRec's
    # pre-training (model/unisrec.py)
    kind, path = EQUIVALENCE_LOSSES[loss]
    exact = ["gate_noise=false", "dropout=0", "irl_dropout=0", "align_weight=0", "shared_negatives=true",
             "max_steps=2", "warmup_steps=1", *kind, "eval_users=10", "log_every=1"]
    one = _run(_cmd(world, f"eq1-{loss}", *exact, "batch_size=64"))
    two = _run(_cmd(world, f"eq2-{loss}", *exact, "batch_size=64", processes=2))
    half = _run(_cmd(world, f"eqh-{loss}", *exact, "batch_size=32"))
    for res in (one, two, half):
        assert res.returncode == 0, res.stderr[-3000:]
    p1, p2, ph = (_params(world / "runs" / f"eq{n}-{loss}") for n in ("1", "2", "h"))
    assert _max_diff(p1, p2) < 1e-5
    assert _max_diff(p1, ph) > 1e-3
    assert _records(world / "runs" / f"eq2-{loss}", "train")[0]["loss_path"] == path

    # the precision matrix's engine half: the same step in bf16 (the GPU default) under DDP and
    # DeepSpeed ZeRO-2 through the real entry point; the first step's loss within bf16 rounding
    # of the fp32 one (tolerances and their reasons: tests/precision_step.py), on the same path
    ref = _records(world / "runs" / f"eq1-{loss}", "train")[0]
    for engine in ("ddp", "deepspeed"):
        run = f"eq-bf16-{engine}-{loss}"
        res = _run(_cmd(world, run, *exact, "batch_size=64", "precision=bf16", "eval_every=-1", processes=2,
                        engine=engine), engine=engine, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        got = _records(world / "runs" / run, "train")[0]
        assert got["loss_path"] == path
        assert 0 < abs(got["train/rec_loss"] - ref["train/rec_loss"]) / ref["train/rec_loss"] < LOSS_RTOL, (got, ref)
        assert abs(got["train/grad_norm"] - ref["train/grad_norm"]) / ref["train/grad_norm"] < GRAD_RTOL, (got, ref)


@pytest.mark.slow
def test_bf16_engines_with_gathered_negatives_and_one_process_chunks(world):
    # the precision matrix's cells the equivalence test cannot hold: negatives drawn per process
    # and all-gathered (no 1-process equal, so the fp32 reference is the same 2-process DDP run),
    # under DDP and ZeRO-2; and the chunked exact loss of ONE process under DeepSpeed's autocast
    same = ["gate_noise=false", "dropout=0", "irl_dropout=0", "align_weight=0", "max_steps=1", "log_every=1",
            "eval_every=-1", "checkpoint_every=0"]
    cells = {"gathered": (["loss=sampled", "shared_negatives=false"], 2, "sampled+gathered"),
             "chunked": (["loss=exact", "exact_chunk=128"], 1, "exact-chunked")}
    for name, (opts, processes, path) in cells.items():
        ref = _run(_cmd(world, f"bf16-cell-{name}-fp32", *same, *opts, processes=processes))
        assert ref.returncode == 0, ref.stderr[-3000:]
        fp32 = _records(world / "runs" / f"bf16-cell-{name}-fp32", "train")[0]
        engines = ("ddp", "deepspeed") if processes == 2 else ("deepspeed",)
        for engine in engines:
            run = f"bf16-cell-{name}-{engine}"
            res = _run(_cmd(world, run, *same, *opts, "precision=bf16", processes=processes, engine=engine),
                       engine=engine, timeout=900)
            assert res.returncode == 0, res.stderr[-3000:]
            got = _records(world / "runs" / run, "train")[0]
            assert fp32["loss_path"] == got["loss_path"] == path
            rel = abs(got["train/rec_loss"] - fp32["train/rec_loss"]) / fp32["train/rec_loss"]
            assert 0 < rel < LOSS_RTOL, (name, engine, got, fp32)
            assert abs(got["train/grad_norm"] - fp32["train/grad_norm"]) / fp32["train/grad_norm"] < GRAD_RTOL


@pytest.mark.slow
def test_deepspeed_zero2_launch(world):
    res = _run(_cmd(world, "zero2", "max_epochs=2", "checkpoint_every=8", processes=2, engine="deepspeed"),
               engine="deepspeed", timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    run = world / "runs" / "zero2"
    start = _records(run, "start")[0]
    assert start["engine"] == "deepspeed" and start["world_size"] == 2
    train = [r["train/rec_loss"] for r in _records(run, "train")]
    assert train[-1] < train[0]
    assert len(set(_records(run, "end")[0]["param_digests"])) == 1
    assert (run / "model" / "model.safetensors").is_file()


def test_deepspeed_bf16_is_autocast_over_fp32_weights():
    from ant_dist.train.engine import deepspeed_precision

    ds = {"bf16": {"enabled": False}, "fp16": {"enabled": False}}  # the JSON's "auto" as accelerate fills it
    deepspeed_precision(ds, bf16=True)
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    fp32 = {"bf16": {"enabled": False}}
    deepspeed_precision(fp32, bf16=False)
    assert "torch_autocast" not in fp32
    own = {"bf16": {"enabled": True}}  # the user's JSON asks for DeepSpeed's pure bf16: left alone
    deepspeed_precision(own, bf16=True)
    assert "torch_autocast" not in own


@pytest.mark.slow
def test_deepspeed_launch_with_precision_bf16_computes_in_bf16(world):
    # the first step's loss (before any update; no randomness, one negative set) under ZeRO-2 with
    # precision=bf16 must differ from the fp32 loss by bf16 rounding: not 0 (bf16 ignored, the
    # JSON's "auto" left false) and not more (a broken forward); weights stay fp32
    exact = ["gate_noise=false", "dropout=0", "irl_dropout=0", "shared_negatives=true", "max_steps=1",
             "log_every=1", "eval_every=-1", "checkpoint_every=0"]
    ref = _run(_cmd(world, "fp32-step", *exact, "precision=fp32"))
    res = _run(_cmd(world, "ds-bf16", *exact, "precision=bf16", processes=2, engine="deepspeed"),
               engine="deepspeed", timeout=900)
    for r in (ref, res):
        assert r.returncode == 0, r.stderr[-3000:]
    a = _records(world / "runs" / "fp32-step", "train")[0]["train/rec_loss"]
    b = _records(world / "runs" / "ds-bf16", "train")[0]["train/rec_loss"]
    assert 1e-5 < abs(a - b) / a < 2e-2, (a, b)
    assert {v.dtype for v in _params(world / "runs" / "ds-bf16").values()} == {torch.float32}


@pytest.mark.slow
def test_memory_mapped_features_train_like_features_in_memory(world):
    # the loader workers gather each batch's rows from the memory maps: same numbers as the
    # in-memory gather (only the placement differs)
    common = ["max_steps=4", "eval_users=20", "align_weight=0.01"]
    for on in ("device", "mmap"):
        res = _run(_cmd(world, f"feat-{on}", *common, f"features_on={on}"))
        assert res.returncode == 0, res.stderr[-3000:]
        assert _records(world / "runs" / f"feat-{on}", "start")[0]["features_on"] == on
    a, b = _params(world / "runs" / "feat-device"), _params(world / "runs" / "feat-mmap")
    assert _max_diff(a, b) < 1e-6


@pytest.mark.slow
def test_compiled_models_train_like_eager_ones(world, tmp_path):
    # compile=true runs inductor kernels (its cache fills: the compilation really happened) and
    # must step like the eager model up to float reordering; no randomness inside the step,
    # because compiled kernels draw random numbers from other streams than eager ones
    # (Adam moves every parameter by ~lr = 1e-2 a step: far above the tolerance)
    exact = ["gate_noise=false", "dropout=0", "irl_dropout=0", "max_steps=3", "eval_every=-1", "lr=1e-2",
             "warmup_steps=1"]
    cache = tmp_path / "inductor"
    eager = _run(_cmd(world, "eager", *exact))
    env = {**ENV, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    compiled = subprocess.run(_cmd(world, "compiled", *exact, "compile=true"), env=env, capture_output=True,
                              text=True, timeout=900)
    for res in (eager, compiled):
        assert res.returncode == 0, res.stderr[-3000:]
    assert any(cache.rglob("*.py")), "no inductor kernel was generated"
    a, b = _params(world / "runs" / "eager"), _params(world / "runs" / "compiled")
    assert a.keys() == b.keys()  # compiled in place: checkpoints keep the plain parameter names
    assert _max_diff(a, b) < 1e-4


# ----------------------------------------------------------------------------- interruptions
@pytest.mark.slow
def test_sigkill_one_rank_then_resume_equals_uninterrupted(world):
    common = ["max_epochs=3", "checkpoint_every=4"]
    ref = _run(_cmd(world, "ref", *common, processes=2))
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = world / "runs" / "killed"
    proc = subprocess.Popen(_cmd(world, "killed", *common, processes=2), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: (run / "checkpoints" / "step-00000008").is_dir(), proc, "the second checkpoint")
        _ranks(proc)[-1].kill()  # one rank dies mid-epoch (16 steps per epoch); the launcher stops the rest
        proc.wait(timeout=120)
    finally:
        _kill_tree(proc)
    assert proc.returncode != 0
    assert not (run / "model").exists()
    res = _run(_cmd(world, "killed", *common, processes=2))
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = _records(run, "start")[-1]["resumed_from"]
    assert resumed and int(resumed.rsplit("-", 1)[1]) >= 8
    a, b = _params(world / "runs" / "ref"), _params(run)
    # bitwise on CPU: every random draw is a function of (seed, step, rank), the data order of
    # (seed, epoch), and the checkpoint holds the exact parameters and optimizer state
    assert all(torch.equal(a[k], b[k]) for k in a)


def _trained(run_dir):
    out = {}
    for f in (Path(run_dir) / "trace").glob("rank-*.jsonl"):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            out.setdefault(r["epoch"], []).extend(r["users"])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_on_another_process_count_trains_each_sequence_once(world, before, after):
    run_name = f"resize-{before}-{after}"
    run = world / "runs" / run_name
    common = ["max_epochs=2", "checkpoint_every=3", "trace_batches=true"]
    proc = subprocess.Popen(_cmd(world, run_name, *common, processes=before), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (run / "checkpoints" / "step-00000003").is_dir(), proc, "the first checkpoint")
        targets = _ranks(proc) if before > 1 else [psutil.Process(proc.pid)]
        for p in targets:
            p.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=300)
    finally:
        _kill_tree(proc)
    # each process exits 75; `accelerate launch` itself turns any non-zero child into 1 (and
    # may SIGTERM a process that is still exiting when the first one has)
    assert proc.returncode == (75 if before == 1 else 1), err[-2000:]
    if before > 1:
        assert "exitcode  : 75" in err, err[-2000:]
    stopped = _records(run, "stopped")[0]["step"]
    assert 3 <= stopped < 32
    res = _run(_cmd(world, run_name, *common, processes=after))
    assert res.returncode == 0, res.stderr[-3000:]
    from ant_dist.train.data import Corpus, read_domain

    food = read_domain(world / "shards", "Food", 0)
    corpus = Corpus([food, read_domain(world / "shards", "Home", food.n_items)])
    trained = _trained(run)
    assert sorted(trained) == [0, 1]
    for epoch, users in trained.items():
        assert sorted(users) == sorted(corpus.train_users.tolist()), f"epoch {epoch}"


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_deepspeed_checkpoint_resumes_on_another_process_count(world, before, after):
    # ZeRO-2 shards written by `before` processes are re-cut for `after`. With no randomness in
    # the step and one negative set (the equivalence test's settings), 3 steps + resume + 3 steps
    # must equal 6 uninterrupted steps; Adam's moments matter here: loading the same weights
    # with zeroed moments ends 4e-2 away (measured), far outside the tolerance
    exact = ["gate_noise=false", "dropout=0", "irl_dropout=0", "align_weight=0", "shared_negatives=true",
             "schedule=constant", "warmup_steps=1", "lr=1e-2", "checkpoint_every=0", "eval_every=-1"]
    name = f"ds-resize-{before}-{after}"
    ref = _run(_cmd(world, f"{name}-ref", *exact, "max_steps=6", processes=2, engine="deepspeed"), engine="deepspeed",
               timeout=900)
    first = _run(_cmd(world, name, *exact, "max_steps=3", processes=before, engine="deepspeed"), engine="deepspeed",
                 timeout=900)
    for res in (ref, first):
        assert res.returncode == 0, res.stderr[-3000:]
    second = _run(_cmd(world, name, *exact, "max_steps=6", processes=after, engine="deepspeed"), engine="deepspeed",
                  timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    run = world / "runs" / name
    starts = _records(run, "start")
    assert [(r["world_size"], r["engine"]) for r in starts] == [(before, "deepspeed"), (after, "deepspeed")]
    assert starts[1]["resumed_from"].endswith("step-00000003")
    assert not list((run / "checkpoints").glob(".universal-*"))  # the conversion is removed
    assert _max_diff(_params(world / "runs" / f"{name}-ref"), _params(run)) < 1e-4


@pytest.mark.slow
def test_sigusr1_writes_a_checkpoint_and_exits_75(world):
    run = world / "runs" / "usr1"
    proc = subprocess.Popen(_cmd(world, "usr1", "max_epochs=20", "checkpoint_every=5"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (run / "checkpoints" / "step-00000005").is_dir(), proc, "the first checkpoint")
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=300)
    finally:
        _kill_tree(proc)
    assert proc.returncode == 75, err[-2000:]
    assert "resume=auto" in err
    stopped = _records(run, "stopped")[0]["step"]
    assert (run / "checkpoints" / f"step-{stopped:08d}" / "state.json").is_file()
    assert not (run / "model").exists()


# ----------------------------------------------------------------------------- guards, bad input
@pytest.mark.slow
def test_non_finite_loss_stops_with_the_step_and_term_and_keeps_the_checkpoint(world):
    res = _run(_cmd(world, "nan", "max_epochs=2", "checkpoint_every=4", "fail_at_step=6"))
    assert res.returncode == 3
    assert "step 6" in res.stderr and "recommendation loss" in res.stderr
    assert "Traceback" not in res.stderr
    run = world / "runs" / "nan"
    assert [p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-00000004"]
    saved = load_file(str(run / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert not (run / "model").exists()


@pytest.mark.slow
@pytest.mark.slow
def test_a_second_run_on_the_same_folder_is_refused(world):
    run = world / "runs" / "busy"
    first = subprocess.Popen(_cmd(world, "busy", "max_epochs=1000", "checkpoint_every=0", "eval_every=-1"),
                             env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (run / "metrics.jsonl").is_file() and _records(run, "train"), first, "the first run's steps")
        second = _run(_cmd(world, "busy", "max_steps=2"))
        assert first.poll() is None  # the first run goes on
        steps_before = _records(run, "train")[-1]["step"]
        _wait_for(lambda: _records(run, "train")[-1]["step"] > steps_before, first, "more steps of the first run")
    finally:
        _kill_tree(first)
    assert second.returncode == 2
    assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert len(_records(run, "start")) == 1  # the refused run wrote nothing into the folder


def test_wandb_goes_offline_without_a_key(monkeypatch, tmp_path):
    from ant_dist.train.tracking import choose_wandb_mode, wandb_run_id

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert choose_wandb_mode() == "offline" and os.environ["WANDB_MODE"] == "offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert choose_wandb_mode() == "online" and "WANDB_MODE" not in os.environ
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert choose_wandb_mode() == "disabled"
    # a resumed or requeued run continues the same W&B run: the id depends on the folder only
    assert wandb_run_id(tmp_path / "a") == wandb_run_id(tmp_path / "b" / ".." / "a") != wandb_run_id(tmp_path / "b")


def _copy_world(world, tmp_path):
    shutil.copytree(world / "shards", tmp_path / "shards")
    shutil.copytree(world / "features", tmp_path / "features")
    return tmp_path


def _refused(world_dir, run, *extra, expect):
    res = _run(_cmd(world_dir, run, *extra))
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert expect in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    run_dir = world_dir / "runs" / run
    assert not (run_dir / "model").exists() and not (run_dir / "checkpoints").exists()


@pytest.mark.slow
def test_bad_input_is_refused_with_a_clear_message(world, tmp_path):
    w = _copy_world(world, tmp_path)
    _refused(w, "missing", "domains=[Food,Garden]", expect="domain 'Garden'")
    _refused(w, "unknown-key", "learning_rate=1", expect="learning_rate")
    # an incomplete feature table (an embedding pass that did not finish)
    manifest = json.loads((w / "features/Home/manifest.json").read_text())
    (w / "features/Home/manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    _refused(w, "incomplete", expect="incomplete")
    (w / "features/Home/manifest.json").write_text(json.dumps(manifest))
    # a feature table whose rows do not match the catalog
    text = np.load(w / "features/Food/text.npy")
    np.save(w / "features/Food/text.npy", text[:-5])
    _refused(w, "rows", expect="rows")
    np.save(w / "features/Food/text.npy", text)
    # feature tables embedded from other shards (the catalog was rewritten since)
    catalog = pq.read_table(w / "shards/Food/catalog.parquet")
    pq.write_table(catalog, w / "shards/Food/catalog.parquet", compression="gzip")
    _refused(w, "other-shards", expect="other shards")
    shutil.copy(world / "shards/Food/catalog.parquet", w / "shards/Food/catalog.parquet")
    # a domain with no user sequences
    inter = pq.read_table(w / "shards/Home/interactions.parquet")
    pq.write_table(inter.slice(0, 0), w / "shards/Home/interactions.parquet")
    _refused(w, "empty", expect="no user sequences")
