"""Requests to an embedding endpoint, with the manners a shared server expects: one keep-alive
connection per thread, a request slot and rate held across the executor (limits.py), retries
with exponential back-off and jitter on 429, 5xx, resets and timeouts (honouring Retry-After),
and a stop after a run of consecutive failures. Standard library only.

Two APIs: the OpenAI embeddings API (`POST /v1/embeddings`: TEI, vLLM, Infinity, OpenAI and
most hosted APIs) and TEI's native `POST /embed` and `GET /info`."""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from pipeline.endpoint.limits import ExecutorLimits
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.endpoint")

# Answers worth another try (and every 5xx); the key's; and the ones that refuse the request's
# inputs (OpenAI-style 400, TEI's 413 and 422 validation, 424 for an input the model failed on).
# Any other 4xx (404, 405: a wrong route or model) is the endpoint's problem, not the inputs'.
RETRIED_STATUSES = frozenset({408, 409, 425, 429})
AUTH_STATUSES = frozenset({401, 403})
REFUSING_STATUSES = frozenset({400, 413, 422, 424})
MAX_RETRY_AFTER_S = 300.0
# A kept-alive connection idle this long is replaced before use: servers close idle ones
# (uvicorn after 5 s, gunicorn after 2 s), and a request sent on a closed one fails for nothing.
IDLE_RECONNECT_S = 1.5


class EndpointError(PipelineError):
    """The endpoint cannot serve this run as configured; the message names the fix."""


class EndpointUnreachable(EndpointError):
    """No connection to the endpoint's host."""


class EndpointAuthError(EndpointError):
    """The endpoint refused the API key (401 or 403)."""


class EndpointModelError(EndpointError):
    """The endpoint does not serve the model, or serves it with another dimension or revision."""


class EndpointAnswered(EndpointError):
    """The endpoint answered a 4xx that is neither about the key nor the inputs (404, 405: a
    wrong route, or a model it does not have)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class EndpointFailing(EndpointError):
    """Too many failed attempts in a row: the run stops; committed waves stay."""


class InputRefused(Exception):
    """The endpoint refused the inputs of one request (a 4xx that a retry would not change)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True)
class EndpointSpec:
    """What a worker needs to call the endpoint; never the API key itself, only where it is."""

    api: str  # "openai" or "tei"
    url: str
    model: str
    api_key_env: str | None = None
    api_key_file: str | None = None
    timeout_s: float = 60.0
    dimensions: int | None = None
    max_request_inputs: int = 32
    max_request_units: int = 8192  # tokens, or characters without a tokenizer
    concurrency: int = 4
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_retries: int = 6
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    max_consecutive_failures: int = 12
    normalize: bool = True  # TEI's `normalize` (the vectors are normalised here as well)

    @property
    def embed_path(self) -> str:
        if self.api == "tei":
            return "/embed"
        path = urlsplit(self.url).path.rstrip("/")
        if path.endswith("/embeddings"):
            return path
        return f"{path}/embeddings" if path.endswith("/v1") else f"{path}/v1/embeddings"

    def api_key(self) -> str | None:
        """The key, read now from its environment variable or file."""
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise EndpointAuthError(
                    f"model.endpoint.api_key_env names {self.api_key_env}, which is not set in "
                    "this process (on a cluster, set it on the executors too: "
                    f"spark.executorEnv.{self.api_key_env})")
            return _checked_key(key.strip(), f"${self.api_key_env}")
        if self.api_key_file:
            path = Path(self.api_key_file).expanduser()
            if not path.is_file():
                raise EndpointAuthError(f"model.endpoint.api_key_file {path} does not exist "
                                        "here")
            return _checked_key(path.read_text().strip(), str(path))
        return None


def _checked_key(key: str, source: str) -> str:
    """A key goes into a header: one holding whitespace or control characters would make the
    HTTP library fail with the key in its message, so it is refused here, unquoted."""
    if not key or any(char.isspace() or ord(char) < 32 for char in key):
        raise EndpointAuthError(f"the API key in {source} is empty or holds whitespace or "
                                "control characters (one key on one line is expected)")
    return key


