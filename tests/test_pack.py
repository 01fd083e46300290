"""The packer on hand-written raw files in all three formats, broken records included."""

import gzip
import io
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
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ant_dist.config import PackConfig, SynthConfig
from ant_dist.data.cleaning import unsafe_key
from ant_dist.data.filtering import k_core_filter
from ant_dist.data.pack import PackError, pack_domain
from ant_dist.data.shards import iter_shard_samples, shard_paths
from ant_dist.data.synth import synthesize
from ant_dist.runtime.locking import exclusive_dir_lock

ROOT = Path(__file__).resolve().parents[1]


def _jpeg(colour=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="JPEG")
    return buf.getvalue()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (0, 90, 200)).save(buf, format="PNG")
    return buf.getvalue()


def _amazon2018(tmp_path: Path) -> tuple[Path, Path, Path]:
    lines = [
        json.dumps({"asin": "A1", "title": "Good &amp; Nice <b>thing</b>", "brand": "Br",
                    "category": ["Cat", "Sub1", "Sub1"], "price": "$1,299.99"}).encode(),
        b'{"asin": "X", "title": ',                                             # malformed
        json.dumps({"title": "no id"}).encode(),                                # missing id
        json.dumps({"asin": "A1", "title": "dup"}).encode(),                    # duplicate
        json.dumps({"asin": "A2", "title": "Two", "price": "$10.99 - $24.99"}).encode(),
        json.dumps({"asin": "A3", "title": "Three", "price": "-5"}).encode(),   # negative price
        json.dumps({"asin": "A4", "title": "Four", "price": "$99,999,999.00"}).encode(),  # absurd
        b'{"asin": "A5", "title": "Caf\xe9 five", "price": "3"}',               # not UTF-8
        json.dumps({"asin": "A6", "title": "", "category": [], "brand": ""}).encode(),  # empty text
        b"",                                                                    # blank: ignored
        json.dumps({"asin": "A7", "title": "Seven"}).encode(),
        b"[1, 2]",                                                              # not an object
    ]
    meta = tmp_path / "meta_Test.json.gz"
    with gzip.open(meta, "wb") as fh:
        fh.write(b"\n".join(lines) + b"\n")
    ratings = tmp_path / "Test.csv"
    ratings.write_text("\n".join([
        "A1,u1,5.0,10", "A2,u1,4.0,20", "A3,u1,3.0,30",
        "A2,u2,5.0,5", "A1,u2,5.0,5", "A5,u2,1.0,7",          # tie at t=5: ordered by item id
        "A3,u3,2.0,1", "A7,u3,2.0,2",
        "A1,u4,1.0,1",
        "A2,u5,1.0,1", "A3,u5,1.0,2", "A1,u5,1.0,3",
        "A1,u9,5.0",                 # line 13: malformed row (3 fields)
        "A1,u9,5.0,notatime",        # line 14: bad timestamp
        ",u9,5.0,12",                # line 15: missing item
        "ZZZ,u1,5.0,40",             # unknown item
        "A1,u1,5.0,10",              # exact duplicate
    ]) + "\n")
    images = tmp_path / "images"
    images.mkdir()
    (images / "A1.jpg").write_bytes(_jpeg())
    (images / "A2.png").write_bytes(_png()[:60])       # truncated
    (images / "A3.txt").write_text("not an image extension")
    return meta, ratings, images


def _read_outputs(out: Path):
    catalog = pq.read_table(out / "catalog.parquet").to_pylist()
    inter = pq.read_table(out / "interactions.parquet").to_pylist()
    report = json.loads((out / "pack_report.json").read_text())
    return catalog, inter, report


