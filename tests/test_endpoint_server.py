"""The endpoint backend's test infrastructure, for real: an infinity server serving the packaged
all-MiniLM-L6-v2 (tests/endpoint_server.py) and the fault proxy in front of it
(tests/fault_proxy.py). One server (with an API key) for the whole session."""

from __future__ import annotations

import http.client
import json
import math
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from tests.endpoint_server import TEST_API_KEY, infinity_server_with_key, minilm_path
from tests.fault_proxy import Fault, FaultProxy

pytestmark = pytest.mark.slow
server = infinity_server_with_key  # the session fixture, under a short name

TEXTS = [
    "hello",
    "x",
    "A quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "Ünïcödé text — with dashes, and 日本語 too",
    "\ttabs\nand newlines\n",
    "Numbers 1234567890 and symbols !@#$%^&*()",
    "Spark writes the embeddings into a Delta table, one row per chunk.",
    " ".join(["word"] * 600),  # over 256 tokens: truncated
    " ".join(f"token{i}" for i in range(400)),
    *(" ".join([f"sentence {i} about the pipeline"] * (3 * i + 1)) for i in range(10)),
]


def call(base: str, method: str, path: str, payload=None, headers=None, timeout: float = 60,
         raw: bytes | None = None):
    """(status, headers as a lower-cased dict, parsed JSON or text) by plain http.client."""
    parsed = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout)
    body = raw if raw is not None else (None if payload is None else json.dumps(payload).encode())
    try:
        connection.request(method, path, body=body,
                           headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        text = response.read().decode()
        answer_headers = {name.lower(): value for name, value in response.getheaders()}
    finally:
        connection.close()
    try:
        parsed_body = json.loads(text) if text else None
    except ValueError:
        parsed_body = text
    return response.status, answer_headers, parsed_body


def vectors(answer: dict) -> np.ndarray:
    return np.array([item["embedding"] for item in sorted(answer["data"],
                                                          key=lambda item: item["index"])])


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_path()), device="cpu")
    return model.encode(TEXTS, normalize_embeddings=True)


@pytest.fixture
def auth(server) -> dict[str, str]:
    return server.headers


@pytest.fixture
def proxy(server):
    with FaultProxy(server.url) as running:
        yield running


def embed(base, auth, inputs, **kwargs):
    return call(base, "POST", "/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": inputs},
                auth, **kwargs)


def test_vectors_equal_sentence_transformers(server, auth, reference):
    status, headers, answer = embed(server.url, auth, TEXTS)
    assert status == 200 and headers["content-type"] == "application/json"
    assert [item["index"] for item in answer["data"]] == list(range(len(TEXTS)))
    assert answer["model"] == "all-MiniLM-L6-v2"
    got = vectors(answer)
    assert got.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert np.abs(got - reference).max() < 1e-4
    # `usage` counts characters (inputs stripped of outer whitespace), not tokens.
    characters = sum(len(text.strip()) for text in TEXTS)
    assert answer["usage"] == {"prompt_tokens": characters, "total_tokens": characters}
    # One text at a time, the same vectors.
    status, _, single = embed(server.url, auth, TEXTS[8])
    assert status == 200
    assert np.abs(vectors(single)[0] - reference[8]).max() < 1e-4


def test_api_key_is_enforced(server, proxy):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TEST_API_KEY}):
        status, answer_headers, answer = embed(server.url, headers, ["hello"])
        assert (status, answer) == (401, {"detail": "Unauthorized"})
        assert answer_headers["www-authenticate"] == "Bearer"
        # the proxy forwards Authorization unchanged
        assert embed(proxy.url, headers, ["hello"])[0] == 401
    assert embed(proxy.url, server.headers, ["hello"])[0] == 200
    # /health wants no key
    assert call(server.url, "GET", "/health")[0] == 200


class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        answer = json.dumps({"method": self.command, "path": self.path, "body": body,
                             "headers": dict(self.headers.items())}).encode()
        self.send_response(207)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Upstream", "echo")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


