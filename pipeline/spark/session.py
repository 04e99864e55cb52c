"""The SparkSession: the one already running (spark-submit, Databricks, a notebook), else a local
session with Delta Lake: from the JARs `make setup` keeps with the pip-installed Spark, else
resolved from Maven Central by Ivy.

`python -m pipeline.spark.session` (run by `make setup`) prepares the pip-installed Spark once:
Delta's JARs next to it, a spark-defaults.conf naming them and this Python, and a
log4j2.properties that keeps the console to warnings, the progress bar and our own log lines."""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

from pyspark.sql import SparkSession

from pipeline.config import SparkSettings

log = logging.getLogger("pipeline.spark")

DELTA_SQL_CONF = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}
# Session settings for a local master, also under spark-submit (where the user's own win):
# Spark's 200 shuffle partitions and Delta's 50 for a snapshot are tasks a laptop runs for
# nothing (a Delta snapshot of a small table takes seconds more).
LOCAL_SQL_CONF = {
    "spark.sql.shuffle.partitions": "8",
    "spark.databricks.delta.snapshotPartitions": "2",
}
LOCAL_CONF = {
    "spark.ui.showConsoleProgress": "true",
    **LOCAL_SQL_CONF,
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.driver.memory": "4g",
    "spark.python.worker.reuse": "true",
}
# Inside the pip-installed Spark (SPARK_HOME), next to its own jars/ and conf/: Delta's JARs and
# the Maven coordinates they were resolved for (the first line of the manifest, then the files).
DELTA_JARS_FOLDER = "delta-jars"
DELTA_JARS_MANIFEST = "MANIFEST"
LOG4J_MARKER = "# Written by `python -m pipeline.spark.session` (make setup)."
LOG4J_CONFIG = LOG4J_MARKER + """
# Spark logs warnings and errors only; the console progress bar is not a log and still shows,
# and the pipeline's own lines come from Python logging. Set rootLogger.level = info for Spark's
# INFO lines; delete the first line of this file to keep your edits from the next `make setup`.
rootLogger.level = warn
rootLogger.appenderRef.stdout.ref = console

appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n%ex

# As Spark's own defaults: third-party loggers that are noisy even at WARN.
logger.jetty.name = org.sparkproject.jetty
logger.jetty.level = warn
logger.jetty2.name = org.sparkproject.jetty.util.component.AbstractLifeCycle
logger.jetty2.level = error
logger.parquet.name = org.apache.parquet.CorruptStatistics
logger.parquet.level = error
logger.parquet2.name = parquet.CorruptStatistics
logger.parquet2.level = error
# A laptop has no native Hadoop libraries, and Spark's Java fallback is what it uses anyway.
logger.nativecode.name = org.apache.hadoop.util.NativeCodeLoader
logger.nativecode.level = error
"""


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
    """The running session, else a Spark Connect session (spark.remote or SPARK_REMOTE), else
    a local or spark-submit session with Delta."""
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    remote = settings.remote or os.environ.get("SPARK_REMOTE")
    if remote:
        return connect_session(remote, settings)
    builder = SparkSession.builder.appName(settings.app_name)
    conf = {**DELTA_SQL_CONF, "spark.sql.execution.arrow.maxRecordsPerBatch":
            str(settings.arrow_batch_rows)}
    if not in_spark_submit():
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        conf = {**LOCAL_CONF, **conf, **delta_jars_conf()}
        builder = builder.master(settings.master)
    for key, value in {**conf, **settings.conf}.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    _quiet_spark_logs(spark)
    if in_spark_submit():
        _local_sql_defaults(spark)
    return spark


def _local_sql_defaults(spark: SparkSession) -> None:
    """LOCAL_SQL_CONF for a spark-submit session on a local master, except what the user set."""
    given = spark.sparkContext.getConf()
    if not given.get("spark.master", "").startswith("local"):
        return
    for key, value in LOCAL_SQL_CONF.items():
        if not given.contains(key):
            spark.conf.set(key, value)


