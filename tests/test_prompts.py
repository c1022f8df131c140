"""Every prompt of a run derives from the one scene prompt: Phase 0, the baseline, each pass and the QA loop share the
scene's setting; the baseline and the passes carry the subjects' tokens (invariant 6)."""
import io
import json

import pytest

from helpers import prompts as hpr
from helpers.config import PROFILE_DEFAULTS, ProjectConfig, Subject
from helpers.notebook import notebook_config


def all_configured_scenes():
    for profile in PROFILE_DEFAULTS:
        config = ProjectConfig(profile=profile, **{**PROFILE_DEFAULTS[profile], "eval_prompts": 99})
        for scene in hpr.evaluation_scenes(config):
            yield pytest.param(config, scene, id=f"{profile}:{scene}")


@pytest.mark.parametrize("config, scene", list(all_configured_scenes()))
def test_every_prompt_of_every_configured_scene_shares_its_setting_and_carries_the_tokens(config, scene):
    prompts = hpr.config_scene_prompts(config, scene)
    setting = prompts.setting_words()
    assert setting, scene  # every configured scene says where it happens
    every = {"phase0": prompts.phase0, "baseline": prompts.baseline,
             **{f"pass {n}": p for n, p in prompts.passes.items()},
             **{f"qa {s.name}": prompts.qa(s.name) for s in config.subjects}}
    for label, prompt in every.items():
        assert set(setting) <= set(hpr.words(prompt)), (label, prompt)
    for s in config.subjects:
        assert f"{s.token} {s.class_name}" in prompts.baseline
        assert f"{s.token} {s.class_name}" in prompts.passes[s.name]
        assert all(o.token not in prompts.passes[s.name] for o in config.subjects if o is not s)
        assert s.token not in prompts.phase0


def test_the_rule_on_examples():
    subjects = [Subject("cat", "sks", "cat", "d/c", "l/c"), Subject("mug", "zwx", "mug", "d/m", "l/m")]
    p = hpr.scene_prompts("a cat left of a mug on grass, cool light", subjects)
    assert p.baseline == "a sks cat left of a zwx mug on grass, cool light"
    assert p.passes == {"cat": "a sks cat on grass, cool light", "mug": "a zwx mug on grass, cool light"}
    p = hpr.scene_prompts("a photo of a fluffy cat and an old mug on a shelf, studio light", subjects)
    assert p.passes["cat"] == "a photo of a fluffy sks cat on a shelf, studio light"
    assert p.passes["mug"] == "a photo of an old zwx mug on a shelf, studio light"
    p = hpr.scene_prompts("{mug} right of {cat} at night", subjects)
    assert p.phase0 == "a mug right of a cat at night" and p.baseline == "a zwx mug right of a sks cat at night"
    assert hpr.scene_prompts("{subjects} in a garden", subjects).phase0 == "a cat and a mug in a garden"


def test_two_subjects_of_one_class_take_its_mentions_in_order():
    cats = [Subject("tom", "sks", "cat", "d/t", "l/t"), Subject("kit", "ohwx", "cat", "d/k", "l/k")]
    p = hpr.scene_prompts("a black cat left of a white cat on grass", cats)
    assert p.baseline == "a black sks cat left of a white ohwx cat on grass"
    assert p.passes == {"tom": "a black sks cat on grass", "kit": "a white ohwx cat on grass"}
    with pytest.raises(hpr.ScenePromptError, match="'tom', 'kit' are all cats: name each one"):
        hpr.scene_prompts("a cat on grass", cats)


def test_a_scene_that_does_not_name_a_subject_is_refused_in_one_line_before_anything_runs(tmp_path):
    parameters = {"profile": "tiny", "output_dir": str(tmp_path), "scene_prompt": "a dog on a sofa"}
    with pytest.raises(ValueError) as error:
        notebook_config("03", parameters)
    message = str(error.value)
    assert "\n" not in message and "does not name subject 'cat'" in message and "{cat}" in message
    assert not (tmp_path / "config.json").exists()
    notebook_config("01", parameters)  # training needs no scene


def test_a_saved_config_with_the_old_fixed_suffix_still_loads():
    data = ProjectConfig().to_dict()
    data["subject_prompt_suffix"] = "on a wooden table"
    assert ProjectConfig.from_json(json.dumps(data), "config.json") == ProjectConfig()


def test_notebook_03_paints_each_pass_in_the_scene_it_is_given(tmp_path):
    """The acceptance run: notebook 03 with another scene writes pass prompts of that scene."""
    from helpers.run import NOTEBOOKS_DIR, run_series

    out = io.StringIO()
    scene = "a cat left of a mug on grass, cool light"
    runs, code = run_series(NOTEBOOKS_DIR, str(tmp_path / "out"), "tiny", {"scene_prompt": scene},
                            only=["01", "03"], progress=False, stream=out)
    assert code == 0, out.getvalue()
    result = json.loads((tmp_path / "out" / "coarse_to_fine" / "result.json").read_text())
    assert result["scene_prompt"] == scene
    for p in result["passes"]:
        assert "grass" in p["prompt"] and "cool" in p["prompt"], p
    assert [p["prompt"] for p in result["passes"]] == ["a sks cat on grass, cool light", "a zwx mug on grass, cool light"]
