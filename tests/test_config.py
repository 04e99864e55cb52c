"""Settings: profiles from conf/, `--set` overrides and flags, and validation errors that name
the key at fault."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.config import CONF_DIR, Settings, SettingsError, load_settings, recorded_settings

LOCAL = yaml.safe_load((CONF_DIR / "local.yaml").read_text())


def test_default_profile_is_local_with_typed_values() -> None:
    settings = load_settings()
    assert isinstance(settings, Settings)
    assert settings.model.name == LOCAL["model"]["name"]
    assert settings.model.id == LOCAL["model"]["id"]
    assert settings.input.path == LOCAL["input"]["path"]
    assert settings.input.title_col == LOCAL["input"]["title_col"]
    assert settings.batch.max_batch_tokens == LOCAL["batch"]["max_batch_tokens"]
    assert type(settings.batch.max_batch_tokens) is int
    assert type(settings.batch.min_fill) is float
    assert settings.chunking.mode == LOCAL["chunking"]["mode"]
    assert settings.chunking.chunk_tokens is None
    assert settings.model.normalize is None
    assert settings.spark.conf == {}
    assert settings == load_settings("local")


def test_set_overrides_are_parsed_as_yaml_scalars() -> None:
    settings = load_settings(
        overrides=[
            "batch.max_batch_tokens=2048",
            "model.normalize=false",
            "chunking.mode=truncate",
            "batch.min_fill=1",
            "spark.conf={spark.sql.shuffle.partitions: 8}",
        ]
    )
    assert settings.batch.max_batch_tokens == 2048
    assert type(settings.batch.max_batch_tokens) is int
    assert settings.model.normalize is False
    assert settings.chunking.mode == "truncate"
    assert settings.batch.min_fill == 1.0
    assert type(settings.batch.min_fill) is float
    assert settings.spark.conf == {"spark.sql.shuffle.partitions": "8"}


def test_set_with_empty_value_gives_none() -> None:
    settings = load_settings(overrides=["chunking.chunk_tokens=64", "chunking.chunk_tokens="])
    assert settings.chunking.chunk_tokens is None


def test_flags_win_over_profile_and_overrides_and_none_flags_are_ignored() -> None:
    settings = load_settings(
        overrides=["batch.max_batch_rows=8", "output.mode=append"],
        flags={"batch.max_batch_rows": 16, "output.path": "/tmp/out", "model.name": None},
    )
    assert settings.batch.max_batch_rows == 16
    assert settings.output.path == "/tmp/out"
    assert settings.output.mode == "append"
    assert settings.model.name == LOCAL["model"]["name"]


def test_unknown_key_names_it_and_lists_accepted_keys() -> None:
    with pytest.raises(SettingsError, match=r"model\.poolng") as info:
        load_settings(overrides=["model.poolng=mean"])
    assert "pooling" in str(info.value)
    assert "max_length" in str(info.value)


def test_unknown_section_is_rejected() -> None:
    with pytest.raises(SettingsError, match="modle"):
        load_settings(overrides=["modle.name=x"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("batch.max_batch_rows=abc", "batch.max_batch_rows"),
        ("batch.max_batch_tokens=1.5", "batch.max_batch_tokens"),
        ("model.normalize=maybe", "model.normalize"),
        ("output.store_text=1", "output.store_text"),
        ("batch.min_fill=high", "batch.min_fill"),
        ("spark.conf=nope", "spark.conf"),
        ("model.name=[a, b]", "model.name"),
    ],
)
def test_wrong_type_names_the_key(override: str, key: str) -> None:
    with pytest.raises(SettingsError, match=key.replace(".", r"\.")):
        load_settings(overrides=[override])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("chunking.mode=sliding", "chunking.mode"),
        ("model.pooling=sum", "model.pooling"),
        ("input.format=xml", "input.format"),
        ("output.mode=upsert", "output.mode"),
        ("model.dtype=int8", "model.dtype"),
        ("model.padding_side=middle", "model.padding_side"),
    ],
)
def test_bad_enum_names_the_key_and_choices(override: str, key: str) -> None:
    with pytest.raises(SettingsError, match=key.replace(".", r"\.")) as info:
        load_settings(overrides=[override])
    assert "choose one of" in str(info.value)


def test_bad_chunk_mode_lists_the_valid_modes() -> None:
    with pytest.raises(SettingsError, match="window") as info:
        load_settings(overrides=["chunking.mode=sliding"])
    assert "truncate" in str(info.value)


@pytest.mark.parametrize(("tokens", "overlap"), [(32, 32), (32, 40)])
def test_overlap_not_smaller_than_chunk_tokens_is_rejected(tokens: int, overlap: int) -> None:
    with pytest.raises(SettingsError, match=r"chunking\.chunk_overlap"):
        load_settings(
            overrides=[f"chunking.chunk_tokens={tokens}", f"chunking.chunk_overlap={overlap}"]
        )


def test_overlap_below_chunk_tokens_is_accepted() -> None:
    settings = load_settings(overrides=["chunking.chunk_tokens=32", "chunking.chunk_overlap=31"])
    assert (settings.chunking.chunk_tokens, settings.chunking.chunk_overlap) == (32, 31)


def test_negative_overlap_is_rejected() -> None:
    with pytest.raises(SettingsError, match=r"chunking\.chunk_overlap"):
        load_settings(overrides=["chunking.chunk_overlap=-1"])


@pytest.mark.parametrize(
    "key",
    [
        "batch.max_batch_tokens",
        "batch.max_batch_rows",
        "spark.arrow_batch_rows",
        "spark.partitions",
        "model.max_length",
        "model.output_dim",
        "chunking.chunk_tokens",
    ],
)
@pytest.mark.parametrize("value", [0, -3])
def test_non_positive_values_are_rejected(key: str, value: int) -> None:
    with pytest.raises(SettingsError, match=key.replace(".", r"\.") + " must be positive"):
        load_settings(overrides=[f"{key}={value}"])


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_min_fill_outside_unit_interval_is_rejected(value: float) -> None:
    with pytest.raises(SettingsError, match=r"batch\.min_fill"):
        load_settings(overrides=[f"batch.min_fill={value}"])


@pytest.mark.parametrize("key", ["input.path", "output.path", "model.name", "input.id_col"])
def test_required_value_left_empty_names_the_key(key: str) -> None:
    with pytest.raises(SettingsError, match=key.replace(".", r"\.") + " is required"):
        load_settings(overrides=[f"{key}=''"])


def test_set_without_equals_is_rejected() -> None:
    with pytest.raises(SettingsError, match=r"'model\.name'") as info:
        load_settings(overrides=["model.name"])
    assert "section.key=value" in str(info.value)


def test_setting_below_a_scalar_is_rejected() -> None:
    with pytest.raises(SettingsError, match=r"model\.name\.x"):
        load_settings(overrides=["model.name.x=1"])


def test_unknown_profile_lists_known_profiles() -> None:
    with pytest.raises(SettingsError, match="no-such-profile") as info:
        load_settings("no-such-profile")
    assert "'local'" in str(info.value)


def test_missing_yaml_path_profile_is_rejected(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(str(missing))


def test_yaml_path_profile_loads_with_defaults_for_missing_keys(tmp_path: Path) -> None:
    profile = tmp_path / "mine.yml"
    profile.write_text(
        yaml.safe_dump(
            {
                "input": {"path": "/data/in", "format": "parquet"},
                "output": {"path": "/data/out"},
                "model": {"name": "/models/e5", "pooling": "mean", "output_dim": 256},
                "spark": {"conf": {"spark.executor.memory": "4g", "spark.task.cpus": 2}},
            }
        )
    )
    settings = load_settings(str(profile), overrides=["batch.max_batch_rows=32"])
    assert settings.input.format == "parquet"
    assert settings.model.output_dim == 256
    assert settings.spark.conf == {"spark.executor.memory": "4g", "spark.task.cpus": "2"}
    assert settings.batch.max_batch_rows == 32
    assert settings.batch.max_batch_tokens == 16384
    assert settings.chunking.mode == "window"


def test_yaml_path_profile_that_is_not_a_mapping_is_rejected(tmp_path: Path) -> None:
    profile = tmp_path / "list.yaml"
    profile.write_text("- a\n- b\n")
    with pytest.raises(SettingsError, match="mapping"):
        load_settings(str(profile))


def test_to_dict_round_trips_through_a_yaml_profile(tmp_path: Path) -> None:
    settings = load_settings(overrides=["spark.conf={a: b}", "model.output_dim=128"])
    profile = tmp_path / "dumped.yaml"
    profile.write_text(yaml.safe_dump(settings.to_dict()))
    assert load_settings(str(profile)) == settings


def completing_flags(raw: dict) -> dict[str, str]:
    """What the command line must add to a shipped profile: input and output where it leaves
    them empty, and the URL of an endpoint profile."""
    flags = {"input.path": "in", "output.path": "out"} if not raw["input"]["path"] else {}
    model = raw["model"]
    if model.get("backend", "local") != "local" and not model["endpoint"]["url"]:
        flags["model.endpoint.url"] = "http://embedding-server:8080"
    return flags


@pytest.mark.parametrize("profile", sorted(CONF_DIR.glob("*.yaml")), ids=lambda path: path.stem)
def test_every_shipped_profile_loads_and_validates(profile: Path) -> None:
    """Cluster profiles leave input and output (and an endpoint profile its URL) to the command
    line; the flags complete them."""
    raw = yaml.safe_load(profile.read_text())
    flags = completing_flags(raw)
    by_name = load_settings(profile.stem, flags=flags)
    assert by_name == load_settings(str(profile), flags=flags)
    assert by_name.model.name
    assert by_name.input.path
    assert by_name.output.path


def test_production_profile_needs_input_and_output_only_where_the_job_embeds_a_corpus():
    with pytest.raises(SettingsError, match=r"input\.path is required"):
        load_settings("qwen3-embedding-4b")
    settings = load_settings("qwen3-embedding-4b", require_io=False)
    assert settings.model.name == "Qwen/Qwen3-Embedding-4B" and settings.output.path == ""


def test_set_reaches_one_entry_of_a_map_setting_whose_keys_have_dots() -> None:
    settings = load_settings("qwen3-embedding-4b", overrides=[
        "spark.conf.spark.executor.resource.gpu.discoveryScript=/opt/spark/getGpus.sh",
        "input.csv_options.sep=|", "input.csv_options.quote=",
        "spark.conf.spark.ui.port=0400"], require_io=False)
    conf = settings.spark.conf
    assert conf["spark.executor.resource.gpu.discoveryScript"] == "/opt/spark/getGpus.sh"
    assert conf["spark.task.resource.gpu.amount"] == "1", "the profile's other entries stay"
    assert settings.input.csv_options == {"sep": "|", "quote": ""}, "as given, not YAML"
    assert conf["spark.ui.port"] == "0400"


@pytest.mark.parametrize("profile", sorted(CONF_DIR.glob("*.yaml")), ids=lambda path: path.stem)
def test_a_runs_recorded_config_reads_back_through_the_same_typed_loader(profile: Path) -> None:
    """`<table>_runs` keeps `Settings.to_dict()` as JSON: it reads back to equal settings, and a
    value of the wrong type is refused naming its key, as in a profile."""
    settings = load_settings(profile.stem, flags={"input.path": "in", "output.path": "out",
                                                  **completing_flags(yaml.safe_load(
                                                      profile.read_text()))})
    recorded = json.dumps(settings.to_dict(), sort_keys=True)
    assert recorded_settings(recorded) == settings
    raw = settings.to_dict()
    raw["batch"]["max_batch_rows"] = "many"
    with pytest.raises(SettingsError, match=r"batch\.max_batch_rows must be an integer"):
        recorded_settings(json.dumps(raw))
    with pytest.raises(SettingsError, match="not JSON"):
        recorded_settings(recorded[:-1])
