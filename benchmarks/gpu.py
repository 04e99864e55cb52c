"""GPU benchmark: tokens/s and MFU of the Qwen3-Embedding-4B forward pass, random bf16 weights.

    python -m benchmarks.gpu --json benchmark_gpu.json --time-limit-s 300   # one H100, ~5 min
    python -m benchmarks.gpu --scaled-down --device cpu --docs 64 --budgets 1024,2048
    python -m benchmarks.gpu --save-lengths wiki_lengths.json   # for a GPU machine without
    python -m benchmarks.gpu --lengths-json wiki_lengths.json   # ../shared: carry the list

Builds the Qwen3-Embedding-4B architecture (36 layers, hidden 2560, 32 query / 8 key-value heads
of 128, MLP 9728, vocabulary 151,665, tied embeddings) as a `Qwen3Model` directly on the device
with transformers' own random init (nothing is downloaded; weights do not change the speed) and
runs the forward pass and last-token pooling over batches of real length distributions:

- `real`: token lengths of `../shared/data/wiki-en/paragraphs.en.jsonl` (its `text` field, with
  the Qwen3 tokenizer from `../shared/qwen3-tokenizer`, else chars/4), or of `--corpus`, or the
  saved list `--lengths-json`; a lognormal fitted to that corpus (`lognormal`) where none exists;
- `fixed`: documents of exactly `--max-length` tokens (512 by default).

Lengths are capped at `--max-length`. Each attention mode runs at each token budget:

- padded (`sdpa`, `flash_attention_2`/`_3` when installed): the pipeline's own batching,
  `pipeline.model.encode.plan_batches` (sorted by length, rows x longest <= budget), left padding;
- packed (`+packed`): padding-free, one row of concatenated documents (real tokens <= budget) with
  restarting `position_ids` and `cu_seq_lens_q/k` + `max_length_q/k`, which transformers' flash
  attention path feeds to `flash_attn_varlen_func`. `varlen+packed` registers torch's own
  `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10, CUDA) as an attention function, so the
  packed path runs without the flash-attn package. `sdpa+packed` (transformers builds a
  block-diagonal mask from the position ids: quadratic in the packed length) is for checking only.

MFU counts useful work only: 2 x non-embedding parameters per real token, plus attention scores
4 x layers x (heads x head_dim) x length per token of each document's real length, over the
device's dense bf16 peak (`--peak-tflops`, or detected from the device name). Prints a table and
writes JSON (`--json`); a configuration that runs out of memory or fails is a row, not a crash.
`--time-limit-s` bounds the whole run, model build included: each configuration gets an equal
share of what is left and measures a random sample of its batches when the share runs out."""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import itertools
import json
import platform
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.harness import (
    SHARED,
    WIKI_CORPUS,
    jsonl_rows,
    markdown_table,
    parse_list,
    publish,
    split_list,
)
from pipeline.model.encode import pad_rows, plan_batches, pool

QWEN3_TOKENIZER = SHARED / "qwen3-tokenizer"

# Qwen/Qwen3-Embedding-4B config.json (151,665 ids: the Qwen2.5/3 BPE plus 22 added tokens).
QWEN3_EMBEDDING_4B: dict[str, Any] = {
    "vocab_size": 151665,
    "hidden_size": 2560,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 9728,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "attention_bias": False,
}
# The same shape (4:1 grouped-query heads, MLP ~3.8x hidden, real vocabulary), small enough for a
# CPU run in seconds.
SCALED_DOWN = {**QWEN3_EMBEDDING_4B, "hidden_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32,
               "intermediate_size": 480}

ENDOFTEXT_ID = 151643  # <|endoftext|>: appended to every input by the tokenizer; also the pad id
# Log of the token lengths of the 5,153 wiki-en paragraphs (Qwen3 tokenizer, with <|endoftext|>):
# median 103, mean 124 tokens. The fallback distribution where the corpus is missing.
LOGNORMAL_MU, LOGNORMAL_SIGMA = 4.60, 0.66

