"""The jobs over Spark Connect, as Databricks serverless and shared clusters hand them out: a
real Connect server started from the installed pyspark on 127.0.0.1, with only Delta's SQL
extension (no Delta Connect plugin, so no `DeltaTable` API), and the jobs as a user starts them
with `--remote`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyspark
import pytest

from tests.conftest import REPO, delta_rows, write_jsonl

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """`spark-submit --class ...SparkConnectServer` from pyspark's own spark-connect JAR; the
    environment's spark-defaults.conf (make setup) brings Delta's JARs and SQL extension."""
    jar = next((Path(pyspark.__file__).parent / "jars").glob("spark-connect_*.jar"))
    port = free_port()
    log = tmp_path_factory.mktemp("connect") / "server.log"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("SPARK_REMOTE", None)
    with log.open("w") as handle:
        server = subprocess.Popen(
            [str(BIN / "spark-submit"), "--class",
             "org.apache.spark.sql.connect.service.SparkConnectServer", "--master", "local[2]",
             "--conf", f"spark.connect.grpc.binding.port={port}",
             "--conf", "spark.connect.grpc.binding.address=127.0.0.1",
             "--conf", "spark.ui.enabled=false", "--conf", "spark.sql.shuffle.partitions=4",
             str(jar)], stdout=handle, stderr=handle, env=env)
    deadline = time.time() + 180
    while time.time() < deadline and server.poll() is None:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.5)
    else:
        server.kill()
        pytest.fail(f"the Connect server did not start: {log.read_text()[-3000:]}")
    yield f"sc://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=60)


def run_job(script: str, remote: str, *args: str) -> dict:
    """A job over Connect (the client process has no JVM); its last stdout line."""
    done = subprocess.run([sys.executable, str(REPO / "jobs" / script), "--remote", remote,
                           *args], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def embedded(remote, sample_docs, tmp_path_factory):
    """The sample corpus embedded over Connect."""
    folder = tmp_path_factory.mktemp("over_connect")
    source = write_jsonl(folder / "v1.jsonl", sample_docs)
    summary = run_job("embed_corpus.py", remote, "--input", str(source),
                      "--output", str(folder / "vectors"))
    return folder, summary


def test_the_sample_corpus_embeds_over_connect_like_the_encoder(embedded, sample_docs,
                                                                 minilm_encoder):
    folder, summary = embedded
    assert summary["documents_embedded"] == len(sample_docs) == summary["documents_new"]
    rows = delta_rows(folder / "vectors")
    assert len(rows) == summary["chunks_written"]
    assert not rows.duplicated(["doc_id", "chunk_index"]).any()
    sample = rows.sort_values(["doc_id", "chunk_index"]).head(20)
    expected = minilm_encoder.embed(sample.chunk_text.tolist(), "document")
    assert np.abs(np.stack(sample.embedding.to_numpy()) - expected).max() <= 1e-4
    runs = delta_rows(f"{folder / 'vectors'}_runs")
    assert runs.status.tolist() == ["succeeded"]


def test_an_identical_rerun_over_connect_embeds_nothing(embedded, remote):
    folder, first = embedded
    again = run_job("embed_corpus.py", remote, "--input", str(folder / "v1.jsonl"),
                    "--output", str(folder / "vectors"))
    assert (again["documents_embedded"], again["chunks_written"]) == (0, 0)
    assert again["table_version"] == first["table_version"]


def test_a_changed_source_over_connect_embeds_exactly_the_change(embedded, remote,
                                                                 sample_docs):
    folder, _ = embedded
    docs = [dict(d) for d in sample_docs[1:]]
    docs[0]["text"] += " One more sentence."
    docs.append({"_id": "connect-new", "title": "New", "text": "Written over Spark Connect."})
    source = write_jsonl(folder / "v2.jsonl", docs)
    summary = run_job("embed_corpus.py", remote, "--input", str(source),
                      "--output", str(folder / "vectors"))
    assert (summary["documents_new"], summary["documents_changed"],
            summary["documents_deleted"], summary["documents_embedded"]) == (1, 1, 1, 2)
    rows = delta_rows(folder / "vectors")
    assert set(rows.doc_id) == {d["_id"] for d in docs}
    assert not rows.duplicated(["doc_id", "chunk_index"]).any()


def test_search_over_connect_returns_the_exact_top_k(embedded, remote, minilm_encoder,
                                                     tmp_path):
    folder, _ = embedded
    out = tmp_path / "hits.jsonl"
    report = run_job("search.py", remote, "--vectors", str(folder / "vectors"),
                     "--query", "what is salt made of", "--k", "5", "--output", str(out))
    assert report["rows"] == 5
    hits = [json.loads(line) for line in out.read_text().splitlines()]
    rows = delta_rows(folder / "vectors")
    query = minilm_encoder.embed(["what is salt made of"], "query")[0]
    scores = np.stack(rows.embedding.to_numpy()) @ query
    best = rows.assign(score=scores).nlargest(5, "score")
    assert [(h["doc_id"], h["chunk_index"]) for h in hits] == list(
        zip(best.doc_id, best.chunk_index, strict=True))
    assert np.allclose([h["score"] for h in hits], best.score, atol=1e-4)


def test_similarity_over_connect_scores_the_encoders_cosines(remote, minilm_encoder, tmp_path):
    pairs = [{"a": "a cat sits on the mat", "b": "a kitten rests on a rug", "gold": 4.0},
             {"a": "the stock market fell", "b": "a dog runs in the park", "gold": 0.2},
             {"a": "he plays the guitar", "b": "a man is playing music", "gold": 3.1}]
    out = tmp_path / "scores.jsonl"
    report = run_job("score_similarity.py", remote, "--input",
                     str(write_jsonl(tmp_path / "pairs.jsonl", pairs)), "--text-a-col", "a",
                     "--text-b-col", "b", "--gold-col", "gold", "--output", str(out))
    assert report["scored"] == 3
    scored = {row["a"]: row["score"] for row in map(json.loads, out.read_text().splitlines())}
    a = minilm_encoder.embed([p["a"] for p in pairs], "document")
    b = minilm_encoder.embed([p["b"] for p in pairs], "document")
    assert np.allclose([scored[p["a"]] for p in pairs], (a * b).sum(axis=1), atol=1e-4)


def test_clustering_and_evaluation_run_over_connect(embedded, remote, sample_docs, tmp_path):
    folder, _ = embedded
    clusters = run_job("cluster_embeddings.py", remote, "--vectors", str(folder / "vectors"),
                       "--k", "3,4", "--output", str(tmp_path / "clusters"))
    assignments = delta_rows(f"{tmp_path / 'clusters'}_assignments")
    assert len(assignments) == len(delta_rows(folder / "vectors"))
    assert assignments.cluster.nunique() == clusters["k"]
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    docs = sample_docs[:20]
    write_jsonl(beir / "corpus.jsonl", docs)
    write_jsonl(beir / "queries.jsonl", [{"_id": f"q{i}", "text": d["text"].split(". ")[0]}
                                         for i, d in enumerate(docs[:8])])
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\t{d['_id']}\t1\n" for i, d in enumerate(docs[:8])))
    metrics = run_job("evaluate_retrieval.py", remote, "--dataset", str(beir),
                      "--vectors", str(tmp_path / "eval_vectors"))
    assert metrics["recall@100"] == 1.0 and metrics["ndcg@10"] > 0.6
