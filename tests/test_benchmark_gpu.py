"""The GPU benchmark, on the CPU: its FLOP count, batching, packed attention and report."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from benchmarks import gpu as job
from tests.conftest import REPO, SAMPLE_CORPUS

QWEN3_TOKENIZER = REPO.parent / "shared" / "qwen3-tokenizer"


@pytest.fixture(scope="module")
def tiny():
    """The scaled-down model in float32 (2 layers, hidden 128, 4:1 grouped-query heads)."""
    torch.manual_seed(0)
    config = job.qwen3_config(scaled_down=True, initializer_range=0.2)
    return job.build_model(config, torch.device("cpu"), torch.float32)


def test_flops_match_a_hand_count():
    config = job.qwen3_config(vocab_size=100, hidden_size=8, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                              intermediate_size=12)
    # per layer: q 8x8 + k 8x4 + v 8x4 + o 8x8 = 192, MLP 3x8x12 = 288, norms 2x8 + 2x4 = 24;
    # two layers and the final norm (8)
    assert job.non_embedding_params(config) == 2 * (192 + 288 + 24) + 8 == 1016
    # 2 FLOPs per parameter per token + 4 x layers x q dim (2 heads x 4) x length per token
    assert job.document_flops(config, 10) == 2 * 1016 * 10 + 4 * 2 * 8 * 10 * 10 == 26720
    assert job.total_flops(config, [10, 3]) == 26720 + 2 * 1016 * 3 + 4 * 2 * 8 * 9

    from transformers import Qwen3Model

    model = Qwen3Model(config)
    counted = sum(p.numel() for p in model.parameters()) - model.embed_tokens.weight.numel()
    assert counted == job.non_embedding_params(config)


def test_the_full_architecture_is_qwen3_embedding_4b():
    from transformers import Qwen3Model

    config = job.qwen3_config()
    assert job.non_embedding_params(config) == 3_633_511_936
    with torch.device("meta"):  # shapes only, nothing allocated
        model = Qwen3Model(config)
    assert sum(p.numel() for p in model.parameters()) == 3_633_511_936 + 151665 * 2560
    assert config.rope_parameters["rope_theta"] == 1_000_000
    # attention scores add 4 x 36 x 4096 x 512 FLOPs per token at 512 tokens, about 4%
    per_token = job.document_flops(config, 512) / 512
    assert per_token == pytest.approx(2 * 3_633_511_936 + 4 * 36 * 4096 * 512)


def test_peak_is_detected_from_the_device_name():
    assert job.detect_peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert job.detect_peak_tflops("NVIDIA H200") == 989
    assert job.detect_peak_tflops("NVIDIA H100 PCIe") == 756
    assert job.detect_peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert job.detect_peak_tflops("NVIDIA L4") == 121
    assert job.detect_peak_tflops("NVIDIA A10") == 125
    assert job.detect_peak_tflops("NVIDIA A10G") is None
    assert job.detect_peak_tflops("x86_64") is None


def test_batches_padded_by_plan_batches_and_packed_by_real_tokens():
    config = job.qwen3_config(scaled_down=True)
    assert job.pack_batches([5, 3, 4, 10, 2], 8) == [[0, 1], [2], [3], [4]]
    rows = job.token_rows([5, 3, 4, 10, 2], config.vocab_size, seed=0)
    assert [len(row) for row in rows] == [5, 3, 4, 10, 2]
    assert all(row[-1] == job.ENDOFTEXT_ID for row in rows)

    padded = job.make_batches(rows, False, 12, 512, 0.0, config)
    assert [batch.docs for batch in padded] == [[3], [0, 2], [1, 4]]  # longest first
    assert [batch.padded_tokens for batch in padded] == [10, 10, 6]
    assert [batch.real_tokens for batch in padded] == [10, 9, 5]
    assert padded[1].flops == job.total_flops(config, [5, 4])  # real lengths, not padded

    packed = job.make_batches(rows, True, 8, 512, 0.0, config)
    first = packed[0]
    assert first.docs == [0, 1] and first.padded_tokens == first.real_tokens == 8
    assert first.inputs["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    assert first.inputs["cu_seq_lens_q"].tolist() == [0, 5, 8]
    assert first.inputs["max_length_q"] == 5
    assert first.last.tolist() == [4, 7]


def fake_varlen_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *,
                       scale=None, window_size=(-1, -1), enable_gqa=False):
    """torch.nn.attention.varlen.varlen_attn's contract ([tokens, heads, dim], causal with
    window_size=(-1, 0)), computed on the CPU."""
    assert window_size == (-1, 0) and enable_gqa and cu_seq_q is cu_seq_k and max_q == max_k
    assert max_q == int((cu_seq_q[1:] - cu_seq_q[:-1]).max())
    bounds = cu_seq_q.tolist()
    parts = []
    for start, end in itertools.pairwise(bounds):
        q, k, v = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                             enable_gqa=True)
        parts.append(out[0].transpose(0, 1))
    return torch.cat(parts)


@pytest.mark.parametrize("packed_mode", ["sdpa+packed", "varlen+packed", "varlen-kernel"])
def test_packed_vectors_match_padded_ones(tiny, packed_mode, monkeypatch):
    """Same pooled last-token vectors, padded or packed (float32): sdpa with transformers'
    block-diagonal mask, the varlen function's reference loop, and its kernel call."""
    if packed_mode == "varlen-kernel":
        monkeypatch.setattr(job, "varlen_kernel", lambda query: fake_varlen_kernel)
        packed_mode = "varlen+packed"
    lengths = [9, 3, 17, 1, 12, 5, 30, 2]
    rows = job.token_rows(lengths, tiny.config.vocab_size, seed=1)
    padded = job.embed(tiny, rows, job.Mode.parse("sdpa"), max_tokens=40)
    packed = job.embed(tiny, rows, job.Mode.parse(packed_mode), max_tokens=40)
    assert len(job.pack_batches(lengths, 40)) < len(lengths)  # documents do share a row
    assert padded.std(0).mean() > 0.1  # different documents, different vectors
    torch.testing.assert_close(packed, padded, atol=2e-4, rtol=2e-4)


