"""The Databricks notebook runs top to bottom on local Spark; the bundle is well formed."""

from __future__ import annotations

import json
import re
import runpy

import numpy as np
import yaml
from deltalake import DeltaTable

from tests.conftest import REPO
from tests.test_incremental import assert_same_table, table_frame
from tests.test_spark_embed import embed

BUNDLE = REPO / "jobs" / "databricks" / "databricks.yml"
NOTEBOOK = REPO / "jobs" / "databricks" / "embed_corpus_notebook.py"


def test_notebook_is_databricks_source_format():
    text = NOTEBOOK.read_text()
    assert text.startswith("# Databricks notebook source\n")
    assert text.count("# COMMAND ----------") >= 3
    assert "%pip install spark-embed-pipeline" in text


def test_notebook_runs_top_to_bottom_and_writes_the_jobs_table(spark, tmp_path, monkeypatch,
                                                               capsys):
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(NOTEBOOK), init_globals={"spark": spark})
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    summary = next(row for row in map(json.loads, printed) if "run_id" in row)
    assert summary["documents_embedded"] == summary["documents_read"] > 0
    notebook_table = table_frame(tmp_path / "data" / "sample_vectors")
    embed(spark, "builtin:sample_corpus", tmp_path / "job_vectors")
    assert_same_table(notebook_table, table_frame(tmp_path / "job_vectors"))
    vectors = np.stack(notebook_table.embedding.to_numpy())
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert DeltaTable(str(tmp_path / "data" / "sample_vectors")).version() >= 1


def test_bundle_runs_the_notebook_and_the_job_on_gpu_executors():
    from jobs.embed_corpus import parse_args

    bundle = yaml.safe_load(BUNDLE.read_text())
    job = bundle["resources"]["jobs"]["embed_corpus"]
    (cluster,) = job["job_clusters"]
    conf = cluster["new_cluster"]["spark_conf"]
    assert conf["spark.task.resource.gpu.amount"] == conf["spark.executor.resource.gpu.amount"]
    assert "gpu" in cluster["new_cluster"]["spark_version"]
    tasks = {task["task_key"]: task for task in job["tasks"]}
    notebook = tasks["embed_notebook"]["notebook_task"]
    assert (BUNDLE.parent / notebook["notebook_path"]).resolve() == NOTEBOOK
    assert set(notebook["base_parameters"]) == {"input", "output", "model", "profile", "mode"}
    python_task = tasks["embed_job"]["spark_python_task"]
    assert (BUNDLE.parent / python_task["python_file"]).resolve() == REPO / "jobs" / \
        "embed_corpus.py"
    variables = {name: spec["default"] for name, spec in bundle["variables"].items()}
    argv = [re.sub(r"\$\{var\.(\w+)\}", lambda m: variables[m.group(1)], arg)
            for arg in python_task["parameters"]]
    args = parse_args(argv)
    assert (args.config, args.input, args.model) == ("databricks", variables["input_table"],
                                                     variables["model_path"])
    for task in tasks.values():
        assert task["job_cluster_key"] == cluster["job_cluster_key"]
        assert {"pypi": {"package": "spark-embed-pipeline"}} in task["libraries"]
