"""The HTTP side of rewards that run elsewhere (`remote`, `vlm_judge`): one or more servers of one service.

Requests go to the servers in turn (load spread across them), each with a
timeout; a request that fails for a reason that may pass (no connection, a
timeout, a connection cut mid-answer, a 5xx, 408 or 429 answer, an answer
that does not parse) is retried on the next server (after a short jittered
pause when that is the same one, or the server's Retry-After), a bounded
number of times; the server that failed is passed over for `COOLDOWN_S`
seconds while another answers. A busy server (503 with Retry-After, a full
queue) has not failed: the request goes elsewhere or waits as asked. When every try fails, `Unavailable` is raised: the rewards
turn that into NaN scores (`lost_batch`), so the optimizer skips the step and
counts it like any non-finite step. Every try has a timeout (connecting,
and each wait for the server's bytes), so a hung server delays a request
by about `timeout` seconds per try, never forever. Any other
4xx answer is the request's fault (a prompt the server's reward refuses, a
wrong model name), as is a URL requests cannot use (a bad TLS certificate,
an invalid URL): a UserError, exit 2, with the server's message.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, wait
from typing import Callable, Sequence, TypeVar

from rewardkit.errors import UserError

log = logging.getLogger("rewardkit")

T = TypeVar("T")

COOLDOWN_S = 30.0
"""How long a server that failed is passed over while another answers."""
BACKOFF_S = 0.5
"""The pause before a retry (with up to as much again at random, so clients that failed together do not return together)."""
MAX_RETRY_AFTER_S = 30.0
"""The longest pause a server's Retry-After header is honoured with."""


def retriable_status(status: int) -> bool:
    """An answer that says "not now" rather than "not this request": the server's errors, a timeout, too many requests."""
    return status >= 500 or status in (408, 429)


class Unavailable(Exception):
    """No server answered a request within its tries."""


def server_urls(url: str | Sequence[str], *, what: str, option: str = "url") -> tuple[str, ...]:
    """The option's server URL(s) as a tuple without trailing slashes; refuses an empty list or a non-HTTP URL."""
    urls = (url,) if isinstance(url, str) else tuple(url)
    if not urls:
        raise UserError(f"{what}: `{option}` names no server; give a URL such as 'http://127.0.0.1:8000' or a list of them")
    for u in urls:
        if not u.startswith(("http://", "https://")):
            raise UserError(f"{what}: `{option}` = {u!r} is not an http:// or https:// URL")
    return tuple(u.rstrip("/") for u in urls)


