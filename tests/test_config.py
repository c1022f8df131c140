import json

import pytest

from helpers.config import (HASHED_FIELDS, PROFILE_DEFAULTS, QA_PASS_THRESHOLD, SUBJECTS, ProjectConfig, Subject,
                            check_setting)
from helpers.io import load_config, save_config
from helpers.models import resolve_profile
from helpers.notebook import make_config, notebook_config


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
    ({"subjects": [Subject("a", "sks", "cat", "d1", "l1"), Subject("a", "zwx", "mug", "d2", "l2")]}, "subjects"),
    ({"subjects": [Subject("a", "sks", "cat", "d1", "l1"), Subject("b", "sks", "mug", "d2", "l2")]}, "subjects"),
    ({"subjects": []}, "subjects"),
    ({"subjects": [Subject("a", "sks", "cat", "d1", "same"), Subject("b", "zwx", "mug", "d2", "same")]}, "subjects"),
    ({"subjects": [Subject("a", "sks", "cat", "same", "l1"), Subject("b", "zwx", "mug", "same", "l2")]}, "subjects"),
    ({"inpaint_strength": 1.5}, "inpaint_strength"),
    ({"refine_strength": 0.0}, "refine_strength"),
    ({"qa_threshold_mode": "magic"}, "qa_threshold_mode"),
    ({"max_retries": -1}, "max_retries"),
    ({"steps": 10.5}, "steps"),  # a step count is an integer
    ({"steps": True}, "steps"),  # and a bool is not one
    ({"guidance_scale": float("nan")}, "guidance_scale"),
    ({"prior_preservation": 1}, "prior_preservation"),
    ({"region_margin": 1.0}, "region_margin"),  # exclusive upper bound
])
def test_invalid_values_name_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"ProjectConfig\.{field}"):
        ProjectConfig(**changes)


def test_field_lists_are_derived_from_the_declarations():
    assert set(HASHED_FIELDS) == {"profile", "seed", "train_steps", "train_resolution", "train_batch_size",
                                  "lora_rank", "lora_alpha", "learning_rate", "min_snr_gamma", "prior_preservation",
                                  "prior_loss_weight", "num_class_images"}
    assert PROFILE_DEFAULTS["tiny"]["resolution"] == 64 and PROFILE_DEFAULTS["sdxl"]["resolution"] == 1024
    assert PROFILE_DEFAULTS["sdxl-random"] == PROFILE_DEFAULTS["sdxl"]
    assert PROFILE_DEFAULTS["world"]["resolution"] == 128 and PROFILE_DEFAULTS["world"]["negative_prompt"] == ""
    assert [s.data_dir for s in PROFILE_DEFAULTS["world"]["subjects"]] == ["data/world/cat", "data/world/mug"]
    for profile, defaults in PROFILE_DEFAULTS.items():  # every profile default passes its own field's validation
        ProjectConfig(profile=profile, **defaults)
    assert ProjectConfig(seed=3).hashed_settings()["seed"] == 3


def test_check_setting_bounds():
    meta = dict(kind=float, choices=None, low=None, high=1.0, above=0.0, below=None, multiple_of=None)
    assert check_setting(1.0, meta) is None and check_setting(1, meta) is None
    assert "> 0.0" in check_setting(0.0, meta) and "<= 1.0" in check_setting(1.5, meta)
    assert "finite number" in check_setting("0.5", meta)


def test_json_round_trip(tmp_path):
    config = ProjectConfig(seed=5, scene_prompt="two friends", subjects=[Subject("dog", "qwe", "dog", "d/dog", "l")])
    path = save_config(config, tmp_path / "c.json")
    assert load_config(path) == config
    assert json.loads(path.read_text())["subjects"][0]["token"] == "qwe"
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]  # no temp file left behind


def test_unknown_field_and_bad_json_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown field.*colour"):
        ProjectConfig.from_dict({"colour": 1})
    with pytest.raises(ValueError, match=r"unknown field.*stepz \(did you mean steps"):
        ProjectConfig().replace(stepz=3)
    bad = tmp_path / "c.json"
    bad.write_text("{nope")
    with pytest.raises(ValueError, match=rf"{bad.name}: not valid JSON"):
        load_config(bad)


def test_make_config_uses_profile_defaults_and_overrides(tmp_path):
    config = make_config("tiny", output_dir=str(tmp_path), steps=7, seed=None)
    assert (config.profile, config.resolution, config.steps, config.seed) == ("tiny", 64, 7, 0)
    save_config(config.replace(seed=3))
    assert make_config("tiny", output_dir=str(tmp_path)).seed == 3  # settings flow down the series
    assert make_config("sdxl", output_dir=str(tmp_path)).resolution == 1024  # a saved tiny config is not reused
    with pytest.raises(ValueError, match="unknown field"):
        make_config("tiny", output_dir=str(tmp_path), stepz=3)


def test_notebook_config_reads_parameters_and_says_what_was_carried_over(tmp_path, capsys):
    params = {"profile": "tiny", "output_dir": str(tmp_path), "seed": 3, "steps": None, "force": True}
    config = notebook_config("00", params)
    assert config.seed == 3 and config.steps == 4 and load_config(config.config_file) == config
    first = capsys.readouterr().out
    assert first.startswith("[00] profile: tiny") and "carried over" not in first
    later = notebook_config("01", {"profile": "tiny", "output_dir": str(tmp_path), "steps": 6})
    assert (later.seed, later.steps) == (3, 6)  # carried over; the explicit parameter wins
    out = capsys.readouterr().out
    assert "carried over from config.json" in out and "seed=3" in out and "steps" not in out.split("carried")[1]


def test_auto_profile_and_env_override(monkeypatch):
    monkeypatch.setenv("HELPERS_PROFILE", "sdxl")
    assert resolve_profile("auto") == "sdxl"
    assert resolve_profile("tiny") == "tiny"  # an explicit profile wins over the environment
    monkeypatch.setenv("HELPERS_PROFILE", "")
    import torch
    assert resolve_profile("auto") == ("sdxl" if torch.cuda.is_available() else "world")  # the shipped offline world
    with pytest.raises(ValueError, match="unknown profile"):
        resolve_profile("medium")