def test_proxy_passes_requests_through_unchanged(server, auth, proxy):
    echo = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    try:
        with FaultProxy(f"http://127.0.0.1:{echo.server_address[1]}") as to_echo:
            raw = b'{"input": ["a", "b"], "model": "m",  "extra": 1}'
            status, headers, seen = call(to_echo.url, "POST", "/v1/embeddings?x=1&y=2",
                                         headers={"Authorization": "Bearer abc",
                                                  "X-Custom": "kept"}, raw=raw)
    finally:
        echo.shutdown()
        echo.server_close()
    assert status == 207 and headers["x-upstream"] == "echo"
    assert (seen["method"], seen["path"], seen["body"]) == ("POST", "/v1/embeddings?x=1&y=2",
                                                            raw.decode())
    assert seen["headers"]["Authorization"] == "Bearer abc"
    assert seen["headers"]["X-Custom"] == "kept"
    # In front of the real server: the same vectors as straight from it.
    direct = vectors(embed(server.url, auth, TEXTS[:5])[2])
    status, _, answer = embed(proxy.url, auth, TEXTS[:5])
    assert status == 200 and np.array_equal(vectors(answer), direct)
    assert call(proxy.url, "GET", "/v1/models", headers=auth)[2]["data"][0]["id"] == \
        "all-MiniLM-L6-v2"
    assert (proxy.stats.received, proxy.stats.forwarded) == (2, 2)
    assert proxy.stats.inputs == TEXTS[:5]


def test_status_faults_in_order_then_through(proxy, auth):
    proxy.inject(Fault.status(429, retry_after=1)).inject(Fault.status(500))
    proxy.inject(Fault.status(503), times=2)
    # Faults wait for embedding requests: other routes pass.
    assert call(proxy.url, "GET", "/v1/models", headers=auth)[0] == 200
    status, headers, answer = embed(proxy.url, auth, ["hello"])
    assert status == 429 and headers["retry-after"] == "1"
    assert answer["error"]["type"] == "rate_limit_error"
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert embed(proxy.url, auth, ["hello"])[0] == 500
    assert [embed(proxy.url, auth, ["hello"])[0] for _ in range(2)] == [503, 503]
    assert embed(proxy.url, auth, ["hello"])[0] == 200
    stats = proxy.stats
    assert (stats.received, stats.forwarded) == (6, 2)
    assert dict(stats.faults) == {"status_429": 1, "status_500": 1, "status_503": 2}
    assert [record.status for record in stats.requests] == [200, 429, 500, 503, 503, 200]
    # A fault for any request takes the next one, whatever its route.
    proxy.inject(Fault.status(503, retry_after=2.5), any_request=True)
    status, headers, _ = call(proxy.url, "GET", "/v1/models", headers=auth)
    assert (status, headers["retry-after"]) == (503, "2.5")


def test_dropped_connection_is_a_connection_error(proxy, auth):
    proxy.inject(Fault.drop())
    with pytest.raises(ConnectionError):  # http.client.RemoteDisconnected
        embed(proxy.url, auth, ["hello"])
    assert embed(proxy.url, auth, ["hello"])[0] == 200
    assert proxy.stats.faults["drop"] == 1 and proxy.stats.forwarded == 1


def test_delay_beyond_the_client_timeout_times_out(proxy, auth):
    proxy.inject(Fault.delay(1.5))
    with pytest.raises(TimeoutError):
        embed(proxy.url, auth, ["hello"], timeout=0.3)
    proxy.inject(Fault.delay(0.3))
    started = time.monotonic()
    assert embed(proxy.url, auth, ["hello"], timeout=10)[0] == 200
    assert time.monotonic() - started >= 0.3
    assert proxy.stats.faults["delay"] == 2


def test_refuse_only_batches_holding_the_marker(proxy, auth):
    proxy.refuse("POISON", status=400, message="this input is refused")
    status, _, answer = embed(proxy.url, auth, ["fine", "has POISON inside", "fine too"])
    assert status == 400
    assert answer == {"error": {"message": "this input is refused",
                                "type": "invalid_request_error", "param": None, "code": None}}
    assert embed(proxy.url, auth, ["fine", "fine too"])[0] == 200
    proxy.clear_refusals()
    assert embed(proxy.url, auth, ["has POISON inside"])[0] == 200
    assert proxy.stats.faults == {"refused": 1}
    assert proxy.stats.forwarded == 2
    assert proxy.stats.inputs == ["fine", "has POISON inside", "fine too", "fine", "fine too",
                                  "has POISON inside"]


