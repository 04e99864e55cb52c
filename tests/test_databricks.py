"""The Databricks notebook runs top to bottom on local Spark; the wheel it installs carries the
profiles and the sample corpus; the bundle builds that wheel and references only files it syncs."""

from __future__ import annotations

import glob
import json
import os
import re
import runpy
import shlex
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from deltalake import DeltaTable

from pipeline.config import load_settings
from tests.conftest import REPO, SAMPLE_CORPUS
from tests.test_incremental import assert_same_table, table_frame
from tests.test_spark_embed import embed

BUNDLE = REPO / "jobs" / "databricks" / "databricks.yml"
NOTEBOOK = REPO / "jobs" / "databricks" / "embed_corpus_notebook.py"
README = REPO / "README.md"
# What the wheel and the bundle are built from; copied, links kept, so that a build never touches
# the checkout (setuptools' build/ would otherwise carry stale files into later wheels).
BUILD_SOURCES = ("pyproject.toml", "README.md", "pipeline", "conf", "jobs")
INSTALLED_CHECK = """
import json, os, sys
import pipeline
from pipeline.config import CONF_DIR, load_settings
from pipeline.spark.io import resolve_input_path

databricks = load_settings("databricks")
qwen = load_settings("qwen3-embedding-4b", flags={"input.path": "docs", "output.path": "vectors"})
print(json.dumps({
    "package": pipeline.__file__,
    "sys_path": sys.path,
    "profiles": sorted(path.stem for path in CONF_DIR.glob("*.yaml")),
    "databricks_model": databricks.model.name,
    "qwen_gpus": [qwen.spark.conf[key] for key in ("spark.executor.resource.gpu.amount",
                                                   "spark.task.resource.gpu.amount")],
    "discovery_script": qwen.spark.conf["spark.executor.resource.gpu.discoveryScript"],
    "script_executable": os.access(CONF_DIR / "get_gpus_resources.sh", os.X_OK),
    "corpus": resolve_input_path("builtin:sample_corpus"),
}))
"""


def bundle_config() -> dict:
    return yaml.safe_load(BUNDLE.read_text())


def wheel_folder(artifact: dict) -> str:
    """The folder the artifact's build command writes the wheel to (pip's --wheel-dir)."""
    words = shlex.split(artifact["build"])
    assert words[1:4] == ["-m", "pip", "wheel"], artifact["build"]
    for flag in ("--wheel-dir", "-w"):
        if flag in words:
            return words[words.index(flag) + 1]
    raise AssertionError(f"no --wheel-dir in {artifact['build']!r}")


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A copy of the repository's build inputs with the wheel built as the bundle's artifact
    builds it: in the artifact's folder, into the build command's --wheel-dir (offline: the
    environment's setuptools, no build isolation)."""
    root = tmp_path_factory.mktemp("checkout")
    for name in BUILD_SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, root / name)
    (artifact,) = bundle_config()["artifacts"].values()
    project = (root / BUNDLE.relative_to(REPO)).parent / artifact["path"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "--wheel-dir", wheel_folder(artifact), "."],
                   cwd=project, check=True, capture_output=True, timeout=300)
    return root


@pytest.fixture(scope="module")
def wheel(checkout) -> Path:
    (artifact,) = bundle_config()["artifacts"].values()
    project = (checkout / BUNDLE.relative_to(REPO)).parent / artifact["path"]
    (built,) = (project / wheel_folder(artifact)).glob("*.whl")
    return built


def test_notebook_is_databricks_source_format():
    text = NOTEBOOK.read_text()
    assert text.startswith("# Databricks notebook source\n")
    assert text.count("# COMMAND ----------") >= 3


def test_notebook_and_readme_install_the_wheel_the_build_makes(wheel):
    """Not on PyPI: the documented install is the built wheel, uploaded to a volume."""
    volume = "/Volumes/<catalog>/<schema>/<volume>/"
    where_it_runs = README.read_text().split("\n## Where it runs\n")[1].split("\n## ")[0]
    for text in (NOTEBOOK.read_text(), where_it_runs):
        assert f"%pip install {volume}{wheel.name}" in text
        assert re.search(rf"databricks fs cp dist/{re.escape(wheel.name)}\s+(\\\s+)?"
                         rf"(# MAGIC\s+)?dbfs:{re.escape(volume)}", text)
        assert "%pip install spark-embed-pipeline" not in text


