"""The image fetcher against a real HTTP server on 127.0.0.1 that serves every fault we count.

The server decides what to do from the URL's first path segment and counts requests per path,
so retries (and their absence on 404) are checked on the server's side. Slow responses block on
a threading.Event that the test owns (set at teardown), never on a clock.
"""

import functools
import gzip
import io
import json
import random
import signal
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from ant_dist.config import FetchConfig, SynthConfig
from ant_dist.data.fetch_images import (OUTCOMES, fetch_images, image_url, main, rewrite_url,
                                        usable_as_file_stem)
from ant_dist.data.image_download import TokenBucket, backoff_delay, is_http_url
from ant_dist.data.synth import synthesize
from ant_dist.runtime.locking import exclusive_dir_lock

ROOT = Path(__file__).resolve().parents[1]
CDN = "https://images.example/"


def encode(fmt: str, size: int = 8, noise: bool = False, seed: int = 0) -> bytes:
    if noise:  # incompressible: a PNG of noise is ~3 bytes a pixel
        img = Image.frombytes("RGB", (size, size), random.Random(seed).randbytes(size * size * 3))
    else:
        img = Image.new("RGB", (size, size), (seed * 40 % 256, 90, 200))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


PNG, JPEG, BIG = encode("PNG", seed=1), encode("JPEG", seed=2), encode("PNG", 96, noise=True)
CAP = 20_000  # max_bytes in the tests: BIG is over it, the small images far under
assert len(BIG) > CAP > 10 * max(len(PNG), len(JPEG))


def body_of(name: str) -> bytes:
    """What the server sends for /<kind>/<name>: JPEG bytes for names ending .jpg or starting j."""
    return JPEG if name.endswith(".jpg") or name.startswith("j") else PNG


