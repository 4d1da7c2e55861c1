"""Settings sources and their priority: arguments > environment > TOML file > profile > defaults."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from ground.settings import load_settings
from ground.task_types import ALL_TASK_TYPES

QWEN = "Qwen/Qwen2-72B-Instruct"


@pytest.fixture(autouse=True)
def clean_env(tmp_path, monkeypatch):
    """No real config file or EMBED_FACTORY_* variable of the developer may leak in."""
    for name in list(os.environ):
        if name.startswith("EMBED_FACTORY_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    """A TOML file in a folder other than the working directory, named by EMBED_FACTORY_CONFIG."""
    folder = tmp_path / "conf"
    folder.mkdir()
    path = folder / "factory.toml"

    def make(text: str) -> Path:
        write_toml(path, text)
        monkeypatch.setenv("EMBED_FACTORY_CONFIG", str(path))
        return path

    return make


# --- defaults ------------------------------------------------------------------------------------


def test_defaults_are_the_local_profile():
    s = load_settings()
    assert s.profile == "local"
    assert s.llm.model is None and s.llm.base_url is None
    assert s.uses_embedded_llm
    assert s.llm_model == s.embedded_llm.served_model_name
    assert s.llm_base_url == s.embedded_llm.base_url
    assert s.generation.unique_instructions is None
    assert s.generation.task_types == list(ALL_TASK_TYPES)
    assert s.personas.source == "seed"
    # the slow CPU server: a long answer among 64 in flight must not time out (production keeps 180 s)
    assert s.llm.request_timeout_s == 600 and load_settings(profile="production").llm.request_timeout_s == 180


# --- source priority -----------------------------------------------------------------------------


def test_toml_file_named_by_env_is_read(config_file):
    config_file("[generation]\nexamples = 77\nshard_size = 9\n")
    s = load_settings()
    assert s.generation.examples == 77
    assert s.generation.shard_size == 9


def test_default_toml_in_working_directory_is_read(clean_env):
    write_toml(clean_env / "embed-factory.toml", "[generation]\nexamples = 66\n")
    assert load_settings().generation.examples == 66


def test_env_config_path_wins_over_working_directory_file(clean_env, config_file):
    write_toml(clean_env / "embed-factory.toml", "[generation]\nexamples = 66\n")
    config_file("[generation]\nexamples = 77\n")
    assert load_settings().generation.examples == 77


def test_env_var_beats_toml(config_file, monkeypatch):
    config_file("[generation]\nexamples = 77\nshard_size = 9\n")
    monkeypatch.setenv("EMBED_FACTORY_GENERATION__EXAMPLES", "55")
    s = load_settings()
    assert s.generation.examples == 55
    assert s.generation.shard_size == 9  # sections merge key by key


def test_init_kwargs_beat_env_and_toml(config_file, monkeypatch):
    config_file("[generation]\nexamples = 77\nshard_size = 9\n")
    monkeypatch.setenv("EMBED_FACTORY_GENERATION__EXAMPLES", "55")
    monkeypatch.setenv("EMBED_FACTORY_GENERATION__SEED", "5")
    s = load_settings(generation={"examples": 33})
    assert s.generation.examples == 33
    assert s.generation.seed == 5
    assert s.generation.shard_size == 9


def test_none_overrides_are_ignored(monkeypatch):
    monkeypatch.setenv("EMBED_FACTORY_GENERATION__EXAMPLES", "55")
    s = load_settings(profile=None, generation={})
    assert s.generation.examples == 55
    assert s.profile == "local"


def test_env_nested_values_are_parsed(monkeypatch):
    monkeypatch.setenv("EMBED_FACTORY_LLM__BASE_URL", "http://gpu-box:9000/v1")
    monkeypatch.setenv("EMBED_FACTORY_LLM__TEMPERATURE", "0.25")
    monkeypatch.setenv("EMBED_FACTORY_GENERATION__TASK_TYPES", '["sts", "bitext"]')
    s = load_settings()
    assert s.llm_base_url == "http://gpu-box:9000/v1"
    assert not s.uses_embedded_llm
    assert s.llm.temperature == 0.25
    assert s.generation.task_types == ["sts", "bitext"]


# --- profiles ------------------------------------------------------------------------------------


def test_production_profile_by_argument():
    s = load_settings(profile="production")
    assert s.profile == "production"
    assert s.llm.model == QWEN and s.llm_model == QWEN
    assert s.generation.unique_instructions == 40_000
    assert not s.uses_embedded_llm
    assert s.personas.source == "hub"


def test_local_profile_has_no_production_values():
    s = load_settings(profile="local")
    assert s.llm.model != QWEN and s.llm_model != QWEN
    assert s.generation.unique_instructions != 40_000


def test_production_profile_by_env(monkeypatch):
    monkeypatch.setenv("EMBED_FACTORY_PROFILE", "production")
    s = load_settings()
    assert s.profile == "production"
    assert s.llm.model == QWEN
    assert s.generation.unique_instructions == 40_000


def test_production_profile_by_toml(config_file):
    config_file('profile = "production"\n[generation]\nexamples = 10\n')
    s = load_settings()
    assert s.llm.model == QWEN
    assert s.generation.unique_instructions == 40_000
    assert s.generation.examples == 10  # the file beats the preset


def test_argument_profile_beats_env_profile(monkeypatch):
    monkeypatch.setenv("EMBED_FACTORY_PROFILE", "production")
    s = load_settings(profile="local")
    assert s.profile == "local"
    assert s.llm.model != QWEN


def test_env_beats_profile_preset(monkeypatch):
    monkeypatch.setenv("EMBED_FACTORY_GENERATION__UNIQUE_INSTRUCTIONS", "12")
    s = load_settings(profile="production")
    assert s.generation.unique_instructions == 12
    assert s.llm.model == QWEN


def test_unknown_profile_is_an_error():
    with pytest.raises(ValueError, match="staging"):
        load_settings(profile="staging")


def test_profile_presets_are_not_mutated_between_loads():
    first = load_settings(profile="production", generation={"examples": 5})
    second = load_settings(profile="production")
    assert first.generation.examples == 5
    assert second.generation.examples != 5
    assert load_settings().llm.model is None


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"generation": {"examples": 0}},
        {"generation": {"examples": -3}},
        {"generation": {"shard_size": 0}},
        {"generation": {"task_types": []}},
        {"generation": {"task_types": ["retrieval", "poetry"]}},
        {"generation": {"instructions_per_brainstorm": 41}},
        {"llm": {"temperature": 2.5}},
        {"llm": {"top_p": 0}},
        {"llm": {"max_in_flight": 0}},
        {"embedded_llm": {"port": 70000}},
        {"prefect": {"port": 0}},
        {"personas": {"limit": 0}},
        {"generation": {"examples": "many"}},
    ],
)
def test_invalid_values_raise_validation_error(overrides):
    with pytest.raises(ValidationError):
        load_settings(**overrides)


def test_invalid_env_value_raises_validation_error(monkeypatch):
    monkeypatch.setenv("EMBED_FACTORY_GENERATION__EXAMPLES", "abc")
    with pytest.raises(ValidationError):
        load_settings()


def test_invalid_toml_value_raises_validation_error(config_file):
    config_file("[llm]\ntemperature = 9\n")
    with pytest.raises(ValidationError):
        load_settings()


def test_duplicate_task_types_are_collapsed_in_order():
    s = load_settings(generation={"task_types": ["sts", "retrieval", "sts", "bitext", "retrieval"]})
    assert s.generation.task_types == ["sts", "retrieval", "bitext"]


def test_unknown_top_level_key_is_rejected():
    with pytest.raises(ValidationError):
        load_settings(bogus=1)


def test_unknown_top_level_key_in_toml_is_rejected(config_file):
    config_file("[generaton]\nexamples = 5\n")  # typo of the section name
    with pytest.raises(ValidationError):
        load_settings()


def test_unknown_nested_key_is_rejected():
    with pytest.raises(ValidationError):
        load_settings(generation={"exampels": 5})


def test_unknown_nested_key_in_toml_is_rejected(config_file):
    config_file("[generation]\nexampels = 5\n")  # typo of a key: must not be silently ignored
    with pytest.raises(ValidationError):
        load_settings()


# --- secrets -------------------------------------------------------------------------------------


def test_api_key_is_secret_and_not_in_repr():
    s = load_settings(llm={"api_key": "sk-very-secret-123"})
    assert isinstance(s.llm.api_key, SecretStr)
    assert s.llm.api_key.get_secret_value() == "sk-very-secret-123"
    for text in (repr(s), str(s), repr(s.llm), str(s.llm), s.model_dump_json()):
        assert "sk-very-secret-123" not in text


def test_api_key_from_env_is_secret(monkeypatch):
    monkeypatch.setenv("EMBED_FACTORY_LLM__API_KEY", "env-secret-456")
    s = load_settings()
    assert isinstance(s.llm.api_key, SecretStr)
    assert s.llm.api_key.get_secret_value() == "env-secret-456"
    assert "env-secret-456" not in repr(s)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"retrieval": {"num_words": []}}, "at least one value"),
        ({"poetry": {"num_words": [10]}}, "placeholder_overrides"),
    ],
)
def test_placeholder_overrides_reject_unknown_types_and_empty_lists(overrides, message):
    with pytest.raises(ValidationError, match=message):
        load_settings(generation={"placeholder_overrides": overrides})
