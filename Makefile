# One virtual environment for everything: the pipeline, local Spark + Delta, the sample model, tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# As after `source .venv/bin/activate`: spark-submit finds its Spark through `python3`.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup quickstart test lint wheel

setup: $(VENV)/.installed $(VENV)/.spark-configured

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[spark,sample,plots,ann,dev]"
	touch $@

# The pip-installed Spark, once: Delta's JARs resolved by Ivy and kept next to it, a
# spark-defaults.conf naming them and this Python, and a log4j2.properties at WARN. Then
# spark-submit and `python jobs/...` start without Ivy (offline) and print no INFO lines.
$(VENV)/.spark-configured: $(VENV)/.installed pipeline/spark/session.py
	$(BIN)/python -m pipeline.spark.session
	touch $@

quickstart: setup
	$(BIN)/spark-submit jobs/embed_corpus.py

# The package as a wheel in dist/ (profiles, discovery script and sample corpus inside), to
# install on a cluster: Databricks `%pip install /Volumes/...whl`, a bundle library, spark-submit nodes.
# build/ goes first: setuptools would otherwise carry files left over from earlier builds.
wheel: setup
	rm -rf build dist/spark_embed_pipeline-*.whl
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -w dist .

lint: setup
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest
