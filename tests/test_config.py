import json

import pytest

from helpers.config import QA_PASS_THRESHOLD, SUBJECTS, ProjectConfig, Subject, make_config, resolve_profile


def test_defaults_mirror_the_seed():
    config = ProjectConfig()
    assert [s.name for s in config.subjects] == ["cat", "mug"] == [s.name for s in SUBJECTS]
    assert config.qa_pass_threshold == QA_PASS_THRESHOLD
    assert config.subject("cat").instance_prompt == "a photo of sks cat"


@pytest.mark.parametrize("changes, field", [
    ({"profile": "huge"}, "profile"),
    ({"steps": 0}, "steps"),
    ({"train_steps": -1}, "train_steps"),
    ({"resolution": 100}, "resolution"),
    ({"train_resolution": 0}, "train_resolution"),
    ({"subjects": [Subject("a", "sks", "cat", "d", "l"), Subject("a", "zwx", "mug", "d", "l")]}, "subjects"),
    ({"subjects": [Subject("a", "sks", "cat", "d", "l"), Subject("b", "sks", "mug", "d", "l")]}, "subjects"),
    ({"subjects": []}, "subjects"),
    ({"inpaint_strength": 1.5}, "inpaint_strength"),
    ({"refine_strength": 0.0}, "refine_strength"),
    ({"qa_threshold_mode": "magic"}, "qa_threshold_mode"),
    ({"max_retries": -1}, "max_retries"),
])
def test_invalid_values_name_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"ProjectConfig\.{field}"):
        ProjectConfig(**changes)


def test_json_round_trip(tmp_path):
    config = ProjectConfig(seed=5, scene_prompt="two friends", subjects=[Subject("dog", "qwe", "dog", "d/dog", "l")])
    path = config.save(tmp_path / "c.json")
    assert ProjectConfig.load(path) == config
    assert json.loads(path.read_text())["subjects"][0]["token"] == "qwe"


def test_unknown_field_and_bad_json_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown field.*colour"):
        ProjectConfig.from_dict({"colour": 1})
    bad = tmp_path / "c.json"
    bad.write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        ProjectConfig.load(bad)


def test_make_config_uses_profile_defaults_and_overrides(tmp_path):
    config = make_config("tiny", output_dir=str(tmp_path), steps=7, seed=None)
    assert (config.profile, config.resolution, config.steps, config.seed) == ("tiny", 64, 7, 0)
    config.replace(seed=3).save()
    assert make_config("tiny", output_dir=str(tmp_path)).seed == 3  # settings flow down the series
    assert make_config("sdxl", output_dir=str(tmp_path)).resolution == 1024  # a saved tiny config is not reused
    with pytest.raises(ValueError, match="unknown field"):
        make_config("tiny", output_dir=str(tmp_path), stepz=3)


def test_auto_profile_and_env_override(monkeypatch):
    monkeypatch.setenv("HELPERS_PROFILE", "sdxl")
    assert resolve_profile("auto") == "sdxl"
    assert resolve_profile("tiny") == "tiny"  # an explicit profile wins over the environment
    monkeypatch.setenv("HELPERS_PROFILE", "")
    import torch
    assert resolve_profile("auto") == ("sdxl" if torch.cuda.is_available() else "tiny")
    with pytest.raises(ValueError, match="unknown profile"):
        resolve_profile("medium")
