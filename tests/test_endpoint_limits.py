"""The endpoint backend's pure parts: request grouping, back-off, the executor-wide slots and
rate bucket (across real processes), probe vectors, character chunks, server error messages."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import random
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import SettingsError, load_settings
from pipeline.endpoint.encoder import character_chunks, request_groups
from pipeline.endpoint.http import (
    EndpointAuthError,
    EndpointSpec,
    backoff_seconds,
    error_message,
    retry_after_seconds,
)
from pipeline.endpoint.limits import RateBucket, RequestSlots
from pipeline.vectors import encode_probe, probe_agreement


def test_request_groups_hold_the_input_and_unit_budgets_in_order():
    units = [5, 5, 5, 20, 1, 1, 1, 1]
    groups = request_groups(units, max_inputs=3, max_units=12)
    assert [i for group in groups for i in group] == list(range(len(units)))
    for group in groups:
        assert len(group) <= 3
        assert len(group) == 1 or sum(units[i] for i in group) <= 12
    assert [3] in groups  # over the budget: alone


def test_backoff_doubles_with_jitter_up_to_the_cap_and_honours_retry_after():
    spec = EndpointSpec("openai", "http://x", "m", backoff_s=1.0, max_backoff_s=8.0)
    random.seed(1)
    for attempt, ceiling in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (6, 8.0)]:
        waits = [backoff_seconds(spec, attempt, None) for _ in range(200)]
        assert ceiling / 2 <= min(waits) and max(waits) <= ceiling
        assert max(waits) - min(waits) > ceiling / 10  # jittered, not one value
    assert backoff_seconds(spec, 0, 5.0) >= 5.0
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date gone by
    assert retry_after_seconds("soon") is None


def test_openai_path_is_appended_to_a_base_url_once():
    assert EndpointSpec("openai", "http://h:1", "m").embed_path == "/v1/embeddings"
    assert EndpointSpec("openai", "http://h:1/v1", "m").embed_path == "/v1/embeddings"
    assert EndpointSpec("openai", "http://h/api/v1/embeddings", "m").embed_path == \
        "/api/v1/embeddings"
    assert EndpointSpec("tei", "http://h:1", "m").embed_path == "/embed"


def _hold_slot(folder: str, count: int, log: str, seconds: float) -> None:
    slots = RequestSlots(Path(folder), count)
    for _ in range(3):
        with slots.held():
            with open(log, "a") as handle:
                handle.write(json.dumps(["in", time.time()]) + "\n")
            time.sleep(seconds)
            with open(log, "a") as handle:
                handle.write(json.dumps(["out", time.time()]) + "\n")


def test_request_slots_hold_across_processes(tmp_path):
    """Four processes (as four tasks of one executor) with two slots: never more than two
    requests inside at once, and two do run at once."""
    log = tmp_path / "log.jsonl"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_hold_slot, args=(str(tmp_path), 2, str(log), 0.15))
               for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    events = sorted((json.loads(line) for line in log.read_text().splitlines()),
                    key=lambda e: (e[1], e[0] == "in"))
    inside = peak = 0
    for kind, _ in events:
        inside += 1 if kind == "in" else -1
        peak = max(peak, inside)
    assert len(events) == 24
    assert peak == 2


def _take(path: str, per_minute: int, times: int) -> None:
    bucket = RateBucket(Path(path), per_minute)
    for _ in range(times):
        bucket.take(1)


def test_rate_bucket_is_shared_by_processes(tmp_path):
    """A bucket of 120 a minute (2 a second) starts full: two processes taking 70 each wait
    for the 20 beyond the first 120, about ten seconds."""
    path = tmp_path / "rpm"
    context = multiprocessing.get_context("spawn")
    started = time.time()
    workers = [context.Process(target=_take, args=(str(path), 120, 70)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    elapsed = time.time() - started
    assert 8.5 <= elapsed <= 30


def test_probe_vectors_agree_for_the_same_model_within_noise_and_not_for_another():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3, 384)).astype(np.float32)
    noisy = vectors + rng.normal(scale=1e-4, size=vectors.shape).astype(np.float32)
    other = rng.normal(size=(3, 384)).astype(np.float32)
    assert probe_agreement(encode_probe(vectors), encode_probe(noisy)) > 0.999
    assert probe_agreement(encode_probe(vectors), encode_probe(other)) < 0.5
    assert probe_agreement(encode_probe(vectors), encode_probe(vectors[:2])) == 0.0
    assert probe_agreement("garbage", encode_probe(vectors)) == 0.0


def test_character_chunks_cover_the_text_in_windows_cut_after_spaces():
    text = " ".join(f"word{i}" for i in range(400))
    chunks = character_chunks(text, 100, 20, truncate=False)
    assert all(len(chunk.text) <= 100 for chunk in chunks)
    assert chunks[0].char_start == 0 and chunks[-1].char_end == len(text)
    for before, after in itertools.pairwise(chunks):
        assert after.char_start <= before.char_end  # no gap
        assert text[after.char_start - 1] == " "  # a cut after a space
    assert all(text[c.char_start:c.char_end] == c.text for c in chunks)
    (cut,) = character_chunks(text, 100, 0, truncate=True)
    assert cut.char_start == 0 and len(cut.text) <= 100


def test_server_error_messages_are_read_from_each_api_shape():
    assert error_message({"error": {"message": "bad input"}}, b"") == "bad input"
    assert error_message({"error": "Input validation error", "error_type": "Validation"},
                         b"") == "Input validation error"
    assert "too long" in error_message({"detail": [{"msg": "too long"}]}, b"")
    assert error_message(None, b"upstream down") == "upstream down"


def test_endpoint_settings_are_checked_before_anything_runs():
    base = ["model.name=m", "model.backend=openai"]
    with pytest.raises(SettingsError, match=r"model\.endpoint\.url"):
        load_settings("local", base, require_io=False)
    with pytest.raises(SettingsError, match="concurrency must be positive"):
        load_settings("local", [*base, "model.endpoint.url=http://h",
                                "model.endpoint.concurrency=0"], require_io=False)
    with pytest.raises(SettingsError, match="not both"):
        load_settings("local", [*base, "model.endpoint.url=http://h",
                                "model.endpoint.api_key_env=K",
                                "model.endpoint.api_key_file=/k"], require_io=False)


def test_a_key_with_whitespace_inside_is_refused_without_quoting_it(tmp_path):
    secret = tmp_path / "key"
    secret.write_text("sk-first-line\nsk-second-line\n")
    spec = EndpointSpec("openai", "http://x", "m", api_key_file=str(secret))
    with pytest.raises(EndpointAuthError, match="whitespace or control") as raised:
        spec.api_key()
    assert "sk-" not in str(raised.value)


def test_retry_after_as_an_http_date_is_honoured():
    from email.utils import formatdate

    wait = retry_after_seconds(formatdate(time.time() + 30, usegmt=True))
    assert 25 <= wait <= 31


def test_the_runs_record_redacts_secrets_in_spark_conf():
    from pipeline.run.summary import REDACTED, recorded_config

    settings = load_settings("local", [
        "model.name=m", "model.backend=openai", "model.endpoint.url=http://h",
        "model.endpoint.api_key_env=EMBEDDING_KEY",
        "spark.conf.spark.executorEnv.EMBEDDING_KEY=sk-live-1",
        "spark.conf.spark.hadoop.fs.s3a.secret.key=abc",
        "spark.conf.spark.sql.shuffle.partitions=4"], require_io=False)
    conf = recorded_config(settings)["spark"]["conf"]
    assert conf["spark.executorEnv.EMBEDDING_KEY"] == REDACTED
    assert conf["spark.hadoop.fs.s3a.secret.key"] == REDACTED
    assert conf["spark.sql.shuffle.partitions"] == "4"
