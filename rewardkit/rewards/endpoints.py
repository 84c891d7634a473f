"""The HTTP side of rewards that run elsewhere (`remote`, `vlm_judge`): one or more servers of one service.

Requests go to the servers in turn (load spread across them), each with a
timeout; a request that fails for a reason that may pass (no connection, a
timeout, a 5xx or 429 answer) is retried on the next server, a bounded number
of times, and the server that failed is passed over for `COOLDOWN_S` seconds
while another answers. When every try fails, `Unavailable` is raised: the
rewards turn that into NaN scores, so the optimizer skips the step and counts
it like any non-finite step - never a crash or a hang. A 4xx answer is the
request's fault (a prompt the server's reward refuses, a wrong model name):
it is a UserError, exit 2, with the server's message.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Sequence

from rewardkit.errors import UserError

log = logging.getLogger("rewardkit")

COOLDOWN_S = 30.0
"""How long a server that failed is passed over while another answers."""
RETRIABLE_STATUS = {429, 500, 502, 503, 504}


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
        self._down_until = [0.0] * len(self.urls)
        self._next = 0
        self._lock = threading.Lock()
        self._local = threading.local()  # a requests.Session per thread: sessions are not documented thread-safe

    def start(self) -> int:
        """The server a new request tries first: the next one in turn (so consecutive requests spread)."""
        with self._lock:
            start, self._next = self._next, (self._next + 1) % len(self.urls)
        return start

    def request(self, method: str, path: str, *, start: int | None = None, headers: dict | None = None, **kwargs):
        """The response of the first server (from `start`, in turn, healthy ones first) that answers 2xx.

        Raises Unavailable when `retries + 1` tries all failed, UserError on a 4xx answer."""
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        order = self._order(self.start() if start is None else start)
        headers = {**self.headers, **(headers or {})}
        errors = []
        for attempt in range(self.retries + 1):
            i = order[attempt % len(order)]
            url = self.urls[i] + path
            try:
                response = session.request(method, url, timeout=(min(10.0, self.timeout), self.timeout),
                                           headers=headers, **kwargs)
            except requests.RequestException as exc:
                errors.append(f"{url}: {type(exc).__name__}")
                self._failed(i, errors[-1])
                continue
            if response.status_code in RETRIABLE_STATUS:
                errors.append(f"{url}: HTTP {response.status_code} {_detail(response)}")
                self._failed(i, errors[-1])
                continue
            if response.status_code >= 400:
                raise UserError(f"{self.what}: {url} refused the request (HTTP {response.status_code}): {_detail(response)}")
            with self._lock:
                self._down_until[i] = 0.0
            return response
        raise Unavailable(f"{self.what}: no server answered in {self.retries + 1} tries ({'; '.join(errors)})")

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
            log.warning("%s: %s failed (%s); passed over while another server answers", self.what, self.urls[i], error)


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
