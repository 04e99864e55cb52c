"""Clustering finds planted clusters in well-separated vectors and writes its tables and PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jobs import cluster_embeddings
from pipeline.cluster import run_clustering
from tests.conftest import delta_rows

TOPICS = ["river water fish", "engine motor fuel", "violin music concert", "planet orbit star"]


@pytest.fixture(scope="module")
def planted(spark, tmp_path_factory):
    """400 unit vectors around 4 random centres in 32-d, each with a topical text."""
    folder = tmp_path_factory.mktemp("clusters")
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 32))
    labels = np.repeat(np.arange(4), 100)
    points = centres[labels] + 0.05 * rng.normal(size=(400, 32))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    rows = [(f"doc-{i}", 0, f"{TOPICS[label]} note {i}", [float(x) for x in point])
            for i, (label, point) in enumerate(zip(labels, points, strict=True))]
    spark.createDataFrame(rows, "doc_id string, chunk_index int, chunk_text string, "
                                "embedding array<float>").write.format("delta").save(
        str(folder / "vectors"))
    return folder, labels


def test_k_is_chosen_by_silhouette_and_clusters_match_the_planted_ones(spark, planted):
    folder, labels = planted
    report = run_clustering(spark, str(folder / "vectors"), str(folder / "out"), [2, 3, 4, 6],
                            plot=str(folder / "clusters.png"))
    assert report.k == 4 and report.silhouette > 0.9
    assert report.silhouettes[4] == max(report.silhouettes.values())
    assignments = delta_rows(str(folder / "out_assignments"))
    found = assignments.set_index("doc_id").loc[[f"doc-{i}" for i in range(400)], "cluster"]
    for label in range(4):
        assert found[labels == label].nunique() == 1, "a planted cluster was split"
    assert found.nunique() == 4
    assert (assignments.distance >= -1e-6).all() and (assignments.distance < 0.1).all()
    centroids = delta_rows(str(folder / "out_centroids"))
    assert sorted(centroids["size"]) == [100, 100, 100, 100]
    for cluster, words in report.top_terms.items():
        topic = next(t for t in TOPICS if t.split()[0] in " ".join(words))
        assert all(text.startswith(topic) for text in report.typical_texts[cluster])
    assert (folder / "clusters.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bisecting_kmeans_with_a_single_k(spark, planted):
    folder, _ = planted
    report = run_clustering(spark, str(folder / "vectors"), str(folder / "bisect"), [4],
                            algorithm="bisecting")
    assert report.k == 4 and sorted(report.sizes.values()) == [100, 100, 100, 100]


def test_the_job_takes_a_profile_and_prints_its_report_last(spark, planted, tmp_path, capsys):
    """--config: a profile's settings reach the job (an unknown key is refused, naming it), and
    a valid one runs it."""
    folder, _ = planted
    args = ["--vectors", str(folder / "vectors"), "--output", str(tmp_path / "out"), "--k", "4"]
    broken = tmp_path / "broken.yaml"
    broken.write_text("spark:\n  mastr: local[1]\n")
    assert cluster_embeddings.main(["--config", str(broken), *args]) == 2
    assert "spark.mastr" in capsys.readouterr().err
    profile = tmp_path / "profile.yaml"
    profile.write_text("model:\n  name: unused\nspark:\n  partitions: 2\n")
    assert cluster_embeddings.main(["--config", str(profile), *args]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["k"] == 4 and sorted(report["sizes"].values()) == [100, 100, 100, 100]