# Dense bf16 tensor-core peaks (TFLOP/s), first match wins.
PEAK_TFLOPS: list[tuple[str, float]] = [
    (r"H100.*PCIe", 756.0),
    (r"H100|H200|H800|GH200", 989.0),
    (r"A100|A800", 312.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
]
TARGET_MFU = 0.5
FLASH_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
LENGTH_SETS = ("real", "fixed", "lognormal")
VARLEN = "varlen"  # mode name of torch's varlen_attn, registered below as "torch_varlen"


# ---------------------------------------------------------------- architecture and FLOPs


def qwen3_config(scaled_down: bool = False, **overrides: Any):
    from transformers import Qwen3Config

    values = {**(SCALED_DOWN if scaled_down else QWEN3_EMBEDDING_4B), **overrides}
    if values["vocab_size"] > ENDOFTEXT_ID:  # as published: no pad id, <|endoftext|> bos/eos
        values = {"bos_token_id": ENDOFTEXT_ID, "eos_token_id": ENDOFTEXT_ID, **values}
    return Qwen3Config(**values, use_cache=False)


def non_embedding_params(config) -> int:
    """Parameters outside the token embedding: attention and MLP weights and the RMSNorm gains
    (Qwen3 has no LM head in `Qwen3Model`, and the embedding is tied anyway)."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv_heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    attention = 2 * hidden * q_dim + 2 * hidden * kv_dim
    if getattr(config, "attention_bias", False):
        attention += q_dim + 2 * kv_dim + hidden
    mlp = 3 * hidden * config.intermediate_size
    norms = 2 * hidden + 2 * head_dim  # input and post-attention norms; q_norm and k_norm
    return config.num_hidden_layers * (attention + mlp + norms) + hidden  # + final norm


def document_flops(config, length: int | np.ndarray) -> int | np.ndarray:
    """Forward FLOPs of one document of `length` real tokens: 2 per parameter per token, plus the
    attention scores and their product with the values (4 x layers x q dim x length per token)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q_dim = config.num_attention_heads * head_dim
    return (2 * non_embedding_params(config) * length
            + 4 * config.num_hidden_layers * q_dim * length * length)


def total_flops(config, lengths: Sequence[int]) -> int:
    return int(sum(int(document_flops(config, int(n))) for n in lengths))


def detect_peak_tflops(device_name: str) -> float | None:
    for pattern, tflops in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


# ---------------------------------------------------------------- length distributions


@dataclass
class LengthSet:
    name: str
    source: str
    lengths: list[int]

    def summary(self) -> dict[str, Any]:
        array = np.asarray(self.lengths)
        return {"source": self.source, "docs": len(array), "tokens": int(array.sum()),
                "mean": round(float(array.mean()), 1), "p50": int(np.median(array)),
                "p90": int(np.percentile(array, 90)), "max": int(array.max())}


def corpus_lengths(path: Path, tokenizer_dir: Path | None) -> tuple[list[int], str]:
    """Tokens of each non-blank `text` of a JSONL corpus, with the special token the Qwen3
    tokenizer appends; chars/4 + 1 where the tokenizer folder is missing."""
    texts = [text for row in jsonl_rows(path) if (text := row.get("text") or "").strip()]
    if tokenizer_dir is not None and tokenizer_dir.is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        ids = tokenizer(texts, return_attention_mask=False, verbose=False)["input_ids"]
        return [len(row) for row in ids], f"{path.name}, Qwen3 tokenizer"
    return [max(1, round(len(text) / 4)) + 1 for text in texts], f"{path.name}, chars/4"


def sample(lengths: Sequence[int], docs: int, rng: np.random.Generator) -> list[int]:
    """`docs` lengths drawn at random (without replacement while the corpus lasts)."""
    array = np.asarray(lengths)
    picked = rng.choice(len(array), size=docs, replace=docs > len(array))
    return array[picked].tolist()


def real_lengths(args: argparse.Namespace) -> tuple[list[int], str] | None:
    """Uncapped token lengths of the real corpus (`--lengths-json`, else `--corpus`), if any."""
    if args.lengths_json:
        return json.loads(Path(args.lengths_json).read_text()), Path(args.lengths_json).name
    if args.corpus.is_file():
        return corpus_lengths(args.corpus, args.tokenizer)
    return None


def length_sets(args: argparse.Namespace) -> list[LengthSet]:
    rng = np.random.default_rng(args.seed)
    cap = args.max_length
    sets = []
    for name in args.lengths:
        if name == "fixed":
            sets.append(LengthSet("fixed", f"{cap} tokens each", [cap] * args.docs))
            continue
        found = real_lengths(args) if name == "real" else None
        if found is not None:
            picked = sample(found[0], args.docs, rng)
            sets.append(LengthSet("real", found[1], [min(n, cap) for n in picked]))
            continue
        drawn = rng.lognormal(LOGNORMAL_MU, LOGNORMAL_SIGMA, size=args.docs)
        source = "lognormal fit of wiki-en" + (" (corpus not found)" if name == "real" else "")
        sets.append(LengthSet("lognormal", source,
                              np.clip(np.rint(drawn), 2, cap).astype(int).tolist()))
    return sets


def token_rows(lengths: Sequence[int], vocab_size: int, seed: int) -> list[list[int]]:
    """Random token ids per document, each ending in <|endoftext|> as the tokenizer makes them."""
    rng = np.random.default_rng(seed)
    top = min(vocab_size, ENDOFTEXT_ID)
    return [[*rng.integers(0, top, size=n - 1).tolist(), ENDOFTEXT_ID]
            for n in lengths]


# ---------------------------------------------------------------- batches


def pack_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Padding-free batches: documents in order, concatenated while their real tokens fit
    `max_tokens` (a longer document runs alone)."""
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index, length in enumerate(lengths):
        if current and used + length > max_tokens:
            batches.append(current)
            current, used = [], 0
        current.append(index)
        used += length
    if current:
        batches.append(current)
    return batches


@dataclass
class Batch:
    """One forward pass: model inputs, and which documents it holds in which order."""

    docs: list[int]
    inputs: dict[str, Any]
    real_tokens: int
    padded_tokens: int
    flops: int
    last: torch.Tensor | None = None  # packed: each document's last position in the row

    def to(self, device: torch.device) -> Batch:
        moved = {key: value.to(device) if isinstance(value, torch.Tensor) else value
                 for key, value in self.inputs.items()}
        if "cu_seq_lens_q" in moved:  # one tensor for queries and keys, as built
            moved["cu_seq_lens_k"] = moved["cu_seq_lens_q"]
        return Batch(self.docs, moved, self.real_tokens, self.padded_tokens, self.flops,
                     None if self.last is None else self.last.to(device))


def padded_batch(rows: list[list[int]], docs: list[int], config) -> Batch:
    input_ids, mask = pad_rows(rows, ENDOFTEXT_ID, "left")
    lengths = [len(row) for row in rows]
    return Batch(docs, {"input_ids": input_ids, "attention_mask": mask}, sum(lengths),
                 input_ids.numel(), total_flops(config, lengths))


def packed_batch(rows: list[list[int]], docs: list[int], config) -> Batch:
    """One row of concatenated documents: restarting position ids (RoPE, and transformers'
    packed-sequence detection) and the cumulative lengths flash-attention's varlen kernel reads."""
    lengths = [len(row) for row in rows]
    cumulative = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32)
    input_ids = torch.tensor([token for row in rows for token in row]).unsqueeze(0)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    inputs = {"input_ids": input_ids, "position_ids": positions,
              "cu_seq_lens_q": cumulative, "cu_seq_lens_k": cumulative,
              "max_length_q": max(lengths), "max_length_k": max(lengths)}
    return Batch(docs, inputs, sum(lengths), sum(lengths), total_flops(config, lengths),
                 last=cumulative[1:].long() - 1)