def test_tei_embed_through_the_proxy(server, auth, proxy, reference):
    proxy.tei_info(model_id="sentence-transformers/all-MiniLM-L6-v2", model_sha="abc123")
    status, _, info = call(proxy.url, "GET", "/info")
    assert status == 200
    assert {key: info[key] for key in ("model_id", "model_sha", "model_type",
                                       "max_input_length", "max_client_batch_size")} == {
        "model_id": "sentence-transformers/all-MiniLM-L6-v2", "model_sha": "abc123",
        "model_type": {"embedding": {"pooling": "mean"}}, "max_input_length": 256,
        "max_client_batch_size": 32}
    status, headers, tei = call(proxy.url, "POST", "/embed",
                                {"inputs": TEXTS, "normalize": True, "truncate": True}, auth)
    assert status == 200 and isinstance(tei, list) and len(tei) == len(TEXTS)
    openai = vectors(embed(server.url, auth, TEXTS)[2])
    assert np.abs(np.array(tei) - openai).max() < 1e-6
    assert np.abs(np.array(tei) - reference).max() < 1e-4
    assert headers["x-compute-characters"] == str(sum(len(text) for text in TEXTS))
    # One string: still a list of one vector. `dimensions` cuts, then normalizes.
    status, _, single = call(proxy.url, "POST", "/embed", {"inputs": "hello", "dimensions": 8},
                             auth)
    assert status == 200 and len(single) == 1 and len(single[0]) == 8
    assert math.isclose(float(np.linalg.norm(single[0])), 1.0, rel_tol=1e-6)
    # TEI's errors, TEI's shapes
    assert call(proxy.url, "POST", "/embed", {"inputs": []}, auth)[::2] == (
        400, {"error": "`inputs` cannot be empty", "error_type": "Empty"})
    assert call(proxy.url, "POST", "/embed", {"inputs": ["a"] * 33}, auth)[::2] == (
        422, {"error": "batch size 33 > maximum allowed batch size 32",
              "error_type": "Validation"})
    assert call(proxy.url, "POST", "/embed", {"inputs": ["a", ""]}, auth)[::2] == (
        400, {"error": "Input validation error: `inputs` cannot be empty",
              "error_type": "Empty"})
    assert call(proxy.url, "POST", "/embed", {"inputs": ["hello"]})[::2] == (401, None)
    proxy.inject(Fault.status(429))
    assert call(proxy.url, "POST", "/embed", {"inputs": ["hello"]}, auth)[::2] == (
        429, {"error": "Model is overloaded", "error_type": "Overloaded"})
    proxy.tei_info(payload_limit=100)  # axum's body limit, 2 MB in TEI
    assert call(proxy.url, "POST", "/embed", {"inputs": ["x" * 200]}, auth)[::2] == (
        413, "Failed to buffer the request body: length limit exceeded")
    proxy.tei_info(payload_limit=2_000_000)
    proxy.refuse("POISON", status=422)
    assert call(proxy.url, "POST", "/embed", {"inputs": ["a POISON b"]}, auth)[::2] == (
        422, {"error": "input 0 refused by the test proxy: it holds 'POISON'",
              "error_type": "Validation"})


def test_tei_truncate_false_refuses_long_inputs(server, auth, proxy):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    proxy.tei_info(token_counter=lambda text: len(tokenizer(text)["input_ids"]))
    long = " ".join(["word"] * 600)
    status, _, answer = call(proxy.url, "POST", "/embed", {"inputs": [long], "truncate": False},
                             auth)
    assert (status, answer) == (422, {"error": "Input validation error: `inputs` must have "
                                               "less than 256 tokens. Given: 602",
                                      "error_type": "Validation"})
    assert call(proxy.url, "POST", "/embed", {"inputs": [long], "truncate": True}, auth)[0] == 200
    assert proxy.stats.forwarded == 1
