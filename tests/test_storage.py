"""Stored vector formats: float32, float16, int8 (per-vector scale) and binary, with Matryoshka
output_dim; every downstream reader decodes every format."""

from __future__ import annotations

import numpy as np
import pytest
from deltalake import DeltaTable

from pipeline.cluster import load_features
from pipeline.search import Queries, exact_search
from pipeline.store.delta import ModelMismatchError
from pipeline.store.vectors import decoded_vectors, read_vectors
from pipeline.vectors import pack_vectors, unpack_vectors
from tests.conftest import delta_rows, write_jsonl
from tests.test_spark_embed import embed

FORMATS = ("float32", "float16", "int8", "binary")
# float32 arithmetic in quantising and decoding int8 (x / scale, q * scale): a few ulps.
INT8_ARITHMETIC = 2.0 ** -20


def decoding_bound(reference: np.ndarray, fmt: str, scales: np.ndarray | None = None
                   ) -> np.ndarray:
    """What each decoded component may differ from its float32 value, by the format alone.
    float16 rounds to nearest: half an ulp, 2^-11 of the value (2^-25 below float16's normal
    range, half the subnormal spacing). int8 rounds value / scale to an integer, the scale being
    the row's largest magnitude / 127: half a quantisation step."""
    if fmt == "float16":
        return np.maximum(np.abs(reference) * 2.0 ** -11, 2.0 ** -25)
    if fmt == "int8":
        steps = np.abs(reference).max(axis=1, keepdims=True) / 127 if scales is None else (
            np.asarray(scales, np.float64)[:, None])
        return steps / 2 * (1 + INT8_ARITHMETIC)
    raise ValueError(fmt)


def test_packing_round_trips_within_each_formats_precision():
    vectors = np.random.default_rng(0).standard_normal((7, 40)).astype(np.float32)
    sizes = {"float16": 80, "int8": 40, "binary": 5}
    for fmt, size in sizes.items():
        packed, scales = pack_vectors(vectors, fmt)
        assert {len(row) for row in packed} == {size}
        restored = unpack_vectors(packed, scales, fmt, 40)
        if fmt == "binary":
            assert (restored == np.where(vectors > 0, 1, -1)).all()
        else:
            assert (np.abs(restored - vectors) <= decoding_bound(vectors, fmt)).all()


def test_unpacking_with_the_wrong_dimension_is_refused():
    packed, _ = pack_vectors(np.ones((2, 256), np.float32), "binary")
    with pytest.raises(ValueError, match="do not have 128 dimensions"):
        unpack_vectors(packed, None, "binary", 128)


@pytest.fixture(scope="module")
def tables(spark, sample_docs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("storage")
    source = write_jsonl(folder / "docs.jsonl", sample_docs[:12])
    for fmt in FORMATS:
        embed(spark, source, folder / fmt, f"output.vector_format={fmt}", "spark.partitions=2")
    embed(spark, source, folder / "int8_128", "output.vector_format=int8", "model.output_dim=128",
          "spark.partitions=2")
    return folder, source


def stored(path) -> tuple[list, np.ndarray]:
    rows = delta_rows(str(path)).sort_values(["doc_id", "chunk_index"])
    return list(zip(rows.doc_id, rows.chunk_index, strict=True)), rows


@pytest.mark.parametrize("fmt", FORMATS[1:])
def test_each_format_stores_the_float32_vectors_packed(spark, tables, fmt):
    folder, _ = tables
    keys, full = stored(folder / "float32")
    packed_keys, packed = stored(folder / fmt)
    assert packed_keys == keys
    assert packed.embedding.isna().all() and full.embedding_packed.isna().all()
    reference = np.stack(full.embedding.to_numpy())
    scales = packed.embedding_scale.to_numpy() if fmt == "int8" else None
    restored = unpack_vectors(list(packed.embedding_packed), scales, fmt, reference.shape[1])
    if fmt == "binary":
        assert (restored == np.where(reference > 0, 1, -1)).mean() > 0.999
    else:
        if fmt == "int8":
            assert np.allclose(scales, np.abs(reference).max(axis=1) / 127, rtol=1e-6, atol=0)
        assert (np.abs(restored - reference) <= decoding_bound(reference, fmt, scales)).all()
    properties = DeltaTable(str(folder / fmt)).metadata().configuration
    assert properties["pipeline.vector_format"] == fmt


@pytest.mark.parametrize("fmt", FORMATS)
def test_search_and_clustering_read_every_format(spark, tables, fmt):
    folder, _ = tables
    _, full = stored(folder / "float32")
    frame, properties = read_vectors(spark, str(folder / fmt))
    queries = Queries(["a", "b", "c"], np.stack(full.embedding.to_numpy()[:3]))
    hits = exact_search(spark, frame, queries, k=1, vector_format=properties.get(
        "pipeline.vector_format", "float32")).orderBy("query_id").collect()
    assert [(h.doc_id, h.chunk_index) for h in hits] == list(zip(
        full.doc_id[:3], full.chunk_index[:3], strict=True))
    features = load_features(spark, str(folder / fmt)).collect()
    assert len(features) == len(full) and len(features[0].features) == 384
    assert decoded_vectors(frame, properties).schema["embedding"].dataType.simpleString() == (
        "array<float>")


def test_int8_at_a_matryoshka_dimension_decodes_to_the_renormalised_float32_prefix(tables):
    folder, _ = tables
    keys, full = stored(folder / "float32")
    cut_keys, rows = stored(folder / "int8_128")
    assert cut_keys == keys
    assert {len(b) for b in rows.embedding_packed} == {128}
    assert DeltaTable(str(folder / "int8_128")).metadata().configuration[
        "pipeline.dimension"] == "128"
    prefix = np.stack(full.embedding.to_numpy())[:, :128]
    expected = prefix / np.linalg.norm(prefix, axis=1, keepdims=True)
    scales = rows.embedding_scale.to_numpy()
    restored = unpack_vectors(list(rows.embedding_packed), scales, "int8", 128)
    # the model cuts, then normalises; the prefix is renormalised after a first normalisation:
    # the two unit vectors differ by float32 rounding (well under 1e-6) besides the int8 step
    assert np.allclose(scales, np.abs(expected).max(axis=1) / 127, rtol=1e-5, atol=0)
    assert (np.abs(restored - expected) <= decoding_bound(expected, "int8", scales) + 1e-6).all()


def test_a_table_refuses_vectors_in_another_format(spark, tables):
    folder, source = tables
    with pytest.raises(ModelMismatchError, match="vector_format"):
        embed(spark, source, folder / "float32", "output.vector_format=int8",
              "spark.partitions=2")