class FaultServer:
    """ThreadingHTTPServer on 127.0.0.1:0 in a background thread; see `serve` for the routes."""

    def __init__(self):
        self.hits: Counter = Counter()
        self.gate = threading.Event()  # slow responses wait for this
        self.cond = threading.Condition()
        self.blocked = 0               # responses now waiting on the gate
        self.kill_fast_left = 0        # /kill/: this many answered at once, then the rest block
        self.kill_slow = True
        self.kill_fast_served: list = []  # names of the /kill/ requests answered at once
        app = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                app.serve(self)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # clients that hung up (timeouts, the killed fetcher) are expected

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.prefix = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _block(self):
        with self.cond:
            self.blocked += 1
            self.cond.notify_all()
        self.gate.wait()

    def wait_blocked(self, n: int, timeout: float = 60.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.blocked >= n, timeout)

    @staticmethod
    def send(h, code: int, body: bytes = b"", ctype: str = "image/png", length: bool = True, extra=()):
        h.send_response(code)
        h.send_header("Content-Type", ctype)
        if length:
            h.send_header("Content-Length", str(len(body)))
        for key, value in extra:
            h.send_header(key, value)
        h.end_headers()
        h.wfile.write(body)

    def serve(self, h):
        with self.cond:
            self.hits[h.path] += 1
            hits = self.hits[h.path]
        _, kind, name = h.path.split("/", 2)
        body = body_of(name)
        if kind == "img":
            self.send(h, 200, body)
        elif kind == "missing":
            self.send(h, 404, b"not here", "text/plain")
        elif kind == "slow":
            self._block()
            self.send(h, 200, body)
        elif kind == "trunc":  # promises the whole image, sends half, hangs up (HTTP/1.0 closes)
            h.send_response(200)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body[: len(body) // 2])
        elif kind == "html":
            self.send(h, 200, b"<html><body>Sorry, we could not find that page</body></html>", "text/html")
        elif kind == "big":
            self.send(h, 200, BIG)
        elif kind == "bigstream":  # no Content-Length: only the byte count while streaming can refuse it
            self.send(h, 200, BIG, length=False)
        elif kind == "flaky":
            self.send(h, 503, b"busy", "text/plain") if hits == 1 else self.send(h, 200, body)
        elif kind == "down":
            self.send(h, 503, b"busy", "text/plain", extra=[("Retry-After", "0")])
        elif kind == "redirect":
            self.send(h, 302, b"", "text/plain", extra=[("Location", f"/img/{name}")])
        elif kind == "ftpredirect":
            self.send(h, 302, b"", "text/plain", extra=[("Location", f"ftp://127.0.0.1/{name}")])
        elif kind == "kill":
            with self.cond:
                fast = self.kill_fast_left > 0 or not self.kill_slow
                self.kill_fast_left -= 1
                if fast:
                    self.kill_fast_served.append(name)
            if fast:
                self.send(h, 200, body)
            else:  # headers and half the body, then stall: a download caught mid-body
                h.send_response(200)
                h.send_header("Content-Length", str(len(body)))
                h.end_headers()
                h.wfile.write(body[: len(body) // 2])
                self._block()
                h.wfile.write(body[len(body) // 2:])
        else:
            self.send(h, 400, b"bad route", "text/plain")


@pytest.fixture
def server():
    srv = FaultServer()
    yield srv
    srv.close()


def write_meta(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def rec(asin: str, hi=None, low=None) -> dict:
    r = {"asin": asin, "title": f"item {asin}"}
    if hi is not None:
        r["imageURLHighRes"] = hi
    if low is not None:
        r["imageURL"] = low
    return r


def cfg_for(server, meta: Path, images: Path, **kw) -> FetchConfig:
    base = dict(format="amazon2018", meta=str(meta), images=str(images), parallel=4, timeout=0.5, retries=2,
                backoff=0.01, max_backoff=0.05, rate_per_host=0.0, max_bytes=CAP, url_prefix_from=CDN,
                url_prefix_to=server.prefix, progress=False)
    base.update(kw)
    return FetchConfig(**base)


def final_files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name not in (".lock", "fetch_report.json")}


def decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
        return True
    except Exception:
        return False


# Each item, its URL (under CDN, rewritten to the server) and the outcome the fault implies.
FAULT_MIX = [
    ("A1", [CDN + "img/a1.png"], None, "ok"),
    ("A2", [CDN + "img/a2.jpg"], None, "ok"),
    ("A3", [CDN + "img/j3.png"], None, "ok"),        # JPEG bytes under a .png URL
    ("A4", [CDN + "redirect/a4.png"], None, "ok"),
    ("A5", [], [CDN + "img/a5.jpg"], "ok"),          # no high-res URL: the low-res one
    ("F1", [CDN + "flaky/f1.png"], None, "ok"),       # 503, then the image
    ("M1", [CDN + "missing/m1.png"], None, "not_found"),
    ("M2", [CDN + "missing/m2.jpg"], None, "not_found"),
    ("S1", [CDN + "slow/s1.png"], None, "timeout"),
    ("T1", [CDN + "trunc/t1.png"], None, "truncated"),
    ("H1", [CDN + "html/h1.png"], None, "not_image"),
    ("B1", [CDN + "big/b1.png"], None, "too_big"),
    ("B2", [CDN + "bigstream/b2.png"], None, "too_big"),
    ("D1", [CDN + "down/d1.png"], None, "http_error"),
    ("U1", ["ftp://images.example/u1.png"], None, "bad_url"),
    ("U2", ["file:///etc/passwd"], None, "bad_url"),
    ("U3", [CDN + "ftpredirect/u3.png"], None, "bad_url"),
]


def fault_meta(tmp_path: Path) -> Path:
    records = [rec(i, hi, low) for i, hi, low, _ in FAULT_MIX]
    records += [rec("N1"),                                 # no image at all: not an attempt
                rec("A1", [CDN + "img/dup.png"]),          # duplicate id: the first record wins
                rec("x/y", [CDN + "img/xy.png"]),          # not usable as a file name
                "{not json"]
    return write_meta(tmp_path / "meta_Test.json.gz", records)


def test_fault_mix_counts_files_and_retries(server, tmp_path):
    meta, images = fault_meta(tmp_path), tmp_path / "images"
    report = fetch_images(cfg_for(server, meta, images))
    expected = Counter({k: 0 for k in OUTCOMES})
    expected.update(outcome for *_, outcome in FAULT_MIX)
    assert report["status"] == "complete"
    assert report["counts"] == dict(expected)
    assert report["failed"] == 11
    assert report["items"] == {"in_meta": len(FAULT_MIX) + 1, "no_url": 1, "considered": len(FAULT_MIX),
                               "unfinished": 0}
    assert report["meta_problems"]["skipped"] == {"duplicate_item": 1, "malformed_json": 1, "unusable_item_id": 1}
    assert json.loads((images / "fetch_report.json").read_text())["counts"] == report["counts"]

    # Files: named by the decoded format, not the URL (j3.png is JPEG), byte-identical to what was served.
    assert final_files(images) == {"A1.png": PNG, "A2.jpg": JPEG, "A3.jpg": JPEG, "A4.png": PNG, "A5.jpg": JPEG,
                                   "F1.png": PNG}
    # Retries, seen by the server: 503 and faults of the connection are retried (retries=2: 3 requests);
    # 404, refusals and non-images are not.
    hits = server.hits
    assert hits["/flaky/f1.png"] == 2
    assert hits["/missing/m1.png"] == hits["/missing/m2.jpg"] == 1
    assert hits["/slow/s1.png"] == hits["/trunc/t1.png"] == hits["/down/d1.png"] == 3
    assert hits["/html/h1.png"] == hits["/big/b1.png"] == hits["/bigstream/b2.png"] == 1
    assert hits["/ftpredirect/u3.png"] == 1 and hits["/redirect/a4.png"] == hits["/img/a4.png"] == 1
    assert hits["/img/dup.png"] == 0 and hits["/img/xy.png"] == 0

    # A rerun skips what is there (no request for it) and tries the failures again.
    before = Counter(hits)
    again = fetch_images(cfg_for(server, meta, images))
    assert again["counts"]["already_present"] == 6 and again["counts"]["ok"] == 0
    assert again["counts"]["not_found"] == 2
    assert all(hits[p] == before[p] for p in ("/img/a1.png", "/img/a2.jpg", "/flaky/f1.png", "/img/a5.jpg"))
    assert hits["/missing/m1.png"] == 2


def test_max_items_and_amazon2023(server, tmp_path):
    meta = write_meta(tmp_path / "meta.jsonl.gz", [
        {"parent_asin": "P0", "images": []},
        {"parent_asin": "P1", "images": [{"variant": "PT01", "hi_res": CDN + "img/p1-side.jpg"},
                                         {"variant": "MAIN", "hi_res": None, "large": CDN + "img/p1.jpg"}]},
        {"parent_asin": "P2", "images": [{"variant": "MAIN", "hi_res": CDN + "img/p2.png"}]},
        {"parent_asin": "P3", "images": [{"variant": "MAIN", "hi_res": CDN + "img/p3.png"}]},
    ])
    images = tmp_path / "images"
    report = fetch_images(cfg_for(server, meta, images, format="amazon2023", max_items=2))
    assert report["counts"]["ok"] == 2 and report["items"]["considered"] == 2
    assert final_files(images) == {"P1.jpg": JPEG, "P2.png": PNG}
    assert set(server.hits) == {"/img/p1.jpg", "/img/p2.png"}


def test_url_helpers():
    assert image_url("amazon2018", {"imageURLHighRes": ["", "https://a/1.jpg"], "imageURL": ["https://a/s.jpg"]}) \
        == "https://a/1.jpg"
    assert image_url("amazon2018", {"imageURLHighRes": [], "imageURL": "https://a/s.jpg"}) == "https://a/s.jpg"
    assert image_url("amazon2018", {"imageURL": [None, 3]}) is None
    assert image_url("amazon2023", {"images": [{"variant": "PT01", "hi_res": "h1"},
                                               {"variant": "MAIN", "large": "l0"}]}) == "l0"
    assert image_url("amazon2023", {"images": [{"variant": "MAIN"}, {"hi_res": "h1"}]}) == "h1"
    assert rewrite_url(CDN + "x/1.jpg", CDN, "http://127.0.0.1:9/") == "http://127.0.0.1:9/x/1.jpg"
    assert rewrite_url("https://other/1.jpg", CDN, "http://127.0.0.1:9/") == "https://other/1.jpg"
    assert [is_http_url(u) for u in ("http://a/b", "HTTPS://a", "ftp://a/b", "file:///etc/passwd",
                                     "javascript:x", "http:///nohost", "http://[::1")] == [True, True] + [False] * 5
    assert [usable_as_file_stem(i) for i in ("B00X", "a.b", "..", "a/b", "a\\b", "x" * 300)] == \
        [True, True, False, False, False, False]


def test_token_bucket_by_hand():
    now = [0.0]
    bucket = TokenBucket(rate=10.0, burst=2, clock=lambda: now[0])
    # 2 saved tokens, then one every 0.1 s: the 3rd and 4th callers wait 0.1 and 0.2 s
    assert [round(bucket.reserve(), 9) for _ in range(4)] == [0.0, 0.0, 0.1, 0.2]
    now[0] = 0.5  # 5 tokens accrue, the debt of 2 is paid, 2 left (burst caps 3 at 2)
    assert [round(bucket.reserve(), 9) for _ in range(3)] == [0.0, 0.0, 0.1]


def test_backoff_full_jitter_bounds():
    rng = random.Random(0)
    for retry, bound in ((0, 0.5), (1, 1.0), (3, 4.0), (10, 30.0)):  # base 0.5, cap 30
        draws = [backoff_delay(retry, 0.5, 30.0, rng) for _ in range(400)]
        assert all(0.0 <= d <= bound for d in draws)
        assert max(draws) > 0.9 * bound and min(draws) < 0.1 * bound  # spread over the whole range


def test_bad_input_exits_2(server, tmp_path, capsys):
    meta = fault_meta(tmp_path)
    images = tmp_path / "images"
    common = [f"meta={meta}", f"images={images}", "progress=false"]
    assert main(["format=amazon2018", f"meta={tmp_path / 'nope.json'}", f"images={images}"]) == 2
    assert "metadata file not found" in capsys.readouterr().err
    for bad in ("parallel=0", f"url_prefix_from={CDN}"):
        assert main([bad] + common) == 2, bad
    for bad in ("no_such_option=1", "format=table"):  # refused by the config loader: exit 2 at once
        with pytest.raises(SystemExit) as exc:
            main([bad] + common)
        assert exc.value.code == 2, bad
    assert "format must be one of amazon2018, amazon2023, got 'table'" in capsys.readouterr().err
    with exclusive_dir_lock(images, "test holder"):
        assert main(common + [f"url_prefix_from={CDN}", f"url_prefix_to={server.prefix}"]) == 2
    assert "in use by another image fetcher" in capsys.readouterr().err
    assert not server.hits


def kill_cmd(server, meta: Path, images: Path, *extra: str) -> list:
    return [sys.executable, str(ROOT / "tools" / "fetch_images.py"), "format=amazon2018", f"meta={meta}",
            f"images={images}", "parallel=2", "rate_per_host=0", f"url_prefix_from={CDN}",
            f"url_prefix_to={server.prefix}", "progress=false", "backoff=0.01", *extra]


def kill_meta(tmp_path: Path, n: int = 8) -> Path:
    return write_meta(tmp_path / "meta.json.gz", [rec(f"K{i}", [CDN + f"kill/k{i}.png"]) for i in range(n)])


def test_sigkill_then_rerun_leaves_no_partial_file(server, tmp_path):
    meta, images = kill_meta(tmp_path), tmp_path / "images"
    server.kill_fast_left = 2
    proc = subprocess.Popen(kill_cmd(server, meta, images, "timeout=60"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        # Both threads stalled mid-body means each finished (and wrote) the item it had before.
        assert server.wait_blocked(2), "the fetcher never reached the stalled downloads"
        done = {f"K{name[1:-4]}.png" for name in server.kill_fast_served}  # k0.png -> K0.png
        assert len(done) == 2 and {p.name for p in images.glob("*.png")} == done
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (images / "K7.png.part").write_bytes(PNG[:20])  # what a kill during a write would leave
    assert {n for n in final_files(images) if not n.endswith(".part")} == done
    assert all(decodes(b) for n, b in final_files(images).items() if not n.endswith(".part"))

    server.kill_slow = False
    server.gate.set()
    server.hits.clear()
    res = subprocess.run(kill_cmd(server, meta, images, "timeout=10"), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((images / "fetch_report.json").read_text())
    assert report["counts"]["already_present"] == 2 and report["counts"]["ok"] == 6
    assert report["stale_parts_removed"] == 1
    assert not any(f"/kill/k{n[1:-4]}.png" in server.hits for n in done)
    assert final_files(images) == {f"K{i}.png": PNG for i in range(8)}


def test_sigterm_stops_cleanly_with_75(server, tmp_path):
    meta, images = kill_meta(tmp_path), tmp_path / "images"
    proc = subprocess.Popen(kill_cmd(server, meta, images, "timeout=1", "retries=100"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert server.wait_blocked(2), "the fetcher never reached the stalled downloads"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 75, out
    report = json.loads((images / "fetch_report.json").read_text())
    assert report["status"] == "interrupted" and report["counts"]["ok"] == 0
    assert report["items"]["unfinished"] >= 2  # the two stalled downloads at least
    assert final_files(images) == {}  # nothing partial, no .part
    assert not (images / ".lock").read_text()  # the lock was released


def test_fetches_the_synthetic_world_as_synth_drew_it(tmp_path):
    """synth's meta names https://images.example/<asin>.<ext>; served from synth's own image folder,
    the fetched folder must be the same files, which is what tools/pack.py reads."""
    manifest = synthesize(SynthConfig(out=str(tmp_path / "raw"), aux_domains=["Food"], target_domains=[],
                                      items_per_domain=40, users_per_domain=30, image_size=16, workers=1,
                                      progress=False))
    food = manifest["aux"][0]

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=food["images"]))
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        images = tmp_path / "fetched"
        assert main(["format=amazon2018", f"meta={food['meta']}", f"images={images}", "parallel=4",
                     "url_prefix_from=https://images.example/",
                     f"url_prefix_to=http://127.0.0.1:{httpd.server_address[1]}/", "progress=false"]) == 0
    finally:
        httpd.shutdown()
        httpd.server_close()
    drawn = {p.name: p.read_bytes() for p in Path(food["images"]).iterdir()}
    assert 30 <= len(drawn) < 40  # some items have no image
    assert final_files(images) == drawn