def make_batches(rows: list[list[int]], packed: bool, max_tokens: int, max_rows: int,
                 min_fill: float, config) -> list[Batch]:
    lengths = [len(row) for row in rows]
    if packed:
        plan = pack_batches(lengths, max_tokens)
        return [packed_batch([rows[i] for i in docs], docs, config) for docs in plan]
    plan = plan_batches(lengths, max_tokens, max_rows, min_fill)
    return [padded_batch([rows[i] for i in docs], docs, config) for docs in plan]


def run_batch(model, batch: Batch) -> torch.Tensor:
    """Forward pass and last-token pooling: [documents, hidden] in the batch's order."""
    hidden = model(**batch.inputs).last_hidden_state
    if batch.last is not None:
        return hidden[0, batch.last]
    return pool(hidden, batch.inputs["attention_mask"], "lasttoken")


# ---------------------------------------------------------------- attention modes


@dataclass(frozen=True)
class Mode:
    attention: str  # transformers attn_implementation, or VARLEN
    packed: bool

    @property
    def name(self) -> str:
        return self.attention + ("+packed" if self.packed else "")

    @property
    def implementation(self) -> str:
        return "torch_varlen" if self.attention == VARLEN else self.attention

    @classmethod
    def parse(cls, name: str) -> Mode:
        attention, _, batching = name.strip().partition("+")
        if batching not in ("", "packed"):
            raise argparse.ArgumentTypeError(f"mode {name!r}: only '+packed' may follow")
        if attention == VARLEN and not batching:
            raise argparse.ArgumentTypeError("varlen attention needs packed batches: varlen+packed")
        return cls(attention, batching == "packed")


