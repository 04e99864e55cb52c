"""An accelerator simulated on a CPU: a model folder whose forward pass sleeps
`rows x padded_length / tokens_per_second` seconds and returns small random states.

A sleep frees the CPU as a GPU kernel does, so a job's time against the sleeping time is the duty
cycle a GPU of that speed would see (70,000 tokens/s ~ Qwen3-Embedding-4B at 50% MFU on one
H100). The folder loads through `AutoModel` with remote code (`model.trust_remote_code: true`),
with all-MiniLM-L6-v2's tokenizer, and appends one line per forward pass to
`<trace_dir>/forward-<pid>.jsonl` when a trace folder is given."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.near_free_model import copy_minilm_tokenizer, write_sentence_transformers_files

MODELING = '''"""Written by benchmarks/simulated_accelerator.py."""
import json
import os
import time

import torch
from transformers import PretrainedConfig, PreTrainedModel


class SimulatedConfig(PretrainedConfig):
    model_type = "simulated_accelerator"

    def __init__(self, hidden_size=16, tokens_per_second=70000.0, trace_dir="", **kwargs):
        self.hidden_size = hidden_size
        self.tokens_per_second = tokens_per_second
        self.trace_dir = trace_dir
        super().__init__(**kwargs)


class SimulatedModel(PreTrainedModel):
    config_class = SimulatedConfig
    base_model_prefix = "simulated"
    _supports_sdpa = True
    _supports_flash_attn = True

    def __init__(self, config):
        super().__init__(config)
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.post_init()

    def _init_weights(self, module):
        pass

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        rows, length = input_ids.shape
        started = time.time()
        time.sleep(rows * length / self.config.tokens_per_second)
        hidden = torch.rand(rows, length, self.config.hidden_size) + 0.1
        if self.config.trace_dir:
            line = {"start": started, "end": time.time(), "rows": rows, "length": length}
            path = os.path.join(self.config.trace_dir, f"forward-{os.getpid()}.jsonl")
            with open(path, "a") as handle:
                handle.write(json.dumps(line) + "\\n")
        return (hidden,)
'''


def build_simulated_accelerator(folder: Path, tokens_per_second: float,
                                trace_dir: Path | None = None, hidden: int = 16) -> Path:
    """The model folder at `folder` (rewritten each call, so the rate and trace folder hold)."""
    folder.mkdir(parents=True, exist_ok=True)
    copy_minilm_tokenizer(folder)
    (folder / "modeling_simulated.py").write_text(MODELING)
    config = {
        "model_type": "simulated_accelerator",
        "architectures": ["SimulatedModel"],
        "auto_map": {"AutoConfig": "modeling_simulated.SimulatedConfig",
                     "AutoModel": "modeling_simulated.SimulatedModel"},
        "hidden_size": hidden,
        "tokens_per_second": float(tokens_per_second),
        "trace_dir": str(trace_dir or ""),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_sentence_transformers_files(folder, hidden)
    _write_weights(folder)
    return folder


def _write_weights(folder: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"anchor": torch.zeros(1)}, str(folder / "model.safetensors"))


def forward_trace(trace_dir: Path) -> list[dict]:
    """Every forward pass the folder's model ran, from all processes, in start order."""
    lines = [json.loads(line) for path in sorted(trace_dir.glob("forward-*.jsonl"))
             for line in path.read_text().splitlines() if line]
    return sorted(lines, key=lambda line: line["start"])