def test_wheel_carries_the_profiles_and_the_sample_corpus_outside_the_checkout(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as archive:
        members = {info.filename: info for info in archive.infolist()}
        for source in [*sorted((REPO / "conf").iterdir()), SAMPLE_CORPUS]:
            name = f"pipeline/{source.parent.name}/{source.name}"
            assert name in members, f"{name} is not in {wheel.name}"
            assert not stat.S_ISLNK(members[name].external_attr >> 16), f"{name} is a link"
            assert archive.read(name) == source.read_bytes()
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--target", str(site), str(wheel)], check=True, capture_output=True,
                   timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", INSTALLED_CHECK], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    installed = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(installed["package"]).is_relative_to(site)
    assert not any((elsewhere / entry).resolve() == REPO for entry in installed["sys_path"])
    assert installed["profiles"] == sorted(path.stem for path in (REPO / "conf").glob("*.yaml"))
    assert installed["databricks_model"].startswith("/Volumes/")
    assert installed["qwen_gpus"] == ["1", "1"]
    assert installed["discovery_script"] == "./get_gpus_resources.sh"
    assert installed["script_executable"]
    corpus = Path(installed["corpus"])
    assert corpus.is_relative_to(site) and corpus.read_bytes() == SAMPLE_CORPUS.read_bytes()


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


def test_bundle_declares_gpu_tasks_for_the_notebook_and_the_job_with_files_it_deploys(checkout):
    from jobs.embed_corpus import parse_args

    bundle = bundle_config()
    bundle_dir = (checkout / BUNDLE.relative_to(REPO)).parent
    job = bundle["resources"]["jobs"]["embed_corpus"]
    (cluster,) = job["job_clusters"]
    new_cluster = cluster["new_cluster"]
    conf = new_cluster["spark_conf"]
    assert conf["spark.task.resource.gpu.amount"] == conf["spark.executor.resource.gpu.amount"] \
        == "1"
    assert "gpu" in new_cluster["spark_version"]
    # Unity Catalog on a GPU ML runtime needs dedicated (single user) access mode.
    assert new_cluster["data_security_mode"] == "SINGLE_USER"
    variables = {name: spec["default"] for name, spec in bundle["variables"].items()}
    assert new_cluster["node_type_id"] == "${var.gpu_node_type}"
    assert variables["gpu_node_type"]

    # The wheel: built by the CLI in the repository root, installed as a cluster library.
    (artifact,) = bundle["artifacts"].values()
    assert artifact["type"] == "whl"
    project = (bundle_dir / artifact["path"]).resolve()
    assert (project / "pyproject.toml").is_file()
    assert (project / "pyproject.toml").read_bytes() == (REPO / "pyproject.toml").read_bytes()

    # Every file a task references exists and lies in the tree `bundle deploy` syncs.
    sync = bundle.get("sync", {})
    synced = [(bundle_dir / path).resolve() for path in sync.get("paths", ["."])]
    synced.append(bundle_dir.resolve())
    excluded = [(bundle_dir / pattern.removesuffix("/**")).resolve()
                for pattern in sync.get("exclude", [])]

    def deployed(reference: str, library: bool = False) -> list[Path]:
        found = [Path(path).resolve() for path in sorted(glob.glob(str(bundle_dir / reference)))]
        assert found and all(path.is_file() for path in found), f"{reference} matches no file"
        for path in found:
            assert any(path.is_relative_to(root) for root in synced), \
                f"{reference} lies outside the bundle root and the sync paths {synced}"
            # A library travels as an uploaded artifact; task files as synced files.
            assert library or not any(path.is_relative_to(gone) for gone in excluded), \
                f"{reference} is excluded from the sync"
        return found

    tasks = {task["task_key"]: task for task in job["tasks"]}
    notebook = tasks["embed_notebook"]["notebook_task"]
    assert deployed(notebook["notebook_path"]) == [
        (checkout / NOTEBOOK.relative_to(REPO)).resolve()]
    assert set(notebook["base_parameters"]) == {"input", "output", "model", "profile", "mode"}
    python_task = tasks["embed_job"]["spark_python_task"]
    assert deployed(python_task["python_file"]) == [
        (checkout / "jobs" / "embed_corpus.py").resolve()]
    argv = [re.sub(r"\$\{var\.(\w+)\}", lambda m: variables[m.group(1)], arg)
            for arg in python_task["parameters"]]
    args = parse_args(argv)
    assert (args.config, args.input, args.model) == ("databricks", variables["input_table"],
                                                     variables["model_path"])
    built = (project / wheel_folder(artifact)).resolve()
    for task in tasks.values():
        assert task["job_cluster_key"] == cluster["job_cluster_key"]
        (library,) = task["libraries"]
        wheels = deployed(library["whl"], library=True)
        assert [path.parent for path in wheels] == [built]


class RecordedWidgets:
    """`dbutils.widgets` as Databricks runs it: text widgets with defaults, and given values."""

    def __init__(self, given: dict[str, str]) -> None:
        self.given, self.defaults = given, {}

    def text(self, name: str, default: str) -> None:
        self.defaults[name] = default

    def get(self, name: str) -> str:
        return self.given.get(name, self.defaults[name])


def test_notebook_widgets_default_to_the_chosen_profiles_settings():
    """The widgets show the profile's input, output, model and mode; left as they are, the run
    gets the profile's settings."""
    text = NOTEBOOK.read_text()
    setup = text[:text.index("summary = run_embedding(")]  # the cells before the run
    widgets = RecordedWidgets({"profile": "databricks"})
    namespace = {"dbutils": SimpleNamespace(widgets=widgets), "spark": "the cluster's session"}
    exec(compile(setup, str(NOTEBOOK), "exec"), namespace)
    profile = load_settings("databricks")
    assert widgets.defaults == {"profile": "local", "input": profile.input.path,
                                "output": profile.output.path, "model": profile.model.name,
                                "mode": profile.output.mode}
    assert namespace["settings"] == profile