def torch_varlen_attn():
    """torch.nn.attention.varlen.varlen_attn (torch >= 2.10), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None,
                     dropout: float = 0.0, cu_seq_lens_q: torch.Tensor | None = None,
                     max_length_q: int | None = None, **kwargs: Any
                     ) -> tuple[torch.Tensor, None]:
    """A transformers attention function over one packed row: query [1, heads, tokens, dim],
    key/value [1, kv heads, tokens, dim] -> [1, tokens, heads, dim], causal within each document.
    CUDA: torch's varlen flash kernel. Elsewhere: a reference loop of SDPA per document."""
    if cu_seq_lens_q is None or max_length_q is None or query.shape[0] != 1:
        raise ValueError("varlen attention needs one packed row with cu_seq_lens_q/max_length_q")
    kernel = varlen_kernel(query)
    if kernel is not None:
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [tokens, heads, dim]
        options = varlen_options(kernel, scaling)
        out = kernel(q, k, v, cu_seq_lens_q, cu_seq_lens_q, int(max_length_q),
                     int(max_length_q), **options)
        return out.unsqueeze(0), None
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    bounds = cu_seq_lens_q.tolist()
    parts = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b],
                                            is_causal=True, scale=scaling)
             for a, b in itertools.pairwise(bounds)]
    return torch.cat(parts, dim=2).transpose(1, 2), None


def varlen_kernel(query: torch.Tensor):
    """torch's varlen flash kernel where it runs (CUDA), else None (the reference loop)."""
    return torch_varlen_attn() if query.is_cuda else None


def varlen_options(kernel, scaling: float | None) -> dict[str, Any]:
    """Causal flag and scale as the installed torch spells them (2.10: is_causal; later:
    window_size=(-1, 0)); enable_gqa where it exists, else the flash kernel takes fewer k/v
    heads as they are."""
    parameters = inspect.signature(kernel).parameters
    options: dict[str, Any] = {}
    if "window_size" in parameters:
        options["window_size"] = (-1, 0)
    else:
        options["is_causal"] = True
    if "scale" in parameters:
        options["scale"] = scaling
    if "enable_gqa" in parameters:
        options["enable_gqa"] = True
    return options


def register_varlen_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register("torch_varlen", varlen_attention)


