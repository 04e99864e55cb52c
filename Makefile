# One virtual environment for everything: the pipeline, local Spark + Delta, the sample model, tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# As after `source .venv/bin/activate`: spark-submit finds its Spark through `python3`.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup quickstart test lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[spark,sample,plots,ann,dev]"
	# spark-defaults.conf for this environment's spark-submit, and Delta's JARs into the Ivy cache
	$(BIN)/python -m pipeline.spark.session
	touch $@

quickstart: setup
	$(BIN)/spark-submit jobs/embed_corpus.py

lint: setup
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest
