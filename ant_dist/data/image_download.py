"""HTTP downloading for tools/fetch_images.py: one item at a time per thread, with a token bucket
per host, timeouts, a byte cap checked while the body streams, retries with full-jitter
exponential backoff (never on 404 or another 4xx), validation by the packer's own image check,
and an atomic write (<name>.part, fsync, rename)."""

from __future__ import annotations

import os
import random
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException, IncompleteRead, InvalidURL
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from ant_dist.config import FetchConfig
from ant_dist.data.shards import check_image

PART = ".part"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
CHUNK = 64 * 1024


class Refused(Exception):
    """A download stopped by a rule (too big, bad URL): never retried."""

    def __init__(self, outcome: str, detail: str):
        super().__init__(detail)
        self.outcome = outcome


class Interrupted(Exception):
    """The stop event was set while this download was in flight."""


@dataclass
class FetchResult:
    item_id: str
    url: str
    outcome: str  # one of OUTCOMES, or "interrupted"
    detail: str = ""
    requests: int = 0
    nbytes: int = 0


def is_http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


def backoff_delay(retry: int, base: float, cap: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2^retry)]."""
    return rng.uniform(0.0, min(cap, base * 2.0 ** retry))


def retry_after_seconds(value: Optional[str]) -> Optional[float]:
    """Retry-After given in seconds (the HTTP-date form is ignored: backoff applies)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up. `reserve()` takes one token now and says
    how long to wait before using it (tokens may go negative: waiters queue up in order)."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, max(1, burst), clock
        self.tokens, self.stamp = float(self.burst), clock()
        self.lock = threading.Lock()

    def reserve(self) -> float:
        with self.lock:
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            self.tokens -= 1.0
            return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


# ----------------------------------------------------------------------------- downloading
class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """urllib would follow a redirect to ftp://; we refuse anything but http(s)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not is_http_url(newurl):
            fp.close()
            raise Refused("bad_url", f"redirect to {newurl[:100]}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener(proxies: Optional[dict]) -> urllib.request.OpenerDirector:
    # Only the handlers we want: no file://, ftp:// or data: (build_opener would add them).
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(proxies), urllib.request.HTTPHandler(),
                    urllib.request.HTTPSHandler(), _HttpOnlyRedirects(),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None), TimeoutError)


class Downloader:
    """Fetches one item (with its retries) at a time per calling thread; shared by all threads."""

    def __init__(self, cfg: FetchConfig, folder: Path, stop: threading.Event):
        self.cfg, self.folder, self.stop = cfg, folder, stop
        self.local = threading.local()  # one opener pair per thread: no shared connection state
        self.buckets: dict[str, TokenBucket] = {}
        self.buckets_lock = threading.Lock()
        self.rng = random.Random()  # jitter must differ between runs and clients
        self.rng_lock = threading.Lock()

    def _wait_for_token(self, host: str) -> None:
        if self.cfg.rate_per_host <= 0:
            return
        with self.buckets_lock:
            bucket = self.buckets.setdefault(host, TokenBucket(self.cfg.rate_per_host, self.cfg.burst_per_host))
        delay = bucket.reserve()
        if delay > 0 and self.stop.wait(delay):
            raise Interrupted

    def _download(self, url: str) -> bytes:
        host = urlsplit(url).hostname or ""
        self._wait_for_token(host)
        if not hasattr(self.local, "openers"):
            self.local.openers = {False: _opener(None), True: _opener({})}  # None: proxies from the environment
        opener = self.local.openers[host in LOOPBACK_HOSTS]
        request = urllib.request.Request(url, headers={"User-Agent": self.cfg.user_agent, "Accept": "image/*"})
        deadline = time.monotonic() + self.cfg.total_timeout
        with opener.open(request, timeout=self.cfg.timeout) as resp:
            length = resp.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > self.cfg.max_bytes:
                raise Refused("too_big", f"Content-Length {length} > max_bytes {self.cfg.max_bytes}")
            body = bytearray()
            while chunk := resp.read(CHUNK):
                body += chunk
                if len(body) > self.cfg.max_bytes:
                    raise Refused("too_big", f"over max_bytes {self.cfg.max_bytes} while streaming")
                if self.stop.is_set():
                    raise Interrupted
                if time.monotonic() > deadline:
                    raise TimeoutError(f"download took over total_timeout={self.cfg.total_timeout}s")
        # read(amt) returns a short body without complaint when the server hangs up early
        if length.isdigit() and len(body) < int(length):
            raise IncompleteRead(bytes(body), int(length) - len(body))
        return bytes(body)

    def _save(self, item_id: str, ext: str, data: bytes) -> None:
        final = self.folder / f"{item_id}.{ext}"
        part = self.folder / f"{item_id}.{ext}{PART}"
        try:
            with open(part, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(part, final)
        except BaseException:
            part.unlink(missing_ok=True)
            raise

    def _attempt(self, url: str) -> tuple[str, str, bool, Optional[float], bytes]:
        """(outcome, detail, worth a retry, Retry-After seconds, body) of one request."""
        try:
            return "ok", "", False, None, self._download(url)
        except Refused as exc:
            return exc.outcome, str(exc), False, None, b""
        except urllib.error.HTTPError as exc:
            exc.close()
            retry = exc.code >= 500 or exc.code in (408, 429)
            outcome = "not_found" if exc.code in (404, 410) else "http_error"
            wait_s = retry_after_seconds(exc.headers.get("Retry-After")) if exc.headers else None
            return outcome, f"HTTP {exc.code}", retry, wait_s, b""
        except (ValueError, InvalidURL) as exc:  # e.g. a host name that is not valid IDNA, control characters
            return "bad_url", f"{type(exc).__name__}: {exc}"[:200], False, None, b""
        except IncompleteRead as exc:
            return "truncated", f"got {len(exc.partial)} bytes, {exc.expected} short", True, None, b""
        except (OSError, HTTPException) as exc:  # URLError is an OSError
            outcome = "timeout" if _is_timeout(exc) else "connection_error"
            return outcome, f"{type(exc).__name__}: {exc}"[:200], True, None, b""

    def fetch(self, item_id: str, url: str) -> FetchResult:
        """One item: requests with retries, then validation and an atomic write."""
        for attempt in range(self.cfg.retries + 1):
            try:
                if self.stop.is_set():
                    raise Interrupted
                outcome, detail, retry, wait_s, data = self._attempt(url)
                if outcome == "ok":
                    ext, reason = check_image(data)
                    if ext is not None:
                        self._save(item_id, ext, data)
                        return FetchResult(item_id, url, "ok", ext, attempt + 1, len(data))
                    outcome = "too_big" if reason == "image_too_large" else "not_image"
                    detail = reason or ""
                if not retry or attempt == self.cfg.retries:
                    return FetchResult(item_id, url, outcome, detail, attempt + 1)
                with self.rng_lock:
                    delay = backoff_delay(attempt, self.cfg.backoff, self.cfg.max_backoff, self.rng)
                if wait_s is not None:
                    delay = min(wait_s, self.cfg.max_backoff)
                if self.stop.wait(delay):
                    raise Interrupted
            except Interrupted:
                return FetchResult(item_id, url, "interrupted", requests=attempt + 1)
        raise AssertionError("unreachable: the last attempt returns")
