"""The embedding pass on tiny random encoders: correctness per row, 2 processes, kill/resume."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from ant_dist.pipeline.launcher import launch_command
from ant_dist.config import PackConfig, SynthConfig
from ant_dist.features.feature_table import FeatureTableError, load_features, verify
from ant_dist.data.pack import pack_domain
from ant_dist.data.shards import iter_shard_samples, shard_paths
from ant_dist.data.synth import synthesize
from ant_dist.features.encoders import ImageEncoder, TextEncoder, minilm_path, save_random_swin
from ant_dist.runtime.locking import exclusive_dir_lock

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="session")
def encoders(tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertModel

    root = tmp_path_factory.mktemp("encoders")
    tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64, max_position_embeddings=128))
    bert.save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    save_random_swin(root / "swin", image_size=32, embed_dim=16)
    return str(root / "bert"), str(root / "swin")


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    manifest = synthesize(SynthConfig(out=str(root / "raw"), aux_domains=["Food"], target_domains=["Office"],
                                      items_per_domain=500, users_per_domain=900, target_items_per_domain=150,
                                      target_users_per_domain=200, image_size=32))
    for d in manifest["aux"] + manifest["target"]:
        pack_domain(PackConfig(domain=d["name"], meta=d["meta"], interactions=d["interactions"], images=d["images"],
                               out=str(root / "shards"), shard_max_items=60, workers=2, progress=False))
    return root / "shards"


def _embed_cmd(shards, out, encoders, *extra, processes=1):
    text, image = encoders
    args = ["-m", "ant_dist.embed", f"shards={shards}", f"out={out}", f"text_encoder={text}",
            f"image_encoder={image}", "batch_size=16", "num_workers=1", "progress=false", *extra]
    if processes == 1:
        return [sys.executable, *args]
    return launch_command(args, processes, cpu=False)[0]  # the tests' environment has ACCELERATE_USE_CPU




def _run(cmd, **kw):
    env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, **kw)


def _tables(out):
    return {d: {n: np.load(Path(out) / d / f"{n}.npy") for n in ("text", "image", "price", "has_image", "done")}
            for d in ("Food", "Office")}


def _assert_same_tables(a, b):
    """Equal up to float16 rounding (other batch compositions may round the last bit differently)."""
    one, two = _tables(a), _tables(b)
    for d in one:
        for name in one[d]:
            np.testing.assert_allclose(one[d][name].astype(np.float32), two[d][name].astype(np.float32),
                                       atol=2e-3, equal_nan=True)


@pytest.fixture(scope="session")
def single_run(shards, encoders, tmp_path_factory):
    out = tmp_path_factory.mktemp("features1")
    res = _run(_embed_cmd(shards, out, encoders))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_rows_equal_encoder_applied_to_the_item_alone(single_run, shards, encoders):
    text_enc, image_enc = TextEncoder(encoders[0]), ImageEncoder(encoders[1])
    feats = load_features(single_run / "Food", expect_shards=shards / "Food")
    samples = list(iter_shard_samples(shard_paths(shards / "Food")))
    checked_images = 0
    for s in samples[::37]:
        row = json.loads(s["json"])["row"]
        alone = text_enc.encode([s["txt"].decode()])[0].numpy()
        np.testing.assert_allclose(feats["text"][row].astype(np.float32), alone, atol=2e-3, rtol=2e-3)
        ext = next((e for e in ("jpg", "png", "webp") if e in s), None)
        if ext:
            img = Image.open(io.BytesIO(s[ext])).convert("RGB")
            np.testing.assert_allclose(feats["image"][row].astype(np.float32), image_enc.encode([img])[0].numpy(),
                                       atol=2e-3, rtol=2e-3)
            checked_images += 1
            assert feats["has_image"][row]
        else:
            assert not feats["has_image"][row] and not feats["image"][row].any()
    assert checked_images > 3
    assert verify(single_run / "Food") == []
    manifest = feats["manifest"]
    assert manifest["complete"] and manifest["rows"] == len(samples)
    assert manifest["text"]["dim"] == 32 and manifest["image"]["dim"] == 32


def test_two_processes_write_every_row_once_and_match_one_process(single_run, shards, encoders, tmp_path):
    res = _run(_embed_cmd(shards, tmp_path, encoders, processes=2))
    assert res.returncode == 0, res.stderr[-3000:]
    for d in ("Food", "Office"):
        run = json.loads((tmp_path / d / "manifest.json").read_text())["runs"][-1]
        assert run["processes"] == 2  # a real 2-process launch, not one process
    assert "process 1:" in res.stdout
    rows = [int(line.split(":")[1].split()[0]) for line in res.stdout.splitlines() if line.strip().startswith("process ")]
    total = sum(json.loads((tmp_path / d / "manifest.json").read_text())["rows"] for d in ("Food", "Office"))
    assert len(rows) == 2 and sum(rows) == total and min(rows) > 0  # each item once, both did work
    _assert_same_tables(single_run, tmp_path)


def test_kill_one_process_then_resume_recomputes_only_missing_rows(single_run, shards, encoders, tmp_path):
    cmd = _embed_cmd(shards, tmp_path, encoders, "batch_size=2", "flush_every=1", processes=2)
    env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    done_file = tmp_path / "Food" / "done.npy"
    deadline = time.time() + 300
    killed = False
    while time.time() < deadline and launcher.poll() is None:
        if done_file.exists():
            try:
                frac = np.load(done_file, mmap_mode="r").mean()
            except ValueError:
                frac = 0
            if frac > 0.05:
                workers = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                           if "ant_dist.embed" in " ".join(p.cmdline())]
                workers[-1].send_signal(signal.SIGKILL)
                killed = True
                break
        time.sleep(0.01)
    assert killed, "the pass finished before it could be killed"
    try:
        launcher.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
    manifests = {d: json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("Food", "Office")}
    assert not any(m["complete"] for m in manifests.values())
    done_before = {d: int(np.load(tmp_path / d / "done.npy").sum()) for d in manifests}
    assert 0 < done_before["Food"] < manifests["Food"]["rows"]

    res = _run(_embed_cmd(shards, tmp_path, encoders, processes=2))
    assert res.returncode == 0, res.stderr[-3000:]
    for d, m in manifests.items():
        after = json.loads((tmp_path / d / "manifest.json").read_text())
        assert after["complete"]
        assert after["runs"][-1]["rows_computed"] == m["rows"] - done_before[d]
    _assert_same_tables(single_run, tmp_path)


@pytest.mark.parametrize("stop_signal", [signal.SIGUSR1, signal.SIGTERM])
def test_stop_signal_marks_finished_rows_exits_75_and_a_rerun_completes(single_run, shards, encoders, tmp_path,
                                                                         stop_signal):
    proc = subprocess.Popen(_embed_cmd(shards, tmp_path, encoders, "batch_size=2", "flush_every=1"),
                            env={**ENV, "ACCELERATE_USE_CPU": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    done_file = tmp_path / "Food" / "done.npy"
    deadline = time.time() + 300
    try:
        while True:
            assert proc.poll() is None, "the pass ended before it could be signalled"
            assert time.time() < deadline, "no row was done in 300 s"
            try:
                if done_file.exists() and np.load(done_file, mmap_mode="r").any():
                    break
            except ValueError:  # the table is being created
                pass
            time.sleep(0.01)
        proc.send_signal(stop_signal)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 75, err[-2000:]
    assert "stopped by signal" in err and "Traceback" not in err, err[-2000:]
    rows = {d: json.loads((tmp_path / d / "manifest.json").read_text())["rows"] for d in ("Food", "Office")}
    done_before = sum(int(np.load(tmp_path / d / "done.npy").sum()) for d in rows)
    assert 0 < done_before < sum(rows.values())  # stopped early, with its finished rows kept
    res = _run(_embed_cmd(shards, tmp_path, encoders))
    assert res.returncode == 0, res.stderr[-3000:]
    runs = {d: json.loads((tmp_path / d / "manifest.json").read_text())["runs"][-1] for d in rows}
    assert sum(r["rows_computed"] for r in runs.values()) == sum(rows.values()) - done_before
    _assert_same_tables(single_run, tmp_path)


def test_mismatched_rerun_is_refused_and_overwrite_starts_over(single_run, encoders, shards, tmp_path):
    out = tmp_path / "f"
    shutil.copytree(single_run, out)
    res = _run(_embed_cmd(shards, out, encoders, "text_pooling=mean"))
    assert res.returncode == 2 and "pooling" in res.stderr and "overwrite=true" in res.stderr
    res = _run(_embed_cmd(shards, out, encoders, "text_pooling=mean", "overwrite=true"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((out / "Food" / "manifest.json").read_text())["text"]["pooling"] == "mean"
    np.load(out / "Food" / "text.npy", mmap_mode="r+")[3, 0] = np.nan
    assert any("NaN" in p for p in verify(out / "Food"))


def test_corrupt_image_gets_zero_vector_and_is_counted(shards, encoders, tmp_path):
    bad = tmp_path / "shards"
    shutil.copytree(shards / "Office", bad / "Office")
    shard = sorted((bad / "Office").glob("items-*.tar"))[0]
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    victim = next(m.name.split(".")[0] for m, _ in members if m.name.endswith((".jpg", ".png")))
    with tarfile.open(shard, "w") as tf:
        for m, data in members:
            if m.name.startswith(victim + ".") and m.name.endswith((".jpg", ".png")):
                data = b"\xff\xd8\xff\xe0 definitely not a jpeg" + data[:40]
                m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    res = _run(_embed_cmd(bad, tmp_path / "f", encoders))
    assert res.returncode == 0, res.stderr[-2000:]
    manifest = json.loads((tmp_path / "f" / "Office" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["image_decode_failures"] == 1
    row = next(json.loads(s["json"])["row"] for s in iter_shard_samples(str(shard)) if s["__key__"] == victim)
    feats = load_features(tmp_path / "f" / "Office")
    assert not feats["has_image"][row] and not feats["image"][row].any()


def test_incomplete_table_is_refused(single_run, tmp_path):
    out = tmp_path / "f"
    shutil.copytree(single_run / "Office", out)
    m = json.loads((out / "manifest.json").read_text())
    m["complete"] = False
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FeatureTableError, match="incomplete"):
        load_features(out)


def _run_group(cmd, timeout):
    """Like _run, but the command and every process it starts are SIGKILLed if it runs too long."""
    proc = subprocess.Popen(cmd, env={**ENV, "ACCELERATE_USE_CPU": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the ranks of a launch, should any be left
        except ProcessLookupError:
            pass
        proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_pass_on_a_locked_out_is_refused_by_every_rank(shards, encoders, tmp_path):
    out = tmp_path / "f"
    with exclusive_dir_lock(out, "embedding pass"):  # as a running pass holds it
        res = _run_group(_embed_cmd(shards, out, encoders), timeout=300)
        assert res.returncode == 2, res.stderr[-3000:]
        [line] = [x for x in res.stderr.splitlines() if x.startswith("embed: error:")]
        assert line.startswith(f"embed: error: {out} is in use by another embedding pass (pid {os.getpid()} on host ")
        # With 2 ranks every rank learns of the refusal (by broadcast) and stops. Whether rank 1
        # prints its line before the launcher, seeing rank 0 exit, terminates it is a race, so
        # only the refusal itself is asserted here.
        res = _run_group(_embed_cmd(shards, out, encoders, processes=2), timeout=300)
        assert res.returncode != 0
        errors = [x for x in res.stderr.splitlines() if x.startswith("embed: error:")]
        assert errors and all(f"(pid {os.getpid()} on host " in e for e in errors), res.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # refused before writing anything
