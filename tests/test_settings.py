"""kalm_mlx.settings: the Settings object and the helpers the ensemble and the server share.

The parsing of each variable, in every form, is tested in test_ensemble (through from_env).
"""

import dataclasses

import pytest

from kalm_mlx.registry import get_model
from kalm_mlx.settings import Settings, check_weight, parse_model_list, registry_entry


def test_settings_defaults_and_is_frozen():
    settings = Settings.from_env({})
    assert settings == Settings(models=("bge-base",), weights={"bge-base": 1.0})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.models = ("minilm",)


def test_settings_merge_inline_and_separate_weights():
    settings = Settings.from_env({"EMBED_MODELS": "kalm:2, minilm, nomic", "EMBED_WEIGHTS": "nomic:0.5"})
    assert settings.models == ("kalm-v2", "minilm", "nomic")
    assert dict(settings.weights) == {"kalm-v2": 2.0, "minilm": 1.0, "nomic": 0.5}


def test_settings_errors_name_variable_and_value():
    with pytest.raises(ValueError, match=r"EMBED_MAX_LOADED='0'"):
        Settings.from_env({"EMBED_MAX_LOADED": "0"})
    with pytest.raises(ValueError, match=r"EMBED_MODELS='nope'.*unknown model 'nope'"):
        Settings.from_env({"EMBED_MODELS": "nope"})


def test_check_weight():
    assert check_weight(2, 2) == 2.0
    for bad in (0, -1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="weight"):
            check_weight(bad, bad)


def test_registry_entry_splits_quantized_variants():
    assert registry_entry("kalm-q8") == (get_model("kalm-v2"), "q8")
    assert registry_entry("BAAI/bge-base-en-v1.5") == (get_model("bge-base"), None)
    assert registry_entry("no-such-model") == (None, None)
    assert parse_model_list("kalm-q4") == (["kalm-v2-q4"], {})
