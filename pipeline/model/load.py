"""Load a model once per process and keep it: a Spark Python worker reuses it across batches,
partitions and jobs. Every load is logged, and recorded in `load_log_dir` when one is given."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.config import BatchSettings
from pipeline.model.encode import DEFAULT_BUDGET, Encoder
from pipeline.model.spec import ModelSpec, worker_model_folder

if TYPE_CHECKING:
    from pipeline.endpoint.encoder import EndpointEncoder

log = logging.getLogger("pipeline.model")

_resident: tuple[tuple, Encoder] | None = None
load_count = 0


def pick_device(requested: str, task_gpu: str | None = None) -> torch.device:
    """The configured device; else the GPU Spark assigned to the task; else cuda:0; else CPU."""
    if requested != "auto":
        return torch.device(requested)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if task_gpu is not None and task_gpu.isdigit() and int(task_gpu) < torch.cuda.device_count():
        return torch.device(f"cuda:{task_gpu}")
    return torch.device("cuda:0")


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """bf16 on GPUs; fp32 on CPUs unless asked (bf16 is ~1.75x faster where the CPU has
    avx512_bf16 or AMX, and emulated, slower, where it has neither)."""
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if requested == "bfloat16" and device.type == "cpu" and not _cpu_has_bf16():
        log.warning("bfloat16 on a CPU without avx512_bf16 or AMX is emulated and usually "
                    "slower than float32")
    return getattr(torch, requested)


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_attention(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    if requested != "auto":
        return requested
    flash_ready = importlib.util.find_spec("flash_attn") is not None
    if flash_ready and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return "flash_attention_2"
    return "sdpa"


def get_encoder(
    spec: ModelSpec,
    budget: BatchSettings = DEFAULT_BUDGET,
    *,
    task_gpu: str | None = None,
    load_log_dir: str | None = None,
) -> Encoder | EndpointEncoder:
    """The process's encoder for `spec`, loading it on first use. One model stays resident: a
    different model replaces it, so a GPU never holds two; the same weights under another
    prompt or max length are reused with the new spec. Each call returns its own view under its
    own batch budget: the resident encoder is never changed."""
    global _resident, load_count
    if spec.endpoint is not None:
        from pipeline.endpoint.encoder import endpoint_encoder

        return endpoint_encoder(spec, budget)
    device = pick_device(spec.device, task_gpu)
    key = (spec.path, spec.fingerprint, str(device), spec.dtype, spec.attn_implementation,
           spec.padding_side)
    if _resident is not None and _resident[0] == key:
        encoder = _resident[1]
        if encoder.spec != spec:
            encoder = Encoder(spec, encoder.model, encoder.tokenizer, device)
            _resident = (key, encoder)
    else:
        _resident = None
        encoder = _load(spec, device, load_log_dir)
        _resident = (key, encoder)
    return encoder.with_budget(budget)


def _load(spec: ModelSpec, device: torch.device, load_log_dir: str | None) -> Encoder:
    global load_count
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    started = time.perf_counter()
    dtype = pick_dtype(spec.dtype, device)
    attention = pick_attention(spec.attn_implementation, device, dtype)
    folder = worker_model_folder(spec)
    tokenizer = AutoTokenizer.from_pretrained(
        folder, trust_remote_code=spec.trust_remote_code, padding_side=spec.padding_side
    )
    model = AutoModel.from_pretrained(
        folder,
        dtype=dtype,
        attn_implementation=attention,
        trust_remote_code=spec.trust_remote_code,
        use_safetensors=not spec.allow_pickle_weights,
    )
    model.to(device).eval()
    load_count += 1
    seconds = time.perf_counter() - started
    record = {
        "model_id": spec.model_id,
        "fingerprint": spec.fingerprint,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "attention": attention,
        "seconds": round(seconds, 3),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "load_in_process": load_count,
    }
    log.info("loaded model %s", json.dumps(record))
    if load_log_dir:
        _append_load_record(Path(load_log_dir), record)
    return Encoder(spec, model, tokenizer, device)


def _append_load_record(folder: Path, record: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"loads-{record['host']}-{record['pid']}.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")
