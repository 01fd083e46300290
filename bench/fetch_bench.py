"""Image fetcher throughput against a loopback HTTP server, and the counts of a run with 10 % faults.

    python bench/fetch_bench.py [--items 3000] [--fault-items 1000]

The server runs in this process (one thread per connection) and serves 64 x 64 JPEGs (the size
tools/synth.py draws) from memory; tools/fetch_images.py runs as its own process with the rate
limit off, so the figure is the fetcher's own ceiling on this machine (request + full decode +
fsync + rename per image), not a CDN's. In the fault run, 10 items in every 100 misbehave:
404 x2, 503-then-OK x2, always 503, no answer before the timeout, a truncated body, an HTML page,
an image over max_bytes, and a connection dropped before any answer. Writes
bench/results/fetch_loopback.json.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CDN = "https://images.example/"
# fault of item i, by i % 100 (the other 90 are plain images)
FAULTS = {0: "missing", 1: "missing", 2: "flaky", 3: "flaky", 4: "down", 5: "slow", 6: "trunc", 7: "html",
          8: "big", 9: "reset"}
EXPECTED_PER_100 = {"ok": 92, "not_found": 2, "http_error": 1, "timeout": 1, "truncated": 1, "not_image": 1,
                    "too_big": 1, "connection_error": 1}


def jpeg(seed: int, size: int = 64) -> bytes:
    img = Image.effect_noise((size, size), 30 + seed % 50).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class Server:
    def __init__(self, images: list[bytes], big: bytes):
        self.hits: Counter = Counter()
        self.lock = threading.Lock()
        self.release = threading.Event()  # "slow" answers wait for this (set at the end)
        app = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                with app.lock:
                    app.hits[self.path] += 1
                    hits = app.hits[self.path]
                kind, _, name = self.path.lstrip("/").partition("/")
                body = images[int(name.split(".")[0]) % len(images)]
                if kind == "reset":
                    self.close_connection = True
                    return  # no status line: the client sees the connection close
                if kind == "slow":
                    app.release.wait(30)
                if kind == "missing" or (kind in ("flaky", "down") and (hits == 1 or kind == "down")):
                    code = 404 if kind == "missing" else 503
                    self.send_response(code)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if kind == "html":
                    body = b"<html><body>captcha</body></html>"
                elif kind == "big":
                    body = big
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if kind == "trunc" else body)

        class Quiet(ThreadingHTTPServer):
            request_queue_size = 128

            def handle_error(self, request, client_address):
                pass

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.prefix = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def write_meta(path: Path, n: int, faults: bool) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for i in range(n):
            kind = FAULTS.get(i % 100, "img") if faults else "img"
            fh.write(json.dumps({"asin": f"B{i:09d}", "title": f"item {i}",
                                 "imageURLHighRes": [f"{CDN}{kind}/{i}.jpg"]}) + "\n")


def run_fetcher(server: Server, meta: Path, out: Path, parallel: int, *extra: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "tools" / "fetch_images.py"), "format=amazon2018", f"meta={meta}",
           f"images={out}", f"parallel={parallel}", "rate_per_host=0", f"url_prefix_from={CDN}",
           f"url_prefix_to={server.prefix}", "progress=false", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"fetcher failed ({res.returncode}): {res.stderr[-3000:]}")
    return json.loads((out / "fetch_report.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=3000, help="images per throughput run")
    p.add_argument("--fault-items", type=int, default=1000, help="items in the 10 %% fault run (a multiple of 100)")
    p.add_argument("--work", default=str(ROOT / "bench" / ".work" / "fetch"))
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    images = [jpeg(s) for s in range(64)]
    server = Server(images, big=os.urandom(64 * 1024))
    result: dict = {"cpu_cores": os.cpu_count(), "image_bytes_mean": sum(map(len, images)) // len(images),
                    "throughput": {}}
    try:
        meta = work / "meta_clean.json.gz"
        write_meta(meta, args.items, faults=False)
        for parallel in (8, 32):
            rep = run_fetcher(server, meta, work / f"out-p{parallel}", parallel)
            assert rep["counts"]["ok"] == args.items, rep["counts"]
            result["throughput"][str(parallel)] = {"images": args.items, "seconds": rep["seconds"],
                                                   "images_per_s": rep["images_per_s"]}
            print(f"parallel={parallel:2d}: {args.items} images in {rep['seconds']:.1f}s = "
                  f"{rep['images_per_s']:.0f} images/s")
        meta = work / "meta_faults.json.gz"
        write_meta(meta, args.fault_items, faults=True)
        rep = run_fetcher(server, meta, work / "out-faults", 16, "timeout=0.5", "retries=2", "backoff=0.05",
                          "max_bytes=32768")
        expected = {k: v * args.fault_items // 100 for k, v in EXPECTED_PER_100.items()}
        got = {k: v for k, v in rep["counts"].items() if v}
        result["faults"] = {"items": args.fault_items, "parallel": 16, "timeout_s": 0.5, "retries": 2,
                            "expected": expected, "counts": got, "requests": rep["requests"],
                            "seconds": rep["seconds"], "matches_expected": got == expected}
        verdict = "as expected" if got == expected else f"EXPECTED {expected}"
        print(f"10% faults, {args.fault_items} items: {json.dumps(got, sort_keys=True)} "
              f"({rep['requests']} requests, {rep['seconds']:.1f}s; {verdict})")
    finally:
        server.close()
    out = ROOT / "bench" / "results" / "fetch_loopback.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
