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

from pipeline.cluster import ALGORITHMS, run_clustering
from pipeline.config import SettingsError, add_profile_arguments, load_settings
from pipeline.logs import configure_job_logging, print_json_result
from pipeline.spark.session import get_spark, is_connect


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_profile_arguments(parser, model_help=None)
    parser.add_argument("--vectors", required=True, help="the vectors table (path or name)")
    parser.add_argument("--output", required=True,
                        help="prefix of the assignments and centroids tables")
    parser.add_argument("--k", default="4,6,8,10",
                        help="clusters: one k, or a comma list to choose by silhouette")
    parser.add_argument("--algorithm", choices=sorted(ALGORITHMS), default="kmeans")
    parser.add_argument("--plot", help="PNG path for the 2-D projection coloured by cluster")
    parser.add_argument("--seed", type=int, default=7)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    configure_job_logging()
    args = parse_args(argv)
    ks = [int(k) for k in args.k.split(",") if k.strip()]
    if not ks or min(ks) < 2:
        print("error: --k needs values of at least 2", file=sys.stderr)
        return 2
    try:
        settings = load_settings(args.config, args.overrides, require_io=False)
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    spark = get_spark(dataclasses.replace(settings.spark, app_name="cluster-embeddings"))
    try:
        report = run_clustering(spark, args.vectors, args.output, ks, args.algorithm, args.plot,
                                args.seed)
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
    print_json_result(report.to_dict())
    return 0


if __name__ == "__main__":
    sys.exit(main())