def test_varlen_options_follow_the_installed_signature():
    def newer(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None,
              window_size=(-1, -1), enable_gqa=False):
        pass

    def torch_2_10(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
        pass

    assert job.varlen_options(newer, 0.1) == {"window_size": (-1, 0), "scale": 0.1,
                                              "enable_gqa": True}
    assert job.varlen_options(torch_2_10, 0.1) == {"is_causal": True}


def test_modes_parse_and_say_why_they_cannot_run():
    cpu = torch.device("cpu")
    assert job.Mode.parse("flash_attention_2+packed").name == "flash_attention_2+packed"
    with pytest.raises(Exception, match="varlen"):
        job.Mode.parse("varlen")
    assert job.unavailable(job.Mode.parse("sdpa"), cpu, torch.float32) is None
    assert "CUDA" in job.unavailable(job.Mode.parse("flash_attention_2"), cpu, torch.bfloat16)
    assert [mode.name for mode in job.auto_modes(cpu)] == ["sdpa", "sdpa+packed",
                                                           "varlen+packed"]


def test_lengths_fall_back_to_lognormal_without_the_corpus(tmp_path):
    args = job.parse_args(["--corpus", str(tmp_path / "missing.jsonl"), "--docs", "500",
                           "--lengths", "real,fixed", "--max-length", "256"])
    sets = {s.name: s for s in job.length_sets(args)}
    assert set(sets) == {"lognormal", "fixed"}
    assert sets["fixed"].lengths == [256] * 500
    lognormal = sets["lognormal"].summary()
    assert 80 < lognormal["p50"] < 130 and lognormal["max"] <= 256


def test_saved_lengths_stand_in_for_the_corpus(tmp_path):
    saved = tmp_path / "lengths.json"
    assert job.main(["--save-lengths", str(saved), "--corpus", str(SAMPLE_CORPUS),
                     "--tokenizer", str(tmp_path / "none")]) == 0
    lengths = json.loads(saved.read_text())
    assert len(lengths) > 100 and min(lengths) >= 2
    args = job.parse_args(["--lengths-json", str(saved), "--lengths", "real", "--docs", "50",
                           "--max-length", "64"])
    (real,) = job.length_sets(args)
    assert real.name == "real" and real.source == "lengths.json" and len(real.lengths) == 50
    assert set(real.lengths) <= {min(n, 64) for n in lengths}


@pytest.mark.skipif(not QWEN3_TOKENIZER.is_dir(), reason="needs ../shared/qwen3-tokenizer")
def test_real_lengths_use_the_qwen3_tokenizer(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "Hello world"}\n{"text": "  "}\n{"text": "test again"}\n')
    lengths, source = job.corpus_lengths(corpus, QWEN3_TOKENIZER)
    assert lengths == [3, 3] and "tokenizer" in source  # ... plus <|endoftext|>


def test_report_has_a_row_per_length_set_mode_and_budget(tmp_path):
    out = tmp_path / "bench.json"
    modes = ["sdpa", "sdpa+packed", "varlen+packed", "flash_attention_2+packed"]
    budgets = [256, 1024]
    code = job.main(["--scaled-down", "--device", "cpu", "--docs", "16", "--max-length", "64",
                     "--budgets", ",".join(map(str, budgets)), "--modes", ",".join(modes),
                     "--corpus", str(SAMPLE_CORPUS), "--tokenizer", str(tmp_path / "none"),
                     "--check-docs", "4", "--time-limit-s", "900", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["length_sets"]["real"]["source"] == "sample_corpus.jsonl, chars/4"
    assert report["peak_tflops"] is None and report["architecture"]["num_hidden_layers"] == 2
    rows = {(row["lengths"], row["mode"], row["budget"]): row for row in report["results"]}
    assert set(rows) == {(s, m, b) for s in ("real", "fixed") for m in modes for b in budgets}
    for (lengths, mode, _), row in rows.items():
        if mode.startswith("flash_attention_2"):
            assert row["status"] == "unavailable: flash_attention_2 needs CUDA"
            continue
        assert row["status"] == "ok", row
        assert row["tokens_per_s"] > 0 and row["docs"] == 16
        assert 0 < row["padding_efficiency"] <= 1
        assert row["mfu"] is None and row["useful_tflops"] > 0  # no known peak on a CPU
        assert row["agreement_min_cosine"] > 0.9999
        assert row["tokens"] == report["length_sets"][lengths]["tokens"]
        if mode.endswith("+packed") or lengths == "fixed":
            assert row["padding_efficiency"] == 1


def test_the_time_limit_cuts_each_configuration_to_a_sample(tmp_path):
    out = tmp_path / "bench.json"
    assert job.main(["--scaled-down", "--device", "cpu", "--docs", "12", "--max-length", "32",
                     "--lengths", "fixed", "--budgets", "64", "--modes", "sdpa,varlen+packed",
                     "--check-docs", "2", "--time-limit-s", "0", "--json", str(out)]) == 0
    for row in json.loads(out.read_text())["results"]:  # warm-up, then one timed batch
        assert row["status"] == "ok (timed 1/6 batches)" and row["batches_planned"] == 6
        assert row["docs"] == 2 and row["tokens_per_s"] > 0
