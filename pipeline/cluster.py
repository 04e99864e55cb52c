"""Clustering of stored vectors with Spark MLlib: k chosen by cosine silhouette, assignments and
centroids written to Delta, typical texts and top terms per cluster, and a 2-D picture."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from pyspark.ml.clustering import BisectingKMeans, KMeans
from pyspark.ml.evaluation import ClusteringEvaluator
from pyspark.ml.feature import PCA
from pyspark.ml.functions import array_to_vector, vector_to_array
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from pipeline.errors import UsageError
from pipeline.store.delta import TableRef
from pipeline.store.vectors import decoded_vectors, read_vectors

log = logging.getLogger("pipeline.cluster")

ALGORITHMS = {"kmeans": KMeans, "bisecting": BisectingKMeans}
_STOPWORD_TEXT = (
    "a an and are as at be by for from has have in is it its of on or that the this to was "
    "were which with not but they their there been also he she his her into than then these "
    "those who whom whose can may more most other some such only over"
)
STOPWORDS = frozenset(_STOPWORD_TEXT.split(" "))


@dataclass
class ClusterReport:
    k: int
    silhouette: float
    silhouettes: dict[int, float]
    sizes: dict[int, int]
    typical_texts: dict[int, list[str]] = field(default_factory=dict)
    top_terms: dict[int, list[str]] = field(default_factory=dict)
    assignments: str = ""
    centroids: str = ""
    plot: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def load_features(spark: SparkSession, vectors: str) -> DataFrame:
    frame, properties = read_vectors(spark, vectors)
    return decoded_vectors(frame, properties).select(
        "doc_id", "chunk_index", "chunk_text", array_to_vector("embedding").alias("features"))


def fit_best(features: DataFrame, ks: list[int], algorithm: str, seed: int):
    """Fit each k; keep the model with the best cosine silhouette."""
    evaluator = ClusteringEvaluator(distanceMeasure="cosine")
    scored = {}
    for k in ks:
        model = ALGORITHMS[algorithm](k=k, seed=seed, featuresCol="features",
                                      predictionCol="cluster").fit(features)
        scored[k] = (evaluator.setPredictionCol("cluster").evaluate(model.transform(features)),
                     model)
        log.info("k=%d: silhouette %.4f", k, scored[k][0])
    best = max(scored, key=lambda k: scored[k][0])
    return best, scored[best][1], {k: round(score, 4) for k, (score, _) in scored.items()}


def cosine_distances(assigned: DataFrame, centroids: np.ndarray) -> DataFrame:
    """Add each row's cosine distance to its own centroid."""
    unit = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    table = [F.array(*[F.lit(float(x)) for x in row]) for row in unit]
    centroid = F.element_at(F.array(*table), F.col("cluster") + 1)
    vector = F.col("vector")
    dot = F.aggregate(F.zip_with(vector, centroid, lambda a, b: a * b), F.lit(0.0),
                      lambda acc, x: acc + x)
    norm = F.sqrt(F.aggregate(F.transform(vector, lambda a: a * a), F.lit(0.0),
                              lambda acc, x: acc + x))
    return assigned.withColumn("distance", F.lit(1.0) - dot / norm)


def typical_texts(assigned: DataFrame, per_cluster: int) -> dict[int, list[str]]:
    nearest = Window.partitionBy("cluster").orderBy("distance")
    rows = (assigned.where(F.col("chunk_text").isNotNull())
            .withColumn("rank", F.row_number().over(nearest))
            .where(F.col("rank") <= per_cluster).orderBy("cluster", "rank").collect())
    texts: dict[int, list[str]] = {}
    for row in rows:
        texts.setdefault(row["cluster"], []).append(row["chunk_text"][:200])
    return texts