class Endpoints:
    """The servers of one service, with their timeouts, retries and health; safe to use from several threads."""

    def __init__(self, urls: Sequence[str], *, timeout: float, retries: int, what: str, headers: dict | None = None):
        self.urls, self.timeout, self.retries, self.what = tuple(urls), timeout, retries, what
        self.headers = dict(headers or {})
        self.failed_batches = 0
        """Batches no server could score (each scored NaN): the optimizer names them when training stops on NaN."""
        self._down_until = [0.0] * len(self.urls)
        self._next = 0
        self._lock = threading.Lock()
        self._local = threading.local()  # a requests.Session per thread: sessions are not documented thread-safe

    def start(self) -> int:
        """The server a new request tries first: the next one in turn (so consecutive requests spread)."""
        with self._lock:
            start, self._next = self._next, (self._next + 1) % len(self.urls)
        return start

    def request(self, method: str, path: str, *, start: int | None = None, only: int | None = None, headers: dict | None = None,
                parse: Callable[[object], T] = lambda response: response, missing_ok: bool = False, **kwargs) -> T | None:
        """`parse(response)` of the first server (from `start`, in turn, healthy ones first; or server `only`) that
        answers 2xx with a body `parse` accepts (a ValueError from it counts as that server's failure).

        A server that is busy (503 with Retry-After: its queue is full) is not a failure: the request goes to the
        next server, or waits as asked, for up to `timeout` seconds, without using a retry; a server that failed
        this request is not asked again while another has not failed it. Raises Unavailable when `retries + 1`
        tries all failed, UserError on a 4xx answer or an unusable URL (`missing_ok`: None for a 404 or 405, a
        path the server does not offer)."""
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        order = [only] if only is not None else self._order(self.start() if start is None else start)
        headers = {**self.headers, **(headers or {})}
        errors, tries, k = [], 0, 0
        failed, asked, wait_for, busy_seen = set(), set(), 0.0, False  # this request's: failed servers; this round's
        busy_until = time.monotonic() + self.timeout

        def fail(i: int, error: str) -> None:  # server i failed this request: a try used up, and its cooldown starts
            nonlocal tries
            tries += 1
            errors.append(error)
            failed.add(i)
            self._failed(i, error)

        while tries <= self.retries:
            # the next server in turn, passing over those that failed this request while one that did not remains
            candidates = [j for j in order if j not in failed] or order
            i = candidates[k % len(candidates)]
            k += 1
            if i in asked:  # a new round: pause first, as long as the servers asked (a busy one's wait ends in time)
                pause = wait_for or BACKOFF_S * (1 + random.random())
                if busy_seen:
                    pause = min(pause, max(0.0, busy_until - time.monotonic()))
                time.sleep(pause)
                asked, wait_for, busy_seen = set(), 0.0, False
            asked.add(i)
            url = self.urls[i] + path
            try:
                response = session.request(method, url, timeout=(min(10.0, self.timeout), self.timeout), headers=headers, **kwargs)
            except (requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                fail(i, f"{url}: {type(exc).__name__}: {_short(exc)}")
                continue
            except requests.ConnectionError as exc:
                if isinstance(exc, requests.exceptions.SSLError):  # a certificate does not heal by retrying
                    raise UserError(f"{self.what}: {url}: TLS failed ({_short(exc)}); check the URL's scheme and the server's certificate") from None
                fail(i, f"{url}: {type(exc).__name__}: {_short(exc)}")
                continue
            except requests.RequestException as exc:  # an invalid URL, too many redirects: no retry mends them
                raise UserError(f"{self.what}: {url}: {type(exc).__name__}: {_short(exc)}") from None
            status = response.status_code
            if status == 503 and "Retry-After" in response.headers and time.monotonic() < busy_until:
                log.debug("%s: %s is busy (%s)", self.what, url, _detail(response))
                failed.discard(i)  # busy, so alive
                wait_for, busy_seen = max(wait_for, _retry_after(response) or BACKOFF_S), True
                continue
            if retriable_status(status):
                fail(i, f"{url}: HTTP {status} {_detail(response)}")
                wait_for = max(wait_for, _retry_after(response))
                continue
            if missing_ok and status in (404, 405):
                return None
            if status >= 400:
                raise UserError(f"{self.what}: {url} refused the request (HTTP {status}): {_detail(response)}")
            try:
                value = parse(response)
            except ValueError as exc:  # a 200 with a body that is not the service's answer: a broken or wrong server
                fail(i, f"{url}: an unreadable answer ({exc})")
                continue
            with self._lock:
                self._down_until[i] = 0.0
            return value
        raise Unavailable(f"{self.what}: no server answered in {self.retries + 1} tries ({'; '.join(errors)})")

    def ask_each(self, method: str, path: str, **kwargs) -> tuple[dict[str, object], list[str]]:
        """Every server asked alone, so that each answer is filed under the server that gave it (a start-up check):
        {url: answer} of those that answered, and why the others did not. `kwargs` as for `request`."""
        answers, errors = {}, []
        for i, url in enumerate(self.urls):
            try:
                answers[url] = self.request(method, path, only=i, **kwargs)
            except Unavailable as exc:
                errors.append(str(exc))
        return answers, errors

    def gather(self, pool, calls: Sequence[tuple[Callable, tuple]], n: int) -> list | None:
        """The results of `calls` (function, arguments), run at once on `pool`: the requests of one batch of `n`
        images. None when one of them found no server: the batch is lost, logged and counted (the caller scores it
        NaN). After any error nothing still queued is sent."""
        futures = [pool.submit(fn, *args) for fn, args in calls]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)  # a lost request is known at once, not after those before it
            for f in futures:
                if f.done() and not f.cancelled() and f.exception() is not None:
                    raise f.exception()
            return [f.result() for f in futures]
        except Unavailable as exc:
            with self._lock:
                self.failed_batches += 1
                failed = self.failed_batches
            log.warning("%s; the batch of %d images scores NaN, so its step is skipped (%d batch(es) failed so far)", exc, n, failed)
            return None
        finally:
            for f in futures:
                f.cancel()

    def _order(self, start: int) -> list[int]:
        """The servers from `start` in turn, those not cooling down after a failure first."""
        now, n = time.monotonic(), len(self.urls)
        turn = [(start + k) % n for k in range(n)]
        with self._lock:
            return [i for i in turn if self._down_until[i] <= now] + [i for i in turn if self._down_until[i] > now]

    def _failed(self, i: int, error: str) -> None:
        with self._lock:
            was_up, self._down_until[i] = self._down_until[i] == 0.0, time.monotonic() + COOLDOWN_S
        if was_up:  # once per outage: the log says when a server went away, not every request it missed
            then = "passed over while another server answers" if len(self.urls) > 1 else "tried again after a pause"
            log.warning("%s: %s failed (%s); %s", self.what, self.urls[i], error, then)


def _short(exc: Exception) -> str:
    return str(exc)[:300]


def _retry_after(response) -> float:
    """The server's Retry-After in seconds (capped), 0 when it gives none or an HTTP date."""
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(response.headers.get("Retry-After", ""))))
    except ValueError:
        return 0.0


def _detail(response) -> str:
    """The server's explanation: FastAPI's {"detail": ...}, an OpenAI-style {"error": {"message": ...}}, or the text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])[:500]
        if "detail" in body:
            return str(body["detail"])[:500]
    return str(body)[:500]
