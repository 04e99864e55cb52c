"""Similarity scoring: a table of text pairs -> the pairs with the cosine of their vectors, and,
against a gold column, Pearson and Spearman correlations (the STS Benchmark measure)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from pipeline.config import Settings
from pipeline.metrics import pearson, spearman
from pipeline.model.spec import resolve_model_spec
from pipeline.spark.io import is_blank, read_source
from pipeline.spark.session import default_parallelism
from pipeline.spark.udf import similarity_udf, worker_spec
from pipeline.store.outputs import write_output


@dataclass
class SimilarityReport:
    pairs: int
    scored: int
    rejected: int
    rejected_by_reason: dict[str, int]
    model_id: str
    output: str | None
    seconds: float
    pearson: float | None = None
    spearman: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def gold_number(gold_col: str) -> Column:
    """The gold value as a double, null when it is not a number (a plain cast raises under
    ANSI mode, Spark 4's default)."""
    quoted = gold_col.replace("`", "``")
    return F.expr(f"try_cast(`{quoted}` AS double)")


def correlations(scores, gold) -> tuple[float | None, float | None]:
    """Pearson and Spearman, or None where they are undefined (fewer than two pairs, or a
    constant side)."""
    try:
        return round(pearson(scores, gold), 6), round(spearman(scores, gold), 6)
    except ValueError:
        return None, None


def pair_reject_reason(text_a: str, text_b: str, gold_col: str | None) -> Column:
    """Why a pair cannot be scored, or null."""
    def empty(name: str) -> Column:
        return F.col(name).isNull() | is_blank(F.col(name).cast("string"))

    reason = (F.when(empty(text_a), F.lit(f"empty {text_a}"))
              .when(empty(text_b), F.lit(f"empty {text_b}")))
    if gold_col:
        reason = reason.when(gold_number(gold_col).isNull(),
                             F.lit(f"{gold_col} is not a number"))
    return reason


def score_pairs(spark: SparkSession, settings: Settings, text_a: str, text_b: str,
                gold_col: str | None = None, kind: str = "document", output: str | None = None
                ) -> tuple[DataFrame, SimilarityReport]:
    """Every source row with `score` (cosine) and `reject_reason`; rejected rows keep a null
    score. The scored frame is materialised once, so the model runs once per pair."""
    started = time.perf_counter()
    columns = {"--text-a-col": text_a, "--text-b-col": text_b, "--gold-col": gold_col}
    source = read_source(spark, settings.input, columns)
    spec = resolve_model_spec(settings.model)
    score = similarity_udf(worker_spec(settings, spec), kind)
    flagged = source.withColumn("reject_reason", pair_reject_reason(text_a, text_b, gold_col))
    valid = flagged.where(F.col("reject_reason").isNull())
    partitions = settings.spark.partitions or default_parallelism(spark)
    scored = (valid.repartition(partitions)
              .withColumn("score", score(F.col(text_a).cast("string"),
                                         F.col(text_b).cast("string")))
              .unionByName(flagged.where(F.col("reject_reason").isNotNull())
                           .withColumn("score", F.lit(None).cast("double")))
              .localCheckpoint(eager=True))
    reasons = {row["reject_reason"]: row["count"] for row in
               scored.groupBy("reject_reason").count().collect()}
    valid_count = reasons.pop(None, 0)
    report = SimilarityReport(
        pairs=valid_count + sum(reasons.values()), scored=valid_count,
        rejected=sum(reasons.values()), rejected_by_reason=reasons, model_id=spec.model_id,
        output=write_output(scored, output) if output else None, seconds=0.0)
    if gold_col and valid_count:
        pairs = (scored.where(F.col("score").isNotNull())
                 .select("score", gold_number(gold_col).alias("gold")).toPandas())
        report.pearson, report.spearman = correlations(pairs.score, pairs.gold)
    report.seconds = round(time.perf_counter() - started, 2)
    return scored, report
