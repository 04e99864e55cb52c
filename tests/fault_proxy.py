"""An HTTP proxy for tests, in front of an OpenAI-style embedding server, that fails on demand.

Standard library only: a ThreadingHTTPServer on 127.0.0.1 (a free port) in a background thread,
forwarding with http.client. In the test's own process:

    with FaultProxy(server.url) as proxy:
        proxy.inject(Fault.status(429, retry_after=1))      # the next embedding request
        proxy.inject(Fault.drop(), times=2)                 # then the two after it
        proxy.refuse("POISON")                              # any batch holding it, until cleared
        client(proxy.url).embed(...)
        assert proxy.stats.faults["status_429"] == 1

Passing through, the request's method, path and query, headers (Authorization included) and
body go upstream unchanged, less the hop-by-hop headers; the answer comes back the same way.

It also answers text-embeddings-inference's (TEI's) native API by translating to the upstream
OpenAI API: `POST /embed` and `GET /info` (TEI 1.9's shapes; see `TeiInfo`). TEI's own OpenAI
route (`POST /v1/embeddings`) is the upstream's, passed through.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import socket
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "transfer-encoding", "upgrade", "host", "content-length"}
# OpenAI's error `type` for a status the proxy makes up.
OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
                      404: "invalid_request_error", 413: "invalid_request_error",
                      422: "invalid_request_error", 429: "rate_limit_error"}
# TEI's ErrorType, serialized as serde writes a unit variant (capitalized), by HTTP status.
TEI_ERROR_TYPES = {400: "Empty", 413: "Validation", 422: "Validation", 424: "Backend",
                   429: "Overloaded", 503: "Unhealthy"}
TEI_MESSAGES = {429: "Model is overloaded", 503: "unhealthy"}


@dataclass(frozen=True)
class Fault:
    """One thing that goes wrong with one request. Build with the class methods."""

    kind: str  # "status", "drop", "delay" or "pass"
    status_code: int = 0
    retry_after: float | None = None
    message: str | None = None
    seconds: float = 0.0
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def status(cls, code: int, retry_after: float | None = None, message: str | None = None,
               headers: dict[str, str] | None = None) -> Fault:
        """Answer `code` at once, without forwarding, with an error body in the API's shape
        (OpenAI's, or TEI's on /embed) and a `Retry-After` header when `retry_after` is given."""
        return cls("status", status_code=code, retry_after=retry_after, message=message,
                   headers=tuple((headers or {}).items()))

    @classmethod
    def drop(cls) -> Fault:
        """Read the request, then close the connection without a byte of reply: http.client
        raises RemoteDisconnected (a ConnectionResetError), requests a ConnectionError."""
        return cls("drop")

    @classmethod
    def passthrough(cls) -> Fault:
        """Nothing goes wrong: the request is forwarded (to let the first requests through
        before the faults that follow); not counted as a fault."""
        return cls("pass")

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        """Wait `seconds`, then forward: a slow reply."""
        return cls("delay", seconds=seconds)

    @property
    def label(self) -> str:
        return f"status_{self.status_code}" if self.kind == "status" else self.kind


@dataclass
class Refusal:
    marker: str
    status: int = 400
    message: str | None = None
    tei_error_type: str | None = None


@dataclass
class TeiInfo:
    """What `GET /info` answers, and the limits `POST /embed` enforces. Defaults are TEI 1.9's
    (max_client_batch_size 32, auto_truncate true, validation errors 422; before 1.9.0 they were
    413) serving all-MiniLM-L6-v2 on CPU."""

    model_id: str = "sentence-transformers/all-MiniLM-L6-v2"
    model_sha: str | None = None  # TEI: its --revision, null without one
    model_dtype: str = "float32"
    served_model_name: str | None = None  # None: model_id, as TEI does
    pooling: str = "mean"
    max_concurrent_requests: int = 512
    max_input_length: int = 256
    max_batch_tokens: int = 16384
    max_batch_requests: int | None = None
    max_client_batch_size: int = 32
    auto_truncate: bool = True
    tokenization_workers: int = 2
    version: str = "1.9.3"
    sha: str | None = None
    docker_label: str | None = None
    # proxy settings, not in the answer
    validation_status: int = 422
    payload_limit: int = 2_000_000
    # Counts an input's tokens, special tokens included; without one, `truncate: false` is not
    # enforced (the upstream truncates silently).
    token_counter: Callable[[str], int] | None = None

    def as_json(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "model_sha": self.model_sha,
                "model_dtype": self.model_dtype,
                "served_model_name": self.served_model_name or self.model_id,
                "model_type": {"embedding": {"pooling": self.pooling}},
                "max_concurrent_requests": self.max_concurrent_requests,
                "max_input_length": self.max_input_length,
                "max_batch_tokens": self.max_batch_tokens,
                "max_batch_requests": self.max_batch_requests,
                "max_client_batch_size": self.max_client_batch_size,
                "auto_truncate": self.auto_truncate,
                "tokenization_workers": self.tokenization_workers,
                "version": self.version, "sha": self.sha, "docker_label": self.docker_label}


@dataclass
class RequestRecord:
    method: str
    path: str
    inputs: list[str] | None
    outcome: str  # "forwarded", "tei", a fault's label, "refused", "rejected" or "error"
    status: int | None = None


@dataclass
class ProxyStats:
    received: int = 0
    forwarded: int = 0  # requests sent upstream (a TEI /embed counts once)
    faults: Counter = field(default_factory=Counter)  # by label: status_429, drop, delay, refused
    inputs: list[str] = field(default_factory=list)  # every embedding input seen, in order
    in_flight: int = 0  # embedding requests being answered now
    max_in_flight: int = 0  # the most at once
    requests: list[RequestRecord] = field(default_factory=list)

    @property
    def faults_total(self) -> int:
        return sum(self.faults.values())


class _Dropped(Exception):
    pass


class FaultProxy:
    """The proxy; `url` is its root (http://127.0.0.1:PORT), paths as on the upstream.

    Faults apply, in the order injected, to the next embedding requests (POST to a path ending in
    `/embeddings` or to `/embed`), or to any request where injected with `any_request=True`.
    A queued fault comes before a refusal: a faulted request is not checked for markers (its
    inputs still count as seen). `upstream_url` is the upstream server's root.
    """

    def __init__(self, upstream_url: str, *, embeddings_path: str = "/v1/embeddings",
                 upstream_model: str | None = None, upstream_timeout: float = 120.0):
        parsed = urllib.parse.urlsplit(upstream_url)
        if parsed.scheme != "http":
            raise ValueError(f"an http:// upstream is needed, not {upstream_url!r}")
        self.upstream_url = upstream_url.rstrip("/")
        self._upstream_host = parsed.hostname
        self._upstream_port = parsed.port or 80
        self._upstream_base = parsed.path.rstrip("/")
        self.embeddings_path = embeddings_path
        self.upstream_model = upstream_model
        self.upstream_timeout = upstream_timeout
        self.stats = ProxyStats()
        self.info = TeiInfo()
        self._faults: list[tuple[Fault, bool]] = []
        self._refusals: list[Refusal] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- the test's controls --------------------------------------------------------------
    def inject(self, fault: Fault, times: int = 1, *, any_request: bool = False) -> FaultProxy:
        with self._lock:
            self._faults.extend([(fault, any_request)] * times)
        return self

    def pending_faults(self) -> list[Fault]:
        with self._lock:
            return [fault for fault, _ in self._faults]

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def refuse(self, marker: str, status: int = 400, message: str | None = None, *,
               tei_error_type: str | None = None) -> FaultProxy:
        """Refuse, until `clear_refusals()`, every embedding request one of whose inputs holds
        `marker`: `status` and an error body, OpenAI's shape
        `{"error": {"message", "type": "invalid_request_error", "param": null, "code": null}}`
        (TEI's `{"error", "error_type"}` on /embed). Nothing is forwarded."""
        with self._lock:
            self._refusals.append(Refusal(marker, status, message, tei_error_type))
        return self

    def clear_refusals(self) -> None:
        with self._lock:
            self._refusals.clear()

    def tei_info(self, **fields) -> TeiInfo:
        """Set `GET /info`'s fields (model_id, model_sha, max_client_batch_size, version, ...)
        and the proxy's TEI settings (validation_status, payload_limit, token_counter)."""
        with self._lock:
            for name, value in fields.items():
                if not hasattr(self.info, name):
                    raise TypeError(f"TeiInfo has no field {name!r}")
                setattr(self.info, name, value)
            return self.info

    def reset_stats(self) -> None:
        with self._lock:
            self.stats = ProxyStats()

    # -- life -----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        handler = type("Handler", (_Handler,), {"proxy": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- for the handler ------------------------------------------------------------------
    def _next_fault(self, embedding: bool) -> Fault | None:
        with self._lock:
            for index, (fault, any_request) in enumerate(self._faults):
                if embedding or any_request:
                    del self._faults[index]
                    if fault.kind == "pass":
                        return None
                    self.stats.faults[fault.label] += 1
                    return fault
            return None

    def _refusal_for(self, inputs: list[str] | None) -> Refusal | None:
        with self._lock:
            for refusal in self._refusals:
                if inputs and any(refusal.marker in text for text in inputs):
                    self.stats.faults["refused"] += 1
                    return refusal
            return None

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self.stats.requests.append(record)
            if record.inputs:
                self.stats.inputs.extend(record.inputs)

    def _in_flight(self, change: int) -> None:
        with self._lock:
            self.stats.in_flight += change
            self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + 1)

    def _upstream(self, method: str, path: str, headers: list[tuple[str, str]],
                  body: bytes | None) -> tuple[int, list[tuple[str, str]], bytes]:
        self._count("forwarded")
        connection = http.client.HTTPConnection(self._upstream_host, self._upstream_port,
                                                timeout=self.upstream_timeout)
        try:
            connection.putrequest(method, self._upstream_base + path, skip_host=True,
                                  skip_accept_encoding=True)
            connection.putheader("Host", f"{self._upstream_host}:{self._upstream_port}")
            for name, value in headers:
                connection.putheader(name, value)
            if body is not None:
                connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()


def _inputs_of(payload: Any, key: str) -> list[str] | None:
    if not isinstance(payload, dict):
        return None
    value = payload.get(key)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    return None


class _Handler(BaseHTTPRequestHandler):
    proxy: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

    def log_message(self, format, *args):  # quiet
        pass

    # -- plumbing -------------------------------------------------------------------------
    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = self.headers.get("Content-Length")
        return self.rfile.read(int(length)) if length else None

    def _commit(self, status: int | None) -> None:
        """Record the request before its answer goes out: a client that has its answer finds
        it in the stats."""
        record, self._record = getattr(self, "_record", None), None
        if record is not None:
            record.status = status
            self.proxy._record(record)

    def _send(self, status: int, body: bytes, headers: list[tuple[str, str]] | None = None,
              content_type: str | None = "application/json") -> None:
        self._commit(status)
        self.send_response(status)
        sent = set()
        for name, value in headers or []:
            # http.server writes its own Server and Date
            if name.lower() not in HOP_BY_HOP and name.lower() not in ("server", "date"):
                self.send_header(name, value)
                sent.add(name.lower())
        if content_type and "content-type" not in sent:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    def _send_json(self, status: int, payload: Any, headers: list[tuple[str, str]] | None = None):
        self._send(status, json.dumps(payload).encode(), headers)

    def _drop(self) -> None:
        self._commit(None)
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
        raise _Dropped

    def _forward_headers(self) -> list[tuple[str, str]]:
        return [(name, value) for name, value in self.headers.items()
                if name.lower() not in HOP_BY_HOP]

    # -- dispatch -------------------------------------------------------------------------
    def do_GET(self):
        self._handle()

    def do_POST(self):
        self._handle()

    def do_PUT(self):
        self._handle()

    def do_DELETE(self):
        self._handle()

    def _handle(self) -> None:
        embedding = self.command == "POST" and urllib.parse.urlsplit(self.path).path.endswith(
            ("/embeddings", "/embed"))
        if not embedding:
            self._answer()
            return
        self.proxy._in_flight(+1)
        try:
            self._answer()
        finally:
            self.proxy._in_flight(-1)

    def _answer(self) -> None:
        proxy = self.proxy
        proxy._count("received")
        path = urllib.parse.urlsplit(self.path).path
        tei_embed = self.command == "POST" and path == "/embed"
        tei_info = self.command == "GET" and path == "/info"
        embedding = tei_embed or (self.command == "POST" and path.endswith("/embeddings"))
        record = self._record = RequestRecord(self.command, self.path, None, "forwarded")
        try:
            if tei_embed and int(self.headers.get("Content-Length") or 0) > \
                    proxy.info.payload_limit:
                # axum's body limit: plain text, before any JSON is read
                record.outcome = "rejected"
                self.close_connection = True
                self._send(413, b"Failed to buffer the request body: length limit exceeded",
                           content_type="text/plain; charset=utf-8")
                return
            body = self._read_body()
            payload = None
            if embedding and body:
                with contextlib.suppress(ValueError):
                    payload = json.loads(body)
                record.inputs = _inputs_of(payload, "inputs" if tei_embed else "input")
            fault = proxy._next_fault(embedding)
            if fault is not None:
                record.outcome = fault.label
                if fault.kind == "drop":
                    self._drop()
                if fault.kind == "status":
                    self._send_fault(fault, tei=tei_embed or tei_info)
                    return
                if fault.kind == "delay" and proxy._stopping.wait(fault.seconds):
                    self._drop()
            if tei_embed or tei_info:
                record.outcome = record.outcome if fault is not None else "tei"
            if tei_embed:
                self._tei_embed(body, payload, record)
                return
            if tei_info:
                self._send_json(200, proxy.info.as_json())
                return
            refusal = proxy._refusal_for(record.inputs) if embedding else None
            if refusal is not None:
                record.outcome = "refused"
                self._send_json(refusal.status, _openai_error(
                    refusal.status, refusal.message or _refusal_message(refusal, record.inputs)))
                return
            try:
                status, headers, answer = proxy._upstream(self.command, self.path,
                                                          self._forward_headers(), body)
            except OSError as error:
                record.outcome = "error"
                self._send_json(502, _openai_error(502, f"upstream unreachable: {error}"))
                return
            self._send(status, answer, headers, content_type=None)
        except _Dropped:
            pass
        finally:
            self._commit(record.status)

    def _send_fault(self, fault: Fault, tei: bool) -> None:
        headers = list(fault.headers)
        if fault.retry_after is not None:
            value = fault.retry_after
            headers.append(("Retry-After", str(int(value)) if float(value).is_integer()
                            else str(value)))
        message = fault.message or f"injected fault: HTTP {fault.status_code}"
        if tei and fault.message is None and fault.status_code in TEI_MESSAGES:
            message = TEI_MESSAGES[fault.status_code]
        if tei:
            if fault.status_code == 401:  # TEI's auth layer answers 401 with no body
                self._send(401, b"", headers, content_type=None)
                return
            self._send_json(fault.status_code, _tei_error(fault.status_code, message), headers)
        else:
            self._send_json(fault.status_code, _openai_error(fault.status_code, message),
                            headers)

    # -- TEI ------------------------------------------------------------------------------
    def _tei_fail(self, status: int, message: str, error_type: str | None = None) -> int:
        self._send_json(status, _tei_error(status, message, error_type))
        return status

    def _tei_embed(self, body: bytes | None, payload: Any, record: RequestRecord) -> int:
        """TEI 1.9's POST /embed, its checks in its order, embedding through the upstream."""
        info = self.proxy.info
        validation = info.validation_status
        if "application/json" not in self.headers.get("Content-Type", ""):
            self._send(415, b"Expected request with `Content-Type: application/json`",
                       content_type="text/plain; charset=utf-8")
            return 415
        if payload is None:
            try:
                payload = json.loads(body or b"")
            except ValueError as error:
                self._send(400, f"Failed to parse the request body as JSON: {error}".encode(),
                           content_type="text/plain; charset=utf-8")
                return 400
        inputs = _inputs_of(payload, "inputs")
        normalize = payload.get("normalize", True) if isinstance(payload, dict) else True
        truncate = payload.get("truncate") if isinstance(payload, dict) else None
        dimensions = payload.get("dimensions") if isinstance(payload, dict) else None
        if (inputs is None or not isinstance(normalize, bool)
                or not isinstance(truncate, (bool, type(None)))
                or not isinstance(dimensions, (int, type(None))) or isinstance(dimensions, bool)
                or (dimensions is not None and dimensions < 0)):
            message = ("Failed to deserialize the JSON body into the target type: `inputs` must "
                       "be a string or a list of strings (this proxy takes no token ids); "
                       "`normalize`, `truncate` booleans; `dimensions` a positive integer")
            self._send(422, message.encode(), content_type="text/plain; charset=utf-8")
            return 422
        if truncate is None:
            truncate = info.auto_truncate
        single = isinstance(payload["inputs"], str)
        if not single and not inputs:
            return self._tei_fail(400, "`inputs` cannot be empty", "Empty")
        if not single and len(inputs) > info.max_client_batch_size:
            return self._tei_fail(validation, f"batch size {len(inputs)} > maximum allowed "
                                  f"batch size {info.max_client_batch_size}", "Validation")
        if dimensions == 0:
            return self._tei_fail(validation, "Input validation error: `dimensions` should be "
                                  "positive", "Validation")
        for text in inputs:
            if not text:
                return self._tei_fail(400, "Input validation error: `inputs` cannot be empty",
                                      "Empty")
            if not truncate:
                limit = info.max_input_length * 250
                if len(text) > limit:
                    return self._tei_fail(validation, "Input validation error: `inputs` must "
                                          f"have less than {limit} characters. Given: "
                                          f"{len(text)}", "Validation")
                tokens = info.token_counter(text) if info.token_counter else 0
                if tokens > info.max_input_length:
                    return self._tei_fail(validation, "Input validation error: `inputs` must "
                                          f"have less than {info.max_input_length} tokens. "
                                          f"Given: {tokens}", "Validation")
        refusal = self.proxy._refusal_for(inputs)
        if refusal is not None:
            record.outcome = "refused"
            message = refusal.message or _refusal_message(refusal, inputs)
            error_type = refusal.tei_error_type or ("Validation" if refusal.status == 400
                                                    else None)
            return self._tei_fail(refusal.status, message, error_type)
        request = {"model": self.proxy.upstream_model or info.model_id, "input": inputs,
                   "encoding_format": "float"}
        headers = [("Content-Type", "application/json")]
        if self.headers.get("Authorization"):
            headers.append(("Authorization", self.headers["Authorization"]))
        started = time.monotonic()
        try:
            status, _, answer = self.proxy._upstream("POST", self.proxy.embeddings_path,
                                                     headers, json.dumps(request).encode())
        except OSError as error:
            return self._tei_fail(424, f"Backend error: {error}", "Backend")
        if status == 401:
            self._send(401, b"", content_type=None)
            return 401
        if status != 200:
            message = _upstream_message(answer)
            if status == 429:
                return self._tei_fail(429, "Model is overloaded", "Overloaded")
            if 400 <= status < 500:
                return self._tei_fail(validation, f"Input validation error: {message}",
                                      "Validation")
            return self._tei_fail(424, f"Backend error: {message}", "Backend")
        data = sorted(json.loads(answer)["data"], key=lambda item: item["index"])
        vectors = [item["embedding"] for item in data]
        if dimensions is not None:
            if dimensions > len(vectors[0]):
                return self._tei_fail(validation, "Input validation error: `dimensions` should "
                                      "be smaller than the maximum embedding dimension.",
                                      "Validation")
            vectors = [vector[:dimensions] for vector in vectors]
        if normalize:  # TEI normalizes after cutting to `dimensions`
            vectors = [_normalized(vector) for vector in vectors]
        elapsed = str(int((time.monotonic() - started) * 1000))
        characters = sum(len(text) for text in inputs)
        headers = [("x-compute-type", "gpu+optimized"), ("x-compute-time", elapsed),
                   ("x-compute-characters", str(characters)), ("x-total-time", elapsed)]
        if info.token_counter:
            headers.append(("x-compute-tokens",
                            str(sum(min(info.token_counter(text), info.max_input_length)
                                    for text in inputs))))
        self._send_json(200, vectors, headers)
        return 200


def _normalized(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(value * value for value in vector))
    return [value / norm for value in vector] if norm else vector


def _openai_error(status: int, message: str) -> dict[str, Any]:
    kind = OPENAI_ERROR_TYPES.get(status, "server_error" if status >= 500 else
                                  "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def _tei_error(status: int, message: str, error_type: str | None = None) -> dict[str, Any]:
    kind = error_type or TEI_ERROR_TYPES.get(status, "Backend" if status >= 500 else
                                             "Validation")
    return {"error": message, "error_type": kind}


def _refusal_message(refusal: Refusal, inputs: list[str] | None) -> str:
    index = next(i for i, text in enumerate(inputs or []) if refusal.marker in text)
    return f"input {index} refused by the test proxy: it holds {refusal.marker!r}"


def _upstream_message(answer: bytes) -> str:
    """The message of an upstream error body: OpenAI's/infinity's `error.message`, FastAPI's
    `detail`, or the raw text."""
    try:
        payload = json.loads(answer)
    except ValueError:
        return answer.decode(errors="replace")[:500]
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if isinstance(error, str):
            return error
        if "detail" in payload:
            return json.dumps(payload["detail"])[:500]
    return json.dumps(payload)[:500]
