"""The SparkSession: the one already running (spark-submit, Databricks, a notebook), else a local
session with Delta Lake resolved from Maven Central (Ivy caches the JARs between runs)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from pyspark.sql import SparkSession

from pipeline.config import SparkSettings

log = logging.getLogger("pipeline.spark")

DELTA_SQL_CONF = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}
LOCAL_CONF = {
    "spark.ui.showConsoleProgress": "true",
    "spark.sql.shuffle.partitions": "8",
    "spark.databricks.delta.snapshotPartitions": "2",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.driver.memory": "4g",
    "spark.python.worker.reuse": "true",
}


def delta_maven_coordinates() -> str:
    """The Delta artifact matching the installed pyspark and delta-spark pip packages."""
    from delta.pip_utils import configure_spark_with_delta_pip

    builder = configure_spark_with_delta_pip(SparkSession.Builder())
    return builder._options["spark.jars.packages"]


def in_spark_submit() -> bool:
    """True inside spark-submit or a managed runtime, where the JVM already exists and its
    launcher, not this code, decides master and packages."""
    return "PYSPARK_GATEWAY_PORT" in os.environ or "DATABRICKS_RUNTIME_VERSION" in os.environ


def get_spark(settings: SparkSettings) -> SparkSession:
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    builder = SparkSession.builder.appName(settings.app_name)
    conf = {**DELTA_SQL_CONF, "spark.sql.execution.arrow.maxRecordsPerBatch":
            str(settings.arrow_batch_rows)}
    if not in_spark_submit():
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        conf = {**LOCAL_CONF, **conf, "spark.jars.packages": delta_maven_coordinates()}
        builder = builder.master(settings.master)
    for key, value in {**conf, **settings.conf}.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    _quiet_spark_logs(spark)
    return spark


def _quiet_spark_logs(spark: SparkSession) -> None:
    """Spark logs at INFO under spark-submit by default; keep the console to progress and ours."""
    try:
        spark.sparkContext.setLogLevel("WARN")
    except Exception:  # Spark Connect: no SparkContext, the server owns its logs
        log.debug("log level left to the Spark Connect server")


def default_parallelism(spark: SparkSession) -> int:
    """Cores Spark can run tasks on; Spark Connect has no SparkContext, so fall back to conf."""
    try:
        return int(spark.sparkContext.defaultParallelism)
    except Exception:
        return int(spark.conf.get("spark.default.parallelism", "8"))


def write_spark_defaults() -> str:
    """Make plain `spark-submit` of this environment find Delta and this Python, with the local
    settings `python jobs/...` uses: writes spark-defaults.conf into the pip-installed Spark's
    conf folder (keys already there are kept)."""
    from pyspark.find_spark_home import _find_spark_home

    path = Path(_find_spark_home()) / "conf" / "spark-defaults.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    wanted = {
        "spark.jars.packages": delta_maven_coordinates(),
        **DELTA_SQL_CONF,
        **LOCAL_CONF,
        "spark.pyspark.python": sys.executable,
        "spark.pyspark.driver.python": sys.executable,
    }
    lines = path.read_text().splitlines() if path.exists() else []
    present = {line.split()[0] for line in lines if line.strip() and not line.startswith("#")}
    lines += [f"{key} {value}" for key, value in wanted.items() if key not in present]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


if __name__ == "__main__":
    print(f"wrote {write_spark_defaults()}")
    get_spark(SparkSettings(master="local[1]", app_name="warm-ivy-cache")).stop()
    print("Delta JARs resolved into the Ivy cache")