def test_amazon2018_fixture_exact_outputs(tmp_path):
    meta, ratings, images = _amazon2018(tmp_path)
    cfg = PackConfig(domain="Test", meta=str(meta), interactions=str(ratings), images=str(images),
                     out=str(tmp_path / "shards"), min_core=2, max_seq_len=2, max_bad_fraction=0.5,
                     workers=1, progress=False)
    pack_domain(cfg)
    catalog, inter, report = _read_outputs(tmp_path / "shards" / "Test")
    # k-core(2) by hand: u4, A5, A7 go first, then u3, then nothing more.
    assert [c["item_id"] for c in catalog] == ["A1", "A2", "A3"]
    assert [c["row"] for c in catalog] == [0, 1, 2]
    assert catalog[0]["price"] == pytest.approx(1299.99)
    assert catalog[1]["price"] == pytest.approx(17.99)
    assert catalog[2]["price"] is None                       # negative price -> null
    assert [c["has_image"] for c in catalog] == [True, False, False]  # A2's image is truncated
    assert catalog[0]["image_ext"] == "jpg"
    assert inter == [
        {"user_id": "u1", "items": [1, 2], "timestamps": [20, 30]},   # last 2 of A1, A2, A3
        {"user_id": "u2", "items": [1, 0], "timestamps": [5, 5]},     # same-second tie kept in file order
        {"user_id": "u5", "items": [2, 0], "timestamps": [2, 3]},
    ]
    assert report["status"] == "complete"
    assert report["skipped"] == {"malformed_json": 2, "missing_item_id": 1, "duplicate_item": 1,
                                 "empty_text": 1, "malformed_row": 1, "bad_timestamp": 1,
                                 "missing_field": 1, "unknown_item": 1, "duplicate_interaction": 1}
    assert report["repaired"] == {"negative_price": 1, "absurd_price": 1, "non_utf8_text": 1,
                                  "undecodable_image": 1}
    assert report["meta"]["records"] == 12 - 1  # blank line is not a record
    assert report["examples"]["malformed_row"][0].startswith("Test.csv:13")
    assert report["examples"]["bad_timestamp"][0].startswith("Test.csv:14")
    assert report["examples"]["missing_field"][0].startswith("Test.csv:15")
    assert report["examples"]["malformed_json"][0].startswith("meta_Test.json.gz:2")
    assert report["filtering"]["dropped_by_max_seq_len"] == 2

    # the shards hold every kept item exactly once, with text, fields and image bytes intact
    samples = list(iter_shard_samples(shard_paths(tmp_path / "shards" / "Test")))
    assert sorted(unsafe_key(s["__key__"]) for s in samples) == ["A1", "A2", "A3"]
    by_id = {json.loads(s["json"])["item_id"]: s for s in samples}
    assert by_id["A1"]["txt"].decode() == "Good & Nice thing Sub1 Br"
    assert by_id["A1"]["jpg"] == (images / "A1.jpg").read_bytes()
    assert "png" not in by_id["A2"] and json.loads(by_id["A2"]["json"])["has_image"] is False
    assert json.loads(by_id["A3"]["json"]) == {"item_id": "A3", "domain": "Test", "row": 2, "price": None,
                                               "price_norm": None, "has_image": False}


def test_too_much_bad_input_is_a_clear_error_and_writes_no_catalog(tmp_path):
    meta, ratings, images = _amazon2018(tmp_path)
    out = tmp_path / "shards"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "pack.py"), "domain=Test", f"meta={meta}",
                           f"interactions={ratings}", f"out={out}", "min_core=2", "progress=false"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "malformed" in proc.stderr and "max_bad_fraction" in proc.stderr
    assert not (out / "Test" / "catalog.parquet").exists()
    assert json.loads((out / "Test" / "pack_report.json").read_text())["status"] == "failed"


def test_nothing_left_after_k_core_is_an_error(tmp_path):
    meta, ratings, images = _amazon2018(tmp_path)
    cfg = PackConfig(domain="Test", meta=str(meta), interactions=str(ratings), out=str(tmp_path / "o"),
                     min_core=50, max_bad_fraction=0.5, workers=1, progress=False)
    with pytest.raises(PackError, match="no interactions survive 50-core"):
        pack_domain(cfg)
    assert not (tmp_path / "o" / "Test" / "catalog.parquet").exists()


def test_truncated_gzip_metadata_is_counted_not_fatal(tmp_path):
    meta, ratings, images = _amazon2018(tmp_path)
    data = gzip.compress(b"\n".join(json.dumps({"asin": f"A{i}", "title": f"t{i}"}).encode() for i in range(1, 8)))
    meta.write_bytes(data[: len(data) - 12])  # cut inside the stream (CRC and size trailer gone)
    report = pack_domain(PackConfig(domain="Test", meta=str(meta), interactions=str(ratings), out=str(tmp_path / "o"),
                                    min_core=2, max_bad_fraction=0.5, workers=1, progress=False))
    assert report["skipped"]["corrupt_file"] == 1
    assert report["examples"]["corrupt_file"][0].startswith("meta_Test.json.gz:")


