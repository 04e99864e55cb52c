"""Endpoint benchmark: the embedding job through an OpenAI-compatible server, against the
server's own client loop on the same texts, and the concurrency at which the server saturates.

    .venv/bin/python -m benchmarks.endpoint --docs 3000

A real infinity-emb server (tests/endpoint_server.py) serves the packaged all-MiniLM-L6-v2 on
this machine's CPU. The texts are synthetic documents of 30-60 words (one input each, no chunk
cut), sent in requests of --request-inputs inputs.
1. The loop: a plain client (http.client, one keep-alive connection per thread), C requests in
   flight for each C of --concurrency: requests/s and tokens/s (MiniLM's tokens, special tokens
   included, as the job counts them). The server saturates at the lowest C within 5% of the
   best tokens/s.
2. The job: run_embedding into a new table with model.backend=openai at that concurrency per
   executor, the same texts and request size: tokens/s over the embedding (the waves' embed
   seconds) and over the whole run (planning and commit included).
Prints Markdown, writes docs/results/benchmark_endpoint.json."""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.duty import synthetic_texts
from benchmarks.harness import DEFAULT_MODEL, markdown_table, write_results
from pipeline.config import load_settings
from pipeline.embed import run_embedding
from pipeline.endpoint.encoder import request_groups
from pipeline.logs import configure_job_logging, print_json_result
from pipeline.model.spec import resolve_model_path
from pipeline.spark.session import get_spark
from tests.endpoint_server import SERVED_MODEL, InfinityServer

SATURATED = 0.95
COLUMNS = [("what", "what"), ("concurrency", "concurrency"), ("requests", "requests"),
           ("seconds", "seconds", "{:.2f}"), ("requests_per_s", "requests/s", "{:.1f}"),
           ("tokens_per_s", "tokens/s", "{:,.0f}"), ("of_best_loop", "of the best loop",
                                                     "{:.2f}")]


def token_counts(texts: list[str]) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_MODEL))
    return [len(ids) for ids in tokenizer(texts)["input_ids"]]


def client_loop(url: str, texts: list[str], tokens: list[int], inputs: int, concurrency: int
                ) -> dict[str, Any]:
    """The texts in requests of `inputs`, `concurrency` at once, as fast as the server answers."""
    groups = request_groups([1] * len(texts), inputs, inputs)
    host, port = url.removeprefix("http://").split(":")
    local = threading.local()

    def send(group: list[int]) -> None:
        if getattr(local, "connection", None) is None:
            local.connection = http.client.HTTPConnection(host, int(port), timeout=300)
        body = json.dumps({"model": SERVED_MODEL, "input": [texts[i] for i in group]})
        local.connection.request("POST", "/v1/embeddings", body=body,
                                 headers={"Content-Type": "application/json"})
        response = local.connection.getresponse()
        answer = json.loads(response.read())
        if response.status != 200 or len(answer["data"]) != len(group):
            raise RuntimeError(f"the server answered {response.status}: {str(answer)[:200]}")

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(send, groups))
    seconds = time.perf_counter() - started
    return {"what": "client loop", "concurrency": concurrency, "requests": len(groups),
            "seconds": seconds, "requests_per_s": len(groups) / seconds,
            "tokens_per_s": sum(tokens) / seconds}


def served_requests(url: str) -> int:
    """The embedding requests the server has answered (its Prometheus /metrics)."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        lines = response.read().decode().splitlines()
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in lines
                   if line.startswith("http_requests_total{")
                   and 'handler="/v1/embeddings"' in line))


class WaveSeconds(logging.Handler):
    """The embed seconds of each wave, from the run's wave log records."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        timing = getattr(record, "wave_timing", None)
        if timing:
            self.seconds.append(timing["embed_seconds"])


def job(url: str, work: Path, texts: list[str], tokens: list[int], inputs: int,
        concurrency: int) -> list[dict[str, Any]]:
    source = work / "docs.jsonl"
    source.write_text("".join(json.dumps({"_id": f"d{i}", "text": text}) + "\n"
                              for i, text in enumerate(texts)))
    settings = load_settings("local", [
        "model.backend=openai", f"model.endpoint.url={url}", f"model.name={SERVED_MODEL}",
        f"model.endpoint.tokenizer={DEFAULT_MODEL}", f"model.endpoint.concurrency={concurrency}",
        f"model.endpoint.max_request_inputs={inputs}", "model.endpoint.max_request_tokens=1000000",
        f"input.path={source}", f"output.path={work / 'vectors'}"])
    for table in work.glob("vectors*"):  # a new table: every document is embedded, in waves
        shutil.rmtree(table)
    spark = get_spark(settings.spark)
    waves = WaveSeconds()
    logging.getLogger("pipeline.embed").addHandler(waves)
    served = served_requests(url)
    try:
        summary = run_embedding(spark, settings)
    finally:
        logging.getLogger("pipeline.embed").removeHandler(waves)
    requests = served_requests(url) - served - 1  # less the driver's probe
    if summary.tokens != sum(tokens):
        raise RuntimeError(f"the job embedded {summary.tokens} tokens, the loop {sum(tokens)}")
    embed_seconds = sum(waves.seconds)
    return [{"what": what, "concurrency": concurrency, "requests": requests, "seconds": seconds,
             "requests_per_s": requests / seconds, "tokens_per_s": summary.tokens / seconds}
            for what, seconds in (("job: embedding waves", embed_seconds),
                                  ("job: whole run", summary.seconds))]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=3000)
    parser.add_argument("--request-inputs", type=int, default=32)
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--work", type=Path, default=Path("/tmp/spark-embed-endpoint"))
    parser.add_argument("--json", type=Path, help="default: docs/results/benchmark_endpoint.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    configure_job_logging()
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    texts = synthetic_texts(args.docs)
    tokens = token_counts(texts)
    with InfinityServer() as server:
        client_loop(server.url, texts[:256], tokens[:256], args.request_inputs, 2)  # warm-up
        rows = [client_loop(server.url, texts, tokens, args.request_inputs, int(c))
                for c in args.concurrency.split(",")]
        best = max(row["tokens_per_s"] for row in rows)
        saturation = min(row["concurrency"] for row in rows
                         if row["tokens_per_s"] >= SATURATED * best)
        rows += job(server.url, args.work, texts, tokens, args.request_inputs, saturation)
    for row in rows:
        row["of_best_loop"] = row["tokens_per_s"] / best
    print(markdown_table(rows, COLUMNS, right_aligned={c[0] for c in COLUMNS[1:]}))
    print(f"\nthe server saturates at {saturation} requests in flight")
    path = write_results("benchmark_endpoint", {
        "command": " ".join(sys.argv), "docs": args.docs, "tokens": sum(tokens),
        "request_inputs": args.request_inputs, "saturation_concurrency": saturation,
        "results": rows}, args.json)
    print_json_result({"json": str(path)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
