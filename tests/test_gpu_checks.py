"""bench/gpu_checks.sh, the script a lent GPU runs, end to end on CPU at toy sizes so that it
cannot rot between GPU sessions: every part must run and report its figures, and a failing part
must make the script exit non-zero."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gpu_checks(tmp_path, *args):
    env = {**os.environ, "PY": os.environ.get("PY", __import__("sys").executable), "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    out = tmp_path / "checks.json"
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu_checks.sh"), "--out", str(out), "--work",
                          str(tmp_path / "work"), *args], env=env, capture_output=True, text=True, timeout=1500)
    return res, (json.loads(out.read_text()) if out.is_file() else None)


@pytest.mark.slow
def test_every_part_runs_on_cpu_at_toy_sizes(tmp_path):
    res, report = _gpu_checks(tmp_path, "--device", "cpu", "--tiny")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    parts = report["parts"]
    assert set(parts) == {"precision", "pretrain", "relearn", "encoders"}
    assert all(p["ok"] for p in parts.values())
    precision = parts["precision"]["cases"]
    # the one-process matrix: 5 pre-training paths + 9 re-learning methods x (dense, chunked)
    assert len(precision) == 5 + 9 * 2 and all(c["path_fp32"] == c["path_bf16"] for c in precision.values())
    assert "2 passed" in parts["precision"]["pytest"]  # the one-process matrix and the evaluation check
    for loss in ("sampled:128", "exact"):
        r = parts["pretrain"][loss]
        assert r["steps"] == 2 and r["positions_per_s"] > 0 and r["epoch_minutes_over_21.4M"] > 0
    assert parts["pretrain"]["exact"]["loss_paths"] == ["exact-chunked"]  # the catalog is 4 chunks
    assert parts["pretrain"]["sampled:128"]["loss_paths"] == ["sampled"]
    assert parts["relearn"]["loss_paths"] == ["exact-chunked"] and parts["relearn"]["steps"] == 3
    assert parts["encoders"]["texts_per_s"] > 0 and parts["encoders"]["images_per_s"] > 0


def test_a_failing_part_fails_the_script(tmp_path):
    res, report = _gpu_checks(tmp_path, "--device", "no-such-device", "--tiny", "--only", "encoders")
    assert res.returncode != 0
    assert report["parts"]["encoders"]["ok"] is False and "FAILED: encoders" in res.stderr