def test_amazon2023_format(tmp_path):
    meta = tmp_path / "meta_X.jsonl"
    meta.write_text("\n".join(json.dumps(r) for r in [
        {"parent_asin": "P1", "title": "One", "store": "S", "categories": ["Top", "Mid"], "price": 12.5},
        {"parent_asin": "P2", "title": "Two", "store": None, "categories": [], "price": None},
        {"parent_asin": "P3", "title": "Three", "price": "from 3.00"},
    ]) + "\n")
    reviews = tmp_path / "X.jsonl"
    rows = [("U1", "P1", 1000), ("U1", "P2", 2000), ("U2", "P2", 1500), ("U2", "P3", 500),
            ("U1", "P3", 3000), ("U2", "P1", 1600)]
    reviews.write_text("\n".join(json.dumps({"user_id": u, "parent_asin": p, "timestamp": t, "rating": 5})
                                 for u, p, t in rows) + "\n")
    pack_domain(PackConfig(domain="X", format="amazon2023", meta=str(meta), interactions=str(reviews),
                           out=str(tmp_path / "o"), min_core=2, workers=1, progress=False))
    catalog, inter, report = _read_outputs(tmp_path / "o" / "X")
    assert [(c["item_id"], c["price"]) for c in catalog] == [("P1", 12.5), ("P2", None), ("P3", 3.0)]
    assert inter == [{"user_id": "U1", "items": [0, 1, 2], "timestamps": [1000, 2000, 3000]},
                     {"user_id": "U2", "items": [2, 1, 0], "timestamps": [500, 1500, 1600]}]
    samples = {json.loads(s["json"])["item_id"]: s["txt"].decode()
               for s in iter_shard_samples(shard_paths(tmp_path / "o" / "X"))}
    assert samples["P1"] == "One Mid S"


def test_table_format_csv_items_parquet_interactions(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png())
    (tmp_path / "items.csv").write_text("id,text,price,image\na,Alpha item,2.5,img/a.png\n"
                                        "b,Beta item,,\nc,Gamma item,1e9,\n")
    pq.write_table(pa.table({"user": ["x", "x", "y", "y", "z"], "item": ["a", "b", "b", "a", "c"],
                             "timestamp": [1, 2, 1, 2, 9]}), tmp_path / "inter.parquet")
    pack_domain(PackConfig(domain="T", format="table", meta=str(tmp_path / "items.csv"),
                           interactions=str(tmp_path / "inter.parquet"), out=str(tmp_path / "o"),
                           min_core=2, workers=1, progress=False))
    catalog, inter, report = _read_outputs(tmp_path / "o" / "T")
    assert [(c["item_id"], c["price"], c["has_image"], c["image_ext"]) for c in catalog] == [
        ("a", 2.5, True, "png"), ("b", None, False, None)]
    assert inter == [{"user_id": "x", "items": [0, 1], "timestamps": [1, 2]},
                     {"user_id": "y", "items": [1, 0], "timestamps": [1, 2]}]
    assert report["repaired"] == {"absurd_price": 1}


def _k_core_reference(pairs, k):
    pairs = list(pairs)
    while True:
        uc, ic = {}, {}
        for u, i in pairs:
            uc[u] = uc.get(u, 0) + 1
            ic[i] = ic.get(i, 0) + 1
        kept = [(u, i) for u, i in pairs if uc[u] >= k and ic[i] >= k]
        if len(kept) == len(pairs):
            return kept
        pairs = kept


@pytest.mark.parametrize("seed", range(5))
def test_k_core_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 600
    users = rng.integers(0, 80, n)
    items = (rng.zipf(1.6, n) - 1) % 60
    mask = k_core_filter(users, items, 5)
    got = sorted(zip(users[mask].tolist(), items[mask].tolist()))
    assert got == sorted(_k_core_reference(zip(users.tolist(), items.tolist()), 5))
    assert 0 < mask.sum() < n  # the case is not trivial


def _pack_cmd(raw: Path, out: Path):
    return [sys.executable, str(ROOT / "tools" / "pack.py"), "domain=Food",
            f"meta={raw}/Food/meta_Food.json.gz", f"interactions={raw}/Food/Food.csv",
            f"images={raw}/Food/images", f"out={out}", "shard_max_items=40", "workers=1", "progress=false"]


def _snapshot(folder: Path) -> dict:
    # .lock is not output: it holds the pid of whoever packs (and is emptied when done)
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != ".lock"}


