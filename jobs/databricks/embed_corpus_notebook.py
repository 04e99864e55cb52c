# Databricks notebook source
# MAGIC %md
# MAGIC # Embed a corpus into a Delta table
# MAGIC
# MAGIC Runs the same library code as `jobs/embed_corpus.py` on the cluster's own `spark`.
# MAGIC Install the package once per cluster or notebook session (the runtime already has Spark,
# MAGIC Delta, and on ML GPU runtimes torch and transformers). It is not on PyPI: build its wheel
# MAGIC (`make wheel` in the repository), copy it to a Unity Catalog volume, and install it from
# MAGIC there in a cell of its own:
# MAGIC
# MAGIC ```
# MAGIC databricks fs cp dist/spark_embed_pipeline-0.1.0-py3-none-any.whl \
# MAGIC     dbfs:/Volumes/<catalog>/<schema>/<volume>/
# MAGIC ```
# MAGIC
# MAGIC `%pip install /Volumes/<catalog>/<schema>/<volume>/spark_embed_pipeline-0.1.0-py3-none-any.whl`
# MAGIC
# MAGIC The job in `databricks.yml` builds the wheel and installs it on its cluster itself.
# MAGIC
# MAGIC Widgets: profile, then input table, output table, model folder and mode, whose defaults
# MAGIC are the profile's. The last cell shows the run summary (the same JSON the job prints).

# COMMAND ----------

import json
from operator import attrgetter

from pipeline.config import DEFAULT_PROFILE, Settings, load_settings
from pipeline.embed import run_embedding
from pipeline.spark.session import get_spark

# The settings the other widgets set; their defaults come from the chosen profile. The default
# profile (local) runs anywhere: the shipped sample corpus and the packaged model. On Databricks
# the `databricks` profile names a catalog table, a target table and a model folder in a Volume.
WIDGET_KEYS = {
    "input": "input.path",
    "output": "output.path",
    "model": "model.name",
    "mode": "output.mode",
}

# COMMAND ----------


def widget_values(defaults: dict[str, str]) -> dict[str, str]:
    """Notebook widgets on Databricks; their defaults where `dbutils` does not exist."""
    widgets = globals().get("dbutils")
    if widgets is None:
        return dict(defaults)
    for name, default in defaults.items():
        widgets.widgets.text(name, default)
    return {name: widgets.widgets.get(name) for name in defaults}


def profile_defaults(profile: Settings) -> dict[str, str]:
    """The profile's value of each widget's setting ("" where it sets none)."""
    return {widget: str(attrgetter(key)(profile) or "") for widget, key in WIDGET_KEYS.items()}


profile = widget_values({"profile": DEFAULT_PROFILE})["profile"]
values = widget_values(profile_defaults(load_settings(profile, require_io=False)))
settings = load_settings(profile,
                         flags={key: values[widget] for widget, key in WIDGET_KEYS.items()})
spark = globals().get("spark") or get_spark(settings.spark)

# COMMAND ----------

summary = run_embedding(spark, settings)
print(summary.to_json())

# COMMAND ----------

# MAGIC %md The stored vectors, one row per chunk:

# COMMAND ----------

vectors = spark.read.format("delta").load(summary.output) if "/" in summary.output \
    else spark.table(summary.output)
display = globals().get("display", lambda frame: frame.show(5, truncate=80))
display(vectors.select("doc_id", "chunk_index", "token_count", "chunk_text"))
print(json.dumps({"rows": vectors.count()}))