def backoff_seconds(spec: EndpointSpec, attempt: int, retry_after: float | None) -> float:
    """Exponential back-off with jitter (half to all of base x 2^attempt, capped); a server's
    Retry-After is a floor."""
    ceiling = min(spec.max_backoff_s, spec.backoff_s * 2 ** attempt)
    wait = random.uniform(ceiling / 2, ceiling)
    return max(wait, min(retry_after, MAX_RETRY_AFTER_S)) if retry_after is not None else wait


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After in seconds, given as seconds or as an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        from email.utils import parsedate_to_datetime

        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class EndpointClient:
    """Calls one endpoint from any number of threads; counts its retries."""

    def __init__(self, spec: EndpointSpec, limits: ExecutorLimits | None = None) -> None:
        self.spec = spec
        parts = urlsplit(spec.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port
        self._local = threading.local()
        self._lock = threading.Lock()
        self._limits = limits or ExecutorLimits.for_endpoint(spec)
        self.retries = 0
        self.requests = 0
        self.consecutive_failures = 0
        self.last_error: BaseException | None = None  # the last attempt's connection error

    # -- embedding -------------------------------------------------------------------------

    def embed(self, texts: list[str], units: int = 0, retries: int | None = None) -> np.ndarray:
        """Vectors [len(texts), dim] in input order. `units` (tokens, or characters) is what
        the tokens-per-minute limit counts. Raises InputRefused for inputs the server refuses,
        EndpointFailing when it keeps failing."""
        _, _, body = self.call("POST", self.spec.embed_path, self.embed_body(texts), units,
                               retries)
        return self.parse_vectors(body, len(texts))

    def embed_body(self, texts: list[str]) -> dict[str, Any]:
        if self.spec.api == "tei":
            body: dict[str, Any] = {"inputs": texts, "truncate": False,
                                    "normalize": self.spec.normalize}
        else:
            body = {"model": self.spec.model, "input": texts, "encoding_format": "float"}
        if self.spec.dimensions is not None:
            body["dimensions"] = self.spec.dimensions
        return body

    def parse_vectors(self, body: Any, expected: int) -> np.ndarray:
        if self.spec.api == "tei":
            rows = body
        else:
            items = body.get("data") if isinstance(body, dict) else None
            if not isinstance(items, list):
                raise EndpointError(f"{self.spec.url} answered without a `data` list: "
                                    f"{_short(body)}")
            rows = [item["embedding"] for item in sorted(items, key=lambda i: i.get("index", 0))]
        if not isinstance(rows, list) or len(rows) != expected:
            got = len(rows) if isinstance(rows, list) else "no"
            raise EndpointError(f"{self.spec.url} returned {got} vectors for {expected} inputs")
        return np.asarray(rows, dtype=np.float32)

    # -- one call, retried -----------------------------------------------------------------

    def call(self, method: str, path: str, body: Any = None, units: int = 0,
             retries: int | None = None) -> tuple[int, dict[str, str], Any]:
        """One request, retried on 429, 5xx, resets and timeouts; (status, headers, JSON)."""
        spec = self.spec
        retries = spec.max_retries if retries is None else retries
        payload = json.dumps(body).encode() if body is not None else None
        last = ""
        for attempt in range(retries + 1):
            retry_after = None
            with self._limits.request(units):
                try:
                    status, headers, data = self._once(method, path, payload)
                except (OSError, http.client.HTTPException, ValueError) as error:
                    self._drop_connection()
                    self.last_error = error
                    status, headers, data = 0, {}, b""
                    last = f"{type(error).__name__}: {error}"
            if status:
                parsed = _json(data)
                if 200 <= status < 300:
                    self._succeeded()
                    return status, headers, parsed
                message = error_message(parsed, data)
                if status in AUTH_STATUSES:
                    raise EndpointAuthError(
                        f"endpoint {spec.url} refused the API key ({status}: {message}); "
                        f"check {self._key_source()}")
                if status in REFUSING_STATUSES:
                    self._succeeded()  # the server answered: a refusal, not an outage
                    raise InputRefused(status, message)
                if status < 500 and status not in RETRIED_STATUSES:
                    raise EndpointAnswered(f"endpoint {spec.url} answered {status} ({message}) "
                                           f"at {path}; check model.endpoint.url and "
                                           "model.name", status)
                retry_after = retry_after_seconds(headers.get("retry-after"))
                last = f"{status}: {message}"
                self.last_error = None
            self._failed(last)
            if attempt < retries:
                wait = backoff_seconds(spec, attempt, retry_after)
                log.info("endpoint %s: %s; retry %d in %.1fs", spec.url, last, attempt + 1, wait)
                with self._lock:
                    self.retries += 1
                time.sleep(wait)
        raise EndpointFailing(f"endpoint {spec.url} failed {retries + 1} attempts at "
                              f"one request (last: {last}); committed waves are kept: run the "
                              "same command again to resume")

    def _succeeded(self) -> None:
        with self._lock:
            self.consecutive_failures = 0

    def _failed(self, last: str) -> None:
        """Failed attempts in a row, with no success between, counted across the requests in
        flight: the limit is max_consecutive_failures per request slot (concurrency)."""
        with self._lock:
            self.consecutive_failures += 1
            failures = self.consecutive_failures
        if failures >= self.spec.max_consecutive_failures * self.spec.concurrency:
            raise EndpointFailing(
                f"endpoint {self.spec.url} failed {failures} attempts in a row (last: {last}); "
                "committed waves are kept: run the same command again to resume")

    def _key_source(self) -> str:
        if self.spec.api_key_env:
            return f"the key in ${self.spec.api_key_env}"
        if self.spec.api_key_file:
            return f"the key in {self.spec.api_key_file}"
        return "model.endpoint.api_key_env (no key was sent)"

    # -- the wire --------------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        connection = getattr(self._local, "connection", None)
        if connection is not None and time.monotonic() - self._local.used > IDLE_RECONNECT_S:
            self._drop_connection()
            connection = None
        if connection is None:
            kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            connection = kind(self._host, self._port, timeout=self.spec.timeout_s)
            self._local.connection = connection
        return connection

    def _drop_connection(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None

    def _once(self, method: str, path: str, payload: bytes | None
              ) -> tuple[int, dict[str, str], bytes]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = self.spec.api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        connection = self._connection()
        self._local.used = time.monotonic()
        with self._lock:
            self.requests += 1
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        data = response.read()
        self._local.used = time.monotonic()
        if response.getheader("connection", "").lower() == "close":
            self._drop_connection()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data

    def close(self) -> None:
        self._drop_connection()


def error_message(parsed: Any, raw: bytes) -> str:
    """The server's own words: OpenAI `{"error": {"message"}}`, TEI `{"error": "..."}`,
    FastAPI `{"detail": ...}`, else the body's start."""
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if "detail" in parsed:
            return _short(parsed["detail"])
        if "message" in parsed:
            return str(parsed["message"])
    return raw[:300].decode("utf-8", "replace") or "(empty reply)"


def _json(data: bytes) -> Any:
    try:
        return json.loads(data) if data else None
    except ValueError:
        return None


def _short(value: Any, limit: int = 300) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."
