"""Cluster stored vectors: k from a list by cosine silhouette, tables, texts, terms and a plot.

    spark-submit jobs/cluster_embeddings.py --vectors ./data/sample_vectors --k 4,6,8,10 \\
        --output ./data/sample_clusters --plot ./data/sample_clusters.png

Writes `<output>_assignments` (doc_id, chunk_index, cluster, distance) and `<output>_centroids`;
the last stdout line is the report as JSON."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys

from pipeline.cli import job_entry
from pipeline.cluster import ALGORITHMS, run_clustering
from pipeline.config import add_profile_arguments, load_settings
from pipeline.spark.session import get_spark, is_connect


def k_values(text: str) -> list[int]:
    """`--k 4` or `--k 4,6,8`."""
    try:
        return [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers with commas, got {text!r}"
                                         ) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_profile_arguments(parser, model_help=None)
    parser.add_argument("--vectors", required=True, help="the vectors table (path or name)")
    parser.add_argument("--output", required=True,
                        help="prefix of the assignments and centroids tables")
    parser.add_argument("--k", type=k_values, default="4,6,8,10",
                        help="clusters: one k, or a comma list to choose by silhouette")
    parser.add_argument("--algorithm", choices=sorted(ALGORITHMS), default="kmeans")
    parser.add_argument("--plot", help="PNG path for the 2-D projection coloured by cluster")
    parser.add_argument("--seed", type=int, default=7)
    return parser.parse_args(argv)


@job_entry
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    settings = load_settings(args.config, args.overrides, require_io=False)
    spark = get_spark(dataclasses.replace(settings.spark, app_name="cluster-embeddings"))
    try:
        report = run_clustering(spark, args.vectors, args.output, args.k, args.algorithm,
                                args.plot, args.seed)
    finally:
        if is_connect(spark):
            # MLlib models over Spark Connect release their server-side copies when collected;
            # at interpreter exit that call would wait forever on the closing channel.
            gc.collect()
            spark.stop()
    print(f"k={report.k} silhouette (cosine)={report.silhouette}")
    for cluster, size in report.sizes.items():
        print(f"cluster {cluster}: {size} chunks; terms: "
              f"{', '.join(report.top_terms.get(cluster, []))}")
        for text in report.typical_texts.get(cluster, []):
            print(f"    - {text[:120]}")
    return report.to_dict()


if __name__ == "__main__":
    sys.exit(main())
