"""The CPU benchmark: every variant runs and reports, stays close to fp32, and the overlapped
tokenization gives the same vectors as the plain path. Tiny inputs: the shipped sample corpus
and a hand-written STS file, so it runs without ../shared."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks import cpu as job
from pipeline.config import load_settings
from pipeline.model.spec import resolve_model_spec
from tests.conftest import SAMPLE_CORPUS

# score, sentence 1, sentence 2; one line carries extra columns, one a bare double quote.
STS_LINES = [
    ("5.000", "A man is playing a guitar.", "A man plays the guitar."),
    ("4.200", "A woman is slicing an onion.", "A woman cuts an onion."),
    ("3.400", "A dog runs in the park.", "A dog is running on grass."),
    ("2.600", 'The "new" plan was announced today.', "A plan was announced."),
    ("1.800", "A child is reading a book.", "A child is writing a letter."),
    ("1.000", "The cat sleeps on the sofa.", "A man is riding a horse."),
    ("0.400", "Stocks fell sharply on Monday.", "A girl is brushing her hair."),
    ("0.000", "The train left the station.", "Two women are dancing."),
]


def write_sts(path):
    lines = [f"main-news\tMSRvid\t2012test\t{i:04d}\t{score}\t{left}\t{right}"
             + ("\tsource-a\tsource-b" if i == 2 else "")
             for i, (score, left, right) in enumerate(STS_LINES)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sts_reader_takes_bare_quotes_and_ignores_extra_columns(tmp_path):
    left, right, gold = job.read_sts(write_sts(tmp_path / "sts.csv"))
    assert left[3] == 'The "new" plan was announced today.'
    assert right[2] == "A dog is running on grass."
    assert gold == [float(score) for score, _, _ in STS_LINES]
    assert len(job.read_sts(tmp_path / "sts.csv", limit=3)[2]) == 3


def test_every_variant_runs_and_stays_close_to_fp32(tmp_path):
    out = tmp_path / "bench.json"
    threads_before = torch.get_num_threads()
    assert job.main(["--corpus", str(SAMPLE_CORPUS), "--limit", "16", "--repeat", "1",
                     "--slice-rows", "5", "--sts", str(write_sts(tmp_path / "sts.csv")),
                     "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {row["variant"]: row for row in report["results"]}
    assert set(rows) == set(job.VARIANTS)
    assert report["texts"] == 16 and report["sts_pairs"] == len(STS_LINES)
    assert set(report["cpu"]["flags"]) == set(job.CPU_FLAGS)
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["tokens"] > 0 and row["threads"] == 1
        # Eight pairs whose gold order MiniLM gets nearly right; each variant must too.
        assert row["sts_spearman"] >= 0.8, row
    assert rows["fp32"]["vs_fp32"] == 1.0 and rows["fp32"]["min_cos_vs_fp32"] > 0.9999
    assert rows["bf16"]["min_cos_vs_fp32"] > 0.99
    assert rows["int8_selective"]["min_cos_vs_fp32"] > 0.95
    # Per-tensor int8 on every Linear is the lossy one (MLP down projections): close, not 0.95.
    assert rows["int8"]["median_cos_vs_fp32"] > 0.85
    assert rows["fp32+overlap"]["identical_to_plain"] is True
    assert rows["bf16+overlap"]["identical_to_plain"] is True
    assert torch.get_num_threads() == threads_before  # restored after the benchmark


def test_missing_data_is_skipped_with_a_note(tmp_path):
    out = tmp_path / "bench.json"
    assert job.main(["--corpus", str(tmp_path / "absent.jsonl"), "--limit", "4",
                     "--repeat", "1", "--variants", "fp32", "--sts", str(tmp_path / "no.csv"),
                     "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["corpus"] == str(SAMPLE_CORPUS) and report["sts"] is None
    assert [row["variant"] for row in report["results"]] == ["fp32"]
    assert any("sample" in note for note in report["notes"])
    assert any("STS" in note for note in report["notes"])


@pytest.fixture(scope="module")
def encoders():
    settings = load_settings("local", [], {})
    spec = resolve_model_spec(settings.model)
    return job.build_encoders(spec, job.PRECISIONS, settings.batch), settings


def test_overlapped_tokenization_gives_the_plain_vectors(encoders):
    built, settings = encoders
    texts = [json.loads(line)["text"] for line in SAMPLE_CORPUS.read_text().splitlines()[:12]]
    prepare = job.Prepare(None, settings.chunking.chunk_overlap, truncate=False)
    parts = job.slices(texts, 4)
    with job.threads(1):
        plain = job.run_plain(built["fp32"], parts, prepare)
        overlapped = job.run_overlapped(built["fp32"], parts, prepare)
        direct = built["fp32"].embed_ids(prepare(built["fp32"], texts))[0]
    assert np.array_equal(plain.vectors, overlapped.vectors)
    assert plain.tokens == overlapped.tokens > 0
    np.testing.assert_allclose(plain.vectors, direct, atol=1e-4)  # slicing changes no vector


def test_selective_int8_keeps_the_mlp_down_projections_in_fp32(encoders):
    built, _ = encoders
    model = built["int8_selective"].model
    float_linear = [module for module in model.modules() if type(module) is torch.nn.Linear]
    assert float_linear and all(module.in_features == model.config.intermediate_size
                                for module in float_linear)
    assert len(float_linear) == model.config.num_hidden_layers
    assert not [module for module in built["int8"].model.modules()
                if type(module) is torch.nn.Linear]  # plain int8: every Linear quantized
    assert built["bf16"].model.dtype == torch.bfloat16
    assert built["fp32"].model.dtype == torch.float32