def unavailable(mode: Mode, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `mode` cannot run here, or None."""
    if mode.attention == "sdpa":
        return None
    if mode.attention == VARLEN:
        if device.type == "cuda" and torch_varlen_attn() is None:
            return "torch.nn.attention.varlen needs torch >= 2.10"
        if device.type == "cuda" and dtype not in (torch.bfloat16, torch.float16):
            return "varlen flash kernel needs bf16/fp16"
        return None
    package = FLASH_PACKAGES.get(mode.attention)
    if package is None:
        return f"unknown attention {mode.attention!r}"
    if device.type != "cuda":
        return f"{mode.attention} needs CUDA"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"{mode.attention} needs bf16/fp16"
    if importlib.util.find_spec(package) is None:
        return f"{package} not installed"
    return None


def auto_modes(device: torch.device) -> list[Mode]:
    if device.type != "cuda":
        return [Mode("sdpa", False), Mode("sdpa", True), Mode(VARLEN, True)]
    modes = [Mode("sdpa", False), Mode(VARLEN, True)]
    for attention, package in FLASH_PACKAGES.items():
        if importlib.util.find_spec(package) is not None:
            modes += [Mode(attention, False), Mode(attention, True)]
    return modes


def set_attention(model, implementation: str) -> None:
    """Switch the attention function of the loaded model (the config is shared by its layers)."""
    try:
        model.set_attn_implementation(implementation)
    except (AttributeError, ValueError):  # older transformers, or one that refuses the name
        model.config._attn_implementation = implementation


# ---------------------------------------------------------------- model


def build_model(config, device: torch.device, dtype: torch.dtype, attention: str = "sdpa"):
    """`Qwen3Model` with random weights, allocated and initialised on `device` (no CPU copy, no
    download: transformers' init runs there, in seconds for the 4B model on a GPU)."""
    from transformers import Qwen3Model

    register_varlen_attention()
    with torch.device(device):
        model = Qwen3Model._from_config(config, dtype=dtype, attn_implementation=attention)
    return model.eval()


def embed(model, rows: list[list[int]], mode: Mode, max_tokens: int, max_rows: int = 512,
          min_fill: float = 0.0) -> torch.Tensor:
    """Pooled last-token vectors [documents, hidden] (float32, on the CPU) in input order."""
    set_attention(model, mode.implementation)
    device = next(model.parameters()).device
    out = torch.empty(len(rows), model.config.hidden_size)
    with torch.inference_mode():
        for batch in make_batches(rows, mode.packed, max_tokens, max_rows, min_fill,
                                  model.config):
            out[batch.docs] = run_batch(model, batch.to(device)).float().cpu()
    return out


# ---------------------------------------------------------------- measuring


@dataclass
class Clock:
    """Deadline for the whole run, shared out equally among the configurations still to run."""

    deadline: float
    left: int

    def share(self) -> float:
        seconds = max(0.0, self.deadline - time.perf_counter()) / max(1, self.left)
        self.left -= 1
        return seconds


@dataclass
class Result:
    lengths: str
    mode: str
    budget: int
    status: str = "ok"
    docs: int = 0
    batches: int = 0
    batches_planned: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0
    flops: int = 0
    peak_memory_gib: float | None = None
    agreement: float | None = None

    def row(self, peak_tflops: float | None) -> dict[str, Any]:
        measured = self.seconds > 0
        tflops = self.flops / self.seconds / 1e12 if measured else None
        return {
            "lengths": self.lengths, "mode": self.mode, "budget": self.budget,
            "status": self.status, "docs": self.docs, "batches": self.batches,
            "batches_planned": self.batches_planned, "tokens": self.tokens,
            "padded_tokens": self.padded_tokens,
            "padding_efficiency": (round(self.tokens / self.padded_tokens, 4)
                                   if self.padded_tokens else None),
            "seconds": round(self.seconds, 4),
            "tokens_per_s": round(self.tokens / self.seconds, 1) if measured else None,
            "docs_per_s": round(self.docs / self.seconds, 2) if measured else None,
            "useful_tflops": float(f"{tflops:.4g}") if tflops is not None else None,
            "mfu": (round(tflops / peak_tflops, 4)
                    if tflops is not None and peak_tflops else None),
            "peak_memory_gib": self.peak_memory_gib,
            "agreement_min_cosine": self.agreement,
        }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def measure(model, rows: list[list[int]], mode: Mode, budget: int, args: argparse.Namespace,
            seconds: float, result: Result) -> None:
    """Warm up on the two largest batches, then time batches in a random order until all ran or
    `seconds` (warm-up included) are spent. Fills `result`."""
    device = next(model.parameters()).device
    started = time.perf_counter()
    set_attention(model, mode.implementation)
    batches = make_batches(rows, mode.packed, budget, args.max_rows, args.min_fill, model.config)
    result.batches_planned = len(batches)
    batches = [batch.to(device) for batch in batches]
    order = np.random.default_rng(args.seed).permutation(len(batches)).tolist()
    warmup = sorted(range(len(batches)), key=lambda i: -batches[i].padded_tokens)[:2]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        for index in warmup:
            run_batch(model, batches[index])
        synchronize(device)
        for index in order:
            batch = batches[index]
            tick = time.perf_counter()
            run_batch(model, batch)
            synchronize(device)
            result.seconds += time.perf_counter() - tick
            result.batches += 1
            result.docs += len(batch.docs)
            result.tokens += batch.real_tokens
            result.padded_tokens += batch.padded_tokens
            result.flops += batch.flops
            if time.perf_counter() - started > seconds:
                break
    if device.type == "cuda":
        result.peak_memory_gib = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if result.batches < len(batches):
        result.status = f"ok (timed {result.batches}/{len(batches)} batches)"


def agreement(model, rows: list[list[int]], mode: Mode, reference: torch.Tensor,
              budget: int) -> float:
    """Smallest cosine between this mode's pooled vectors and the padded-SDPA reference."""
    vectors = embed(model, rows, mode, budget)
    return round(float(F.cosine_similarity(vectors, reference, dim=-1).min()), 5)


def run_configuration(model, lengths: LengthSet, rows: list[list[int]], mode: Mode,
                      budget: int, reference: torch.Tensor, clock: Clock,
                      args: argparse.Namespace, device: torch.device, dtype: torch.dtype
                      ) -> Result:
    result = Result(lengths.name, mode.name, budget)
    reason = unavailable(mode, device, dtype)
    if reason is not None:
        result.status = f"unavailable: {reason}"
        return result
    seconds = clock.share()
    try:
        probe = rows[: args.check_docs]
        result.agreement = agreement(model, probe, mode, reference, budget)
        measure(model, rows, mode, budget, args, seconds, result)
    except Exception as error:  # one configuration's failure is a row of the report, not a crash
        status = ("out of memory" if is_out_of_memory(error)
                  else f"error: {type(error).__name__}: {str(error)[:300]}")
        result = Result(lengths.name, mode.name, budget, status=status,
                        batches_planned=result.batches_planned)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------- report


def percent_or_na(mfu: float | None) -> str:
    """MFU as a percentage; n/a where the device's peak is unknown."""
    return "n/a" if mfu is None else f"{mfu:.1%}"


COLUMNS = [
    ("lengths", "lengths", "{}"), ("mode", "mode", "{}"), ("budget", "budget", "{}"),
    ("batches", "batches", "{}"), ("docs", "docs", "{}"), ("tokens", "tokens", "{}"),
    ("padding_efficiency", "pad eff", "{:.3f}"), ("tokens_per_s", "tok/s", "{:,.0f}"),
    ("useful_tflops", "TFLOP/s", "{:.1f}"), ("mfu", "MFU", percent_or_na),
    ("peak_memory_gib", "peak GiB", "{:.1f}"), ("agreement_min_cosine", "cos vs ref", "{:.4f}"),
    ("status", "status", "{}"),
]


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    found = {"python": platform.python_version(), "torch": torch.__version__,
             "transformers": transformers.__version__, "device": str(device),
             "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                             else platform.processor() or platform.machine())}
    for package in ("flash_attn", "flash_attn_interface"):
        if importlib.util.find_spec(package) is not None:
            module = importlib.import_module(package)
            found[package] = getattr(module, "__version__", "installed")
    found["torch_varlen_attn"] = torch_varlen_attn() is not None
    return found


def architecture(config) -> dict[str, Any]:
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings",
            "rms_norm_eps", "tie_word_embeddings")
    found = {key: getattr(config, key) for key in keys}
    found["non_embedding_params"] = non_embedding_params(config)
    found["embedding_params"] = config.vocab_size * config.hidden_size
    return found


# ---------------------------------------------------------------- main


def parse_budgets(value: str) -> list[int]:
    budgets = [int(item) for item in split_list(value)]
    if not budgets or min(budgets) <= 0:
        raise argparse.ArgumentTypeError("budgets are positive token counts, e.g. 16384,32768")
    return budgets


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--scaled-down", "--tiny", action="store_true", dest="scaled_down",
                        help="2 layers, hidden 128: the architecture's shape, for a CPU run")
    parser.add_argument("--budgets", type=parse_budgets, default=[16384, 32768, 65536],
                        help="token budgets per forward pass (padded tokens; packed: real)")
    parser.add_argument("--modes", default="auto",
                        help="comma list of sdpa, flash_attention_2, flash_attention_3, each "
                             "optionally +packed, and varlen+packed; auto: what the device has")
    parser.add_argument("--lengths", type=parse_list(str, LENGTH_SETS),
                        default=["real", "fixed"],
                        help="length sets: real (corpus, else lognormal), fixed, lognormal")
    parser.add_argument("--docs", type=int, default=4096, help="documents per length set")
    parser.add_argument("--max-length", type=int, default=512,
                        help="token cap, and the length of the fixed set (e.g. 512 or 8192)")
    parser.add_argument("--corpus", type=Path, default=WIKI_CORPUS,
                        help="JSONL with a text field, for the real lengths")
    parser.add_argument("--tokenizer", type=Path, default=QWEN3_TOKENIZER,
                        help="Qwen3 tokenizer folder (else chars/4)")
    parser.add_argument("--lengths-json", help="saved token lengths (JSON list) for the real set")
    parser.add_argument("--save-lengths",
                        help="only write the corpus's token lengths (JSON list) here, for "
                             "--lengths-json on a machine without the corpus")
    parser.add_argument("--max-rows", type=int, default=512, help="rows per padded batch")
    parser.add_argument("--min-fill", type=float, default=0.0, help="plan_batches min_fill")
    parser.add_argument("--check-docs", type=int, default=16,
                        help="documents whose vectors each mode compares with padded sdpa")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak of the device (default: from its name)")
    parser.add_argument("--time-limit-s", type=float, default=300.0,
                        help="the whole run, model build included")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="benchmark_gpu.json", help="where to write results")
    args = parser.parse_args(argv)
    try:
        args.modes = (None if args.modes == "auto"
                      else [Mode.parse(name) for name in split_list(args.modes)])
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    return args