@pytest.fixture(scope="module")
def food_raw(tmp_path_factory):
    """A raw domain whose pack takes long enough (38 shards) to be caught in the act."""
    raw = tmp_path_factory.mktemp("raw")
    synthesize(SynthConfig(out=str(raw), aux_domains=["Food"], target_domains=[], items_per_domain=1500,
                           users_per_domain=2500, image_size=96, workers=2))
    return raw


def _wait_for(condition, what: str, timeout: float = 120.0):
    """Poll `condition` until it returns something truthy (returned), or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.005)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_all(proc: subprocess.Popen, others=()) -> None:
    """Teardown: SIGKILL the packer and any of its former workers still alive."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for p in others:
        if _alive(p):
            p.kill()


def _lock_pid(folder: Path):
    try:
        return json.loads((folder / ".lock").read_text())["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


@pytest.mark.parametrize("previous", ["none", "good"])
def test_sigkill_then_rerun_is_byte_identical(tmp_path, food_raw, previous):
    """A packer killed mid-way leaves the domain folder as it was: no pack (nothing that looks
    complete), or the previous good pack byte for byte; the rerun gives the reference."""
    out = tmp_path / "shards"
    subprocess.run(_pack_cmd(food_raw, out), check=True, capture_output=True)
    reference = _snapshot(out / "Food")
    if previous == "none":
        shutil.rmtree(out)
    building = out / ".Food.staging"

    proc = subprocess.Popen(_pack_cmd(food_raw, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        _wait_for(lambda: len(list(building.glob("items-*.tar"))) >= 3, "3 shards")
        workers = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # The pool workers die with the packer (see test_killed_packer_leaves_no_worker_alive);
        # waiting for it keeps the rerun below from meeting their lock or their writes.
        _wait_for(lambda: not any(_alive(w) for w in workers), "the pool workers to die", timeout=30)
    finally:
        _kill_all(proc, workers)
    killed = _snapshot(out / "Food")
    if previous == "none":
        assert killed == {}, "a killed packer must not leave a complete-looking domain"
    else:
        assert killed == reference, "a killed packer must leave the previous pack as it was"
    assert len(list(building.glob("items-*.tar"))) >= 3  # the kill came mid-way

    subprocess.run(_pack_cmd(food_raw, out), check=True, capture_output=True)
    assert _snapshot(out / "Food") == reference
    assert sorted(p.name for p in out.iterdir()) == ["Food"]  # the killed run's staging folder is gone


def test_second_packer_on_the_same_domain_is_refused(tmp_path, food_raw):
    out = tmp_path / "shards"
    first = subprocess.Popen(_pack_cmd(food_raw, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _lock_pid(out / "Food") == first.pid or first.poll() is not None, "the first to lock")
        # Stopped, it holds the lock for as long as this test needs, however fast it packs.
        first.send_signal(signal.SIGSTOP)
        assert _lock_pid(out / "Food") == first.pid, "the first packer finished before it could be caught"
        t0 = time.monotonic()
        second = subprocess.run(_pack_cmd(food_raw, out), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert time.monotonic() - t0 < 60
        [line] = second.stderr.strip().splitlines()  # one clear line, no traceback
        assert line.startswith(f"pack: error: {out / 'Food'} is in use by another packer (pid {first.pid} on host ")
        assert line.endswith(": wait for it to finish or stop it")
        first.send_signal(signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=120)
        assert first.returncode == 0, stderr  # the refused packer did not disturb the running one
        assert stdout.startswith("packed Food:")
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
        _kill_all(first)
    report = json.loads((out / "Food" / "pack_report.json").read_text())
    assert report["status"] == "complete" and (out / "Food" / "catalog.parquet").exists()
    assert (out / "Food" / ".lock").read_text() == ""  # released


def test_killed_packer_leaves_no_worker_alive(tmp_path, food_raw):
    out = tmp_path / "shards"
    cmd = [a for a in _pack_cmd(food_raw, out) if not a.startswith("workers=")] + ["workers=2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        seen_writing = set()

        def every_worker_writing():
            # a spawned worker runs its initializer (the death signal) after its imports, then
            # takes shards: one seen holding a shard open is past it. Suspending one still
            # importing would freeze it before it could ever learn its parent died.
            assert proc.poll() is None, "the packer finished before it could be killed"
            pool = [w for w in psutil.Process(proc.pid).children()
                    if "resource_tracker" not in " ".join(w.cmdline())]
            for w in pool:
                try:
                    if any("items-" in f.path for f in w.open_files()):
                        seen_writing.add(w.pid)
                except psutil.Error:
                    pass
            return len(pool) == 2 and seen_writing >= {w.pid for w in pool}

        _wait_for(every_worker_writing, "both pool workers to write shards")
        proc.send_signal(signal.SIGSTOP)  # frozen: the pool cannot wind down between the look and the kill
        children = [w for w in psutil.Process(proc.pid).children(recursive=True) if _alive(w)]
        # the spawn context's resource tracker writes nothing and exits when the packer's end
        # of its pipe closes: it is left running, and must be gone too
        trackers = [w for w in children if "resource_tracker" in " ".join(w.cmdline())]
        workers = [w for w in children if w not in trackers]
        assert workers, "no pool worker to orphan"
        # Stopped workers stand for workers busy with a long shard: left alone they would never
        # exit (an orphaned worker otherwise finishes its shard and the queued ones, then
        # exits). Only the death signal the kernel sends them when the packer dies ends them.
        for w in workers:
            w.suspend()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        workers += trackers
        _wait_for(lambda: not any(_alive(w) for w in workers), "every former pool worker to die", timeout=30)
    finally:
        _kill_all(proc, workers)
    assert not (out / "Food" / "catalog.parquet").exists()
    with exclusive_dir_lock(out / "Food", "test"):  # nobody holds the folder any more
        pass


@pytest.mark.parametrize("seed", range(3))
def test_most_recent_matches_brute_force(seed):
    from ant_dist.data.filtering import most_recent, sort_interactions

    rng = np.random.default_rng(seed)
    users = rng.integers(0, 30, 2000)
    ts = rng.integers(0, 50, 2000)  # many ties
    items = rng.integers(0, 100, 2000)
    order = sort_interactions(users, ts, items, tie_break="item")
    keep = most_recent(users[order], 50)
    got = sorted(zip(users[order][keep].tolist(), ts[order][keep].tolist(), items[order][keep].tolist()))
    expected = []
    for u in range(30):
        rows = sorted((t, i) for uu, t, i in zip(users.tolist(), ts.tolist(), items.tolist()) if uu == u)
        expected += [(u, t, i) for t, i in rows[-50:]]
    assert got == sorted(expected)
    assert (~keep).sum() > 0  # some users had more than 50


def test_shards_hold_every_catalog_item_once_with_source_bytes(tmp_path):
    raw = tmp_path / "raw"
    m = synthesize(SynthConfig(out=str(raw), aux_domains=["Food"], target_domains=[], items_per_domain=400,
                               users_per_domain=700, image_size=32, progress=False))
    d = m["aux"][0]
    pack_domain(PackConfig(domain="Food", meta=d["meta"], interactions=d["interactions"], images=d["images"],
                           out=str(tmp_path / "s"), shard_max_items=37, workers=2, progress=False))
    catalog = pq.read_table(tmp_path / "s" / "Food" / "catalog.parquet").to_pylist()
    samples = list(iter_shard_samples(shard_paths(tmp_path / "s" / "Food")))
    assert len(shard_paths(tmp_path / "s" / "Food")) == -(-len(catalog) // 37)
    assert [json.loads(s["json"])["row"] for s in samples] == list(range(len(catalog)))  # once each, in order
    for s, c in zip(samples, catalog):
        meta = json.loads(s["json"])
        assert unsafe_key(s["__key__"]) == meta["item_id"] == c["item_id"]
        assert meta["has_image"] == c["has_image"] and meta["price"] == c["price"]
        if c["has_image"]:
            ext = c["image_ext"]
            assert s[ext] == (Path(d["images"]) / f"{c['item_id']}.{ext}").read_bytes()
    assert sum(c["has_image"] for c in catalog) > 0.8 * len(catalog)


def test_duplicates_are_found_when_ties_keep_file_order():
    from ant_dist.data.filtering import duplicate_mask, sort_interactions

    # user 0 has items 5, 6, 5 in the same second: in file order the two 5s are not adjacent
    users, items, ts = np.array([0, 0, 0, 1]), np.array([5, 6, 5, 5]), np.array([1, 1, 1, 1])
    order = sort_interactions(users, ts, items, tie_break="input")
    assert order.tolist() == [0, 1, 2, 3]
    assert duplicate_mask(users[order], items[order], ts[order]).tolist() == [False, False, True, False]