def connect_session(remote: str, settings: SparkSettings) -> SparkSession:
    """A Spark Connect session: the server owns master, JARs and static settings (Delta's SQL
    extension must be on there); only session settings are sent."""
    builder = SparkSession.builder.remote(remote).appName(settings.app_name)
    conf = {"spark.sql.execution.arrow.maxRecordsPerBatch": str(settings.arrow_batch_rows),
            **settings.conf}
    for key, value in conf.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def is_connect(spark: SparkSession) -> bool:
    """Whether this session talks to a Spark Connect server (no SparkContext here)."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


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


# --- the local, pip-installed Spark (make setup) ------------------------------------------


def local_spark_home() -> Path:
    from pyspark.find_spark_home import _find_spark_home

    return Path(_find_spark_home())


def delta_jars_conf(spark_home: Path | None = None) -> dict[str, str]:
    """How a local session gets Delta: the JARs setup kept (no Ivy: quiet, and offline), else
    the Maven coordinates for Ivy to resolve."""
    jars = local_delta_jars(spark_home)
    if jars:
        return {"spark.jars": ",".join(jars)}
    return {"spark.jars.packages": delta_maven_coordinates()}


def local_delta_jars(spark_home: Path | None = None) -> list[str] | None:
    """The absolute paths of the Delta JARs kept with the pip-installed Spark, if they are there
    and were resolved for the installed delta-spark; else None."""
    folder = (spark_home or local_spark_home()) / DELTA_JARS_FOLDER
    manifest = folder / DELTA_JARS_MANIFEST
    if not manifest.is_file():
        return None
    coordinates, *names = manifest.read_text().split()
    jars = [folder / name for name in names]
    if coordinates != delta_maven_coordinates() or not jars or not all(j.is_file() for j in jars):
        return None
    return [str(jar) for jar in jars]


def install_delta_jars(spark_home: Path | None = None) -> list[str]:
    """Resolve Delta's JARs with Ivy once (from its cache when it holds them) and copy them into
    the pip-installed Spark, so that later sessions start without Ivy. Their paths."""
    kept = local_delta_jars(spark_home)
    if kept:
        return kept
    coordinates = delta_maven_coordinates()
    resolved = _resolve_with_ivy(coordinates)
    if not resolved:
        raise RuntimeError(f"Ivy resolved no JARs for {coordinates}")
    folder = (spark_home or local_spark_home()) / DELTA_JARS_FOLDER
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for jar in resolved:
        shutil.copy2(jar, folder / jar.name)
    (folder / DELTA_JARS_MANIFEST).write_text("\n".join([coordinates, *(j.name for j in resolved)])
                                              + "\n")
    return [str(folder / jar.name) for jar in resolved]


def _resolve_with_ivy(coordinates: str) -> list[Path]:
    """The JAR files Ivy resolves for `coordinates`, as spark-submit lists them in spark.jars.
    The session starts with an empty conf folder, so no spark-defaults.conf (with JARs of an
    older Delta, say) adds to the list."""
    previous = os.environ.get("SPARK_CONF_DIR")
    with tempfile.TemporaryDirectory() as empty:
        os.environ["SPARK_CONF_DIR"] = empty
        try:
            spark = (SparkSession.builder.master("local[1]").appName("resolve-delta-jars")
                     .config("spark.jars.packages", coordinates)
                     .config("spark.ui.enabled", "false").getOrCreate())
            try:
                listed = spark.sparkContext.getConf().get("spark.jars", "")
            finally:
                spark.stop()
        finally:
            if previous is None:
                os.environ.pop("SPARK_CONF_DIR")
            else:
                os.environ["SPARK_CONF_DIR"] = previous
    return [Path(unquote(urlparse(uri).path)) for uri in listed.split(",") if uri]


_PROPERTY = re.compile(r"^\s*([^\s#!=:]+)[\s=:]+(.*?)\s*$")


def write_spark_defaults(jars: list[str], spark_home: Path | None = None) -> str:
    """Make plain `spark-submit` of this environment find Delta (the JARs in `jars`) and this
    Python, with the local settings `python jobs/...` uses: writes spark-defaults.conf into the
    pip-installed Spark's conf folder. Keys already there are kept, except where this code
    manages them: Delta's Maven coordinates leave spark.jars.packages (a line an older version
    wrote, which would send every start through Ivy), and spark.jars holds `jars` in place of
    any JARs of the Delta folder, next to the user's own."""
    path = (spark_home or local_spark_home()) / "conf" / "spark-defaults.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = str(Path(jars[0]).parent) if jars else None
    wanted = {
        "spark.jars": ",".join(jars),
        **DELTA_SQL_CONF,
        **LOCAL_CONF,
        "spark.pyspark.python": sys.executable,
        "spark.pyspark.driver.python": sys.executable,
    }
    lines, present = [], set()
    for line in (path.read_text().splitlines() if path.exists() else []):
        match = _PROPERTY.match(line)
        key, value = match.groups() if match else (None, "")
        if key == "spark.jars.packages":
            packages = [p for p in value.split(",") if p.strip() and
                        not p.strip().startswith("io.delta:")]
            if not packages:
                continue
            line = f"{key} {','.join(packages)}"
        elif key == "spark.jars":
            own = [j for j in value.split(",") if j.strip() and
                   str(Path(j.strip()).parent) != folder]
            line = f"{key} {','.join([*own, *jars])}"
        if key:
            present.add(key)
        lines.append(line)
    lines += [f"{key} {value}" for key, value in wanted.items() if key not in present and value]
    _replace_file(path, "\n".join(lines) + "\n")
    return str(path)


def write_log4j_config(spark_home: Path | None = None) -> str | None:
    """Spark's console at WARN for this environment (spark-submit and `python jobs/...` alike):
    writes conf/log4j2.properties unless the user has one of their own. Its path, or None."""
    path = (spark_home or local_spark_home()) / "conf" / "log4j2.properties"
    if path.exists() and not path.read_text().startswith(LOG4J_MARKER):
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace_file(path, LOG4J_CONFIG)
    return str(path)


def _replace_file(path: Path, text: str) -> None:
    """Whole or not at all: a Spark starting meanwhile reads the old file or the new one."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text)
    partial.replace(path)


def configure_local_spark() -> None:
    jars = install_delta_jars()
    print(f"Delta JARs in {Path(jars[0]).parent}")
    print(f"wrote {write_spark_defaults(jars)}")
    log4j = write_log4j_config()
    print(f"wrote {log4j}" if log4j else "kept your log4j2.properties")


if __name__ == "__main__":
    configure_local_spark()