def top_terms(assigned: DataFrame, per_cluster: int) -> dict[int, list[str]]:
    """Words most over-represented in a cluster relative to the whole table."""
    words = (assigned.where(F.col("chunk_text").isNotNull())
             .select("cluster", F.explode(F.split(F.lower("chunk_text"), r"[^\p{L}\p{N}]+"))
                     .alias("word"))
             .where((F.length("word") > 2) & ~F.col("word").isin(*STOPWORDS)))
    in_cluster = words.groupBy("cluster", "word").count()
    overall = words.groupBy("word").agg(F.count(F.lit(1)).alias("total"))
    ranked = (in_cluster.join(overall, "word")
              .withColumn("score", F.col("count") * F.log(F.col("count") / F.col("total") + 1))
              .withColumn("rank", F.row_number().over(
                  Window.partitionBy("cluster").orderBy(F.col("score").desc(), "word")))
              .where(F.col("rank") <= per_cluster).orderBy("cluster", "rank").collect())
    terms: dict[int, list[str]] = {}
    for row in ranked:
        terms.setdefault(row["cluster"], []).append(row["word"])
    return terms


def save_projection(assigned: DataFrame, path: Path, sample: int, seed: int) -> str | None:
    """A PCA projection to 2-D of up to `sample` rows, coloured by cluster, as PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    count = assigned.count()
    rows = assigned.sample(fraction=min(1.0, sample / max(count, 1)), seed=seed)
    projected = (PCA(k=2, inputCol="features", outputCol="xy").fit(rows).transform(rows)
                 .select("cluster", "xy").collect())
    points = np.array([row["xy"].toArray() for row in projected])
    clusters = np.array([row["cluster"] for row in projected])
    figure, axes = plt.subplots(figsize=(7, 6))
    scatter = axes.scatter(points[:, 0], points[:, 1], c=clusters, cmap="tab10", s=8)
    axes.legend(*scatter.legend_elements(), title="cluster", loc="best", fontsize=8)
    axes.set_title(f"{count} vectors, 2-D PCA projection")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return str(path)


def run_clustering(spark: SparkSession, vectors: str, output: str, ks: list[int],
                   algorithm: str = "kmeans", plot: str | None = None, seed: int = 7,
                   examples: int = 3, terms: int = 8) -> ClusterReport:
    """Cluster a vectors table; write `<output>_assignments` and `<output>_centroids`."""
    if algorithm not in ALGORITHMS:
        raise UsageError(f"algorithm must be one of {sorted(ALGORITHMS)}, got {algorithm!r}")
    if not ks or min(ks) < 2:
        raise UsageError(f"clustering needs values of k of at least 2 (--k), got {ks}")
    features = load_features(spark, vectors).cache()
    k, model, silhouettes = fit_best(features, ks, algorithm, seed)
    centroids = np.array([np.asarray(c) for c in model.clusterCenters()])
    assigned = cosine_distances(
        model.transform(features).withColumn("vector", vector_to_array("features")), centroids
    ).cache()
    out = TableRef.parse(output)
    out.sibling("_assignments").write(
        assigned.select("doc_id", "chunk_index", "cluster", "distance"), "overwrite")
    sizes = {row["cluster"]: row["count"] for row in assigned.groupBy("cluster").count().collect()}
    centroid_rows = [(i, sizes.get(i, 0), [float(x) for x in c]) for i, c in enumerate(centroids)]
    out.sibling("_centroids").write(spark.createDataFrame(
        centroid_rows, "cluster int, size long, centroid array<float>"), "overwrite")
    report = ClusterReport(
        k=k, silhouette=silhouettes[k], silhouettes=silhouettes, sizes=dict(sorted(sizes.items())),
        typical_texts=typical_texts(assigned, examples), top_terms=top_terms(assigned, terms),
        assignments=out.sibling("_assignments").location,
        centroids=out.sibling("_centroids").location,
    )
    if plot:
        report.plot = save_projection(assigned, Path(plot), sample=5000, seed=seed)
    features.unpersist()
    assigned.unpersist()
    return report