def save_lengths(args: argparse.Namespace) -> int:
    """`--save-lengths`: only the corpus's token lengths, as a JSON list."""
    found = real_lengths(args)
    if found is None:
        raise SystemExit(f"no corpus at {args.corpus}")
    Path(args.save_lengths).write_text(json.dumps(found[0]) + "\n")
    print(f"wrote {len(found[0])} token lengths ({found[1]}) to {args.save_lengths}")
    return 0


def measure_length_set(model, lengths: LengthSet, modes: Sequence[Mode], clock: Clock,
                       peak: float | None, args: argparse.Namespace, device: torch.device,
                       dtype: torch.dtype) -> list[dict[str, Any]]:
    """A report row per mode and budget on one length set's documents."""
    rows = token_rows(lengths.lengths, model.config.vocab_size, args.seed)
    reference = embed(model, rows[: args.check_docs], Mode("sdpa", False), max(args.budgets))
    out = []
    for mode in modes:
        for budget in args.budgets:
            result = run_configuration(model, lengths, rows, mode, budget, reference, clock,
                                       args, device, dtype)
            out.append(result.row(peak))
            print(f"[{lengths.name}] {mode.name} @ {budget}: {out[-1]['status']}, "
                  f"{out[-1]['tokens_per_s'] or 0:,.0f} tok/s, "
                  f"MFU {percent_or_na(out[-1]['mfu'])}", file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    if args.save_lengths:
        return save_lengths(args)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(args.seed)
    config = qwen3_config(args.scaled_down)
    sets = length_sets(args)
    build_started = time.perf_counter()
    model = build_model(config, device, dtype)
    synchronize(device)
    build_s = time.perf_counter() - build_started
    env = environment(device)
    peak = args.peak_tflops or (detect_peak_tflops(env["device_name"])
                                if device.type == "cuda" else None)
    modes = args.modes or auto_modes(device)
    runnable = [mode for mode in modes if unavailable(mode, device, dtype) is None]
    clock = Clock(started + args.time_limit_s, len(sets) * len(runnable) * len(args.budgets))
    print(f"{env['device_name']}: {non_embedding_params(config):,} non-embedding "
          f"parameters, {dtype}, built in {build_s:.1f}s; peak {peak or 'unknown'} TFLOP/s; "
          f"modes {', '.join(m.name for m in modes)}", file=sys.stderr, flush=True)
    rows_out = [row for lengths in sets
                for row in measure_length_set(model, lengths, modes, clock, peak, args, device,
                                              dtype)]
    report = {
        "environment": env, "architecture": architecture(config),
        "scaled_down": args.scaled_down, "dtype": str(dtype).removeprefix("torch."),
        "peak_tflops": peak, "target_mfu": TARGET_MFU,
        "command": sys.argv[1:] if argv is None else argv,
        "max_length": args.max_length, "max_rows": args.max_rows, "min_fill": args.min_fill,
        "budgets": args.budgets, "modes": [mode.name for mode in modes],
        "length_sets": {s.name: s.summary() for s in sets}, "model_build_s": round(build_s, 2),
        "setup_s": round(build_started + build_s - started, 2), "results": rows_out,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    publish("benchmark_gpu", report, markdown_table(rows_out, COLUMNS), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
