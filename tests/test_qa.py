import math

import numpy as np
import pytest

from helpers import pipeline as hp
from helpers import qa
from helpers import scoring as hs
from helpers.layout import default_layout


class ScriptedScorer:
    """Identity answers the test controls: per subject, a list of scores for successive calls (last one repeats).
    The loop tells it which subject's region it scores (the ``Scorer`` protocol), so nothing is monkeypatched."""

    def __init__(self, script, references=0.9, rival=0.1, named=None):
        self.script = {k: list(v) for k, v in script.items()}
        self.subject_names = list(script)
        self.calls = {k: 0 for k in script}
        self.rival = rival
        self.references = references
        self.named = {k: list(v) for k, v in (named or {}).items()}  # what each region is named, call by call
        self.named_calls = {k: 0 for k in script}
        self.last_region = None

    def next_identity(self, subject):
        values = self.script[subject]
        value = values[min(self.calls[subject], len(values) - 1)]
        self.calls[subject] += 1
        return value

    def leakage_row(self, image, region_subject):
        self.last_region = region_subject
        return {s: (self.next_identity(s) if s == region_subject else self.rival) for s in self.subject_names}

    def name_class(self, image, classes):
        """The region's own class (the tiny subjects are named after their classes) unless the script says else."""
        subject = self.last_region
        values = self.named.get(subject) or [subject]
        value = values[min(self.named_calls[subject], len(values) - 1)]
        self.named_calls[subject] += 1
        return value

    def prompt_score(self, image, text):
        return 0.3

    def reference_similarity(self, subject):
        return self.references


@pytest.fixture(scope="module")
def base_result(tiny_models, tiny_config, trained):
    return hp.coarse_to_fine(tiny_models, tiny_config, default_layout(tiny_config.subject_names, 64, 64), seed=5)


@pytest.fixture
def run_loop(tiny_models, tiny_config, base_result, monkeypatch):
    """Runs the loop with a scripted scorer; records every refinement pass (subject, seed, strength)."""
    refinements = []
    original = hp.region_pass

    def spy(models, config, image, masks, subject, seed, strength, prompt=None, emphasis_weight=1.0):
        refinements.append((subject.name, seed, strength, emphasis_weight))
        return original(models, config, image, masks, subject, seed, strength, prompt, emphasis_weight)

    monkeypatch.setattr(hp, "region_pass", spy)

    def run(script, max_retries=2, named=None, **config_changes):
        scorer = ScriptedScorer(script, named=named)
        config = tiny_config.replace(max_retries=max_retries, qa_threshold_mode="fixed", qa_pass_threshold=0.5,
                                     **{"batch_subject_passes": "off", "qa_setting_rule": False,
                                        **config_changes})  # the spy sees each pass; the setting rule: scripted
        return qa.qa_loop(tiny_models, base_result, config, scorer), refinements

    return run


def test_exactly_the_failing_subjects_are_refined(run_loop, base_result):
    outcome, refinements = run_loop({"cat": [0.9], "mug": [0.2, 0.8]})
    assert [r[0] for r in refinements] == ["mug"]
    assert refinements[0][2] == 0.65 and refinements[0][3] == 1.3  # refine strength, boosted prompt weight
    assert outcome.summary["cat"]["refinements"] == 0 and outcome.summary["mug"]["refinements"] == 1
    outside_mug = ~base_result.masks.support["mug"]  # the passing cat, and everything else, is untouched
    assert np.array_equal(np.asarray(outcome.final)[outside_mug], np.asarray(base_result.final)[outside_mug])


def test_several_candidates_per_round_each_get_a_seed_and_the_best_is_kept(run_loop):
    outcome, refinements = run_loop({"cat": [0.1, 0.3, 0.4, 0.35, 0.2], "mug": [0.9]}, max_retries=2,
                                    qa_candidates=2)
    assert [r[0] for r in refinements] == ["cat"] * 4  # 2 rounds x 2 candidates
    assert len({r[1] for r in refinements}) == 4
    assert outcome.summary["cat"]["refinements"] == 4  # passes, as the re-rolls get them
    assert outcome.summary["cat"]["kept_attempt"] == 2 and outcome.summary["cat"]["after"] == 0.4
    assert [e["attempt"] for e in outcome.log if e["subject"] == "cat"] == [0, 1, 2, 3, 4]


def test_refinement_passes_run_with_only_the_refined_subjects_adapter(run_loop, tiny_config, unet_spy):
    outcome, refinements = run_loop({"cat": [0.1, 0.2], "mug": [0.9]}, max_retries=2)
    assert [r[0] for r in refinements] == ["cat", "cat"]
    assert unet_spy.runs() == [("cat",)]  # observed on the UNet itself, at every call of both refinement passes
    assert len(unet_spy.calls) == 2 * int(tiny_config.steps * tiny_config.refine_strength)


def test_never_more_than_max_retries(run_loop):
    outcome, refinements = run_loop({"cat": [0.1], "mug": [0.1]}, max_retries=3)
    assert [r[0] for r in refinements] == ["cat", "mug"] * 3  # rounds: every failing subject once per round
    assert len({r[1] for r in refinements}) == 6  # a new seed for every attempt
    assert all(s["refinements"] == 3 and not s["passed"] for s in outcome.summary.values())
    assert [e["decision"].split(";")[0] for e in outcome.log if e["subject"] == "cat"] == \
        ["refine", "retry", "retry", "give up"]


def test_best_attempt_is_kept_even_when_a_later_one_is_worse(run_loop, base_result, tiny_models, tiny_config):
    outcome, _ = run_loop({"cat": [0.2, 0.45, 0.3], "mug": [0.9]})
    assert outcome.summary["cat"] == {"before": 0.2, "after": 0.45, "refinements": 2, "kept_attempt": 1,
                                      "class_before": True, "class_after": True, "rule_before": "identity",
                                      "passed": False, "reason": "identity: 0.450 < threshold 0.500"}
    cat_log = [e for e in outcome.log if e["subject"] == "cat"]
    assert cat_log[1]["decision"].endswith("best so far: attempt 1")
    assert cat_log[2]["decision"].endswith("best so far: attempt 1")
    seed1 = cat_log[1]["seed"]  # the kept image is attempt 1's: rebuild it and compare
    attempt1, _ = hp.region_pass(tiny_models, tiny_config, base_result.final, base_result.masks,
                                 tiny_config.subject("cat"), seed1, 0.65, emphasis_weight=1.3)
    cat = base_result.masks.support["cat"]
    assert np.array_equal(np.asarray(outcome.final)[cat], np.asarray(attempt1)[cat])


def test_pixels_outside_refined_masks_are_untouched(run_loop, base_result):
    outcome, _ = run_loop({"cat": [0.1, 0.9], "mug": [0.9]})
    before, after = np.asarray(base_result.final), np.asarray(outcome.final)
    outside_cat = ~base_result.masks.support["cat"]
    assert np.array_equal(before[outside_cat], after[outside_cat])
    assert not np.array_equal(before, after)


def test_leakage_fails_a_subject_even_above_threshold(tiny_models, tiny_config, base_result, monkeypatch):
    class Leaky(ScriptedScorer):
        def leakage_row(self, image, region_subject):
            self.last_region = region_subject
            return {"cat": 0.8, "mug": 0.95}  # every region looks more like the mug

    scorer = Leaky({"cat": [0.8], "mug": [0.95]})
    config = tiny_config.replace(max_retries=1, qa_threshold_mode="fixed", qa_pass_threshold=0.5,
                                 qa_setting_rule=False)
    outcome = qa.qa_loop(tiny_models, base_result, config, scorer)
    cat_log = [e for e in outcome.log if e["subject"] == "cat"]
    assert cat_log[0]["decision"] == "refine" and "looks more like 'mug'" in cat_log[0]["reason"]
    assert outcome.summary["mug"]["refinements"] == 0


def test_log_lists_every_decision_and_saves(run_loop, tmp_path):
    outcome, refinements = run_loop({"cat": [0.1, 0.9], "mug": [0.9]})
    assert len(outcome.log) == 2 + len(refinements)
    keys = {"subject", "attempt", "seed", "identity", "prompt_score", "leakage", "threshold", "decision", "seconds"}
    assert all(keys <= set(e) for e in outcome.log)
    path = outcome.save(tmp_path)
    assert path.exists() and (tmp_path / "final.png").exists()
    rows = outcome.ablation_rows()
    assert [r["refinements"] for r in rows] == [1, 0]


def test_open_clip_scorer_end_to_end_is_finite_and_reproducible(tiny_models, tiny_config, base_result):
    scorer = hs.ClipScorer.for_config(tiny_config)
    thresholds = qa.subject_thresholds(scorer, tiny_config)
    assert all(0 < t < 1 for t in thresholds.values())
    first = qa.qa_loop(tiny_models, base_result, tiny_config, scorer, thresholds)
    second = qa.qa_loop(tiny_models, base_result, tiny_config, hs.ClipScorer.for_config(tiny_config), thresholds)
    strip = lambda log: [{k: v for k, v in e.items() if k != "seconds"} for e in log]  # noqa: E731
    assert strip(first.log) == strip(second.log)
    assert all(math.isfinite(e["identity"]) and math.isfinite(e["prompt_score"]) for e in first.log)
    assert np.array_equal(np.asarray(first.final), np.asarray(second.final))


def test_thresholds_calibrated_and_fixed(tiny_config):
    scorer = ScriptedScorer({"cat": [0.5], "mug": [0.5]}, references=0.9)
    assert qa.subject_thresholds(scorer, tiny_config.replace(qa_calibration_fraction=0.5)) == \
        {"cat": pytest.approx(0.45), "mug": pytest.approx(0.45)}
    assert qa.subject_thresholds(scorer, tiny_config.replace(qa_threshold_mode="fixed", qa_pass_threshold=0.3)) == \
        {"cat": 0.3, "mug": 0.3}
    scorer.references = float("nan")  # one reference photo: cannot calibrate
    with pytest.warns(UserWarning, match="one reference photo"):
        assert qa.subject_thresholds(scorer, tiny_config)["cat"] == tiny_config.qa_pass_threshold


def test_evaluator_clip_score_is_100_times_the_floored_cosine(tiny_config, base_result):
    scorer = hs.ClipScorer.for_config(tiny_config)
    image_embedding = scorer.embed_images([base_result.final])
    cosines = []
    for text in ["a cat and a mug", "a red car on grass", "zzz"]:  # computed independently from the embeddings
        cosine = float((image_embedding @ scorer.embed_texts([text]).T).item())
        assert scorer.prompt_score(base_result.final, text) == pytest.approx(cosine, abs=1e-6)
        assert hs.Evaluator(scorer).compute_clip_score(base_result.final, text) == \
            pytest.approx(100 * max(cosine, 0.0), abs=1e-4)
        cosines.append(cosine)
    assert len(set(cosines)) == 3

    class Fixed:
        def __init__(self, value):
            self.value = value

        def prompt_score(self, image, text):
            return self.value

    assert hs.Evaluator(Fixed(0.314)).compute_clip_score(base_result.final, "x") == pytest.approx(31.4)
    assert hs.Evaluator(Fixed(-0.2)).compute_clip_score(base_result.final, "x") == 0.0


def test_dino_only_on_the_sdxl_profile(tiny_config, monkeypatch):
    scorer = hs.ClipScorer.for_config(tiny_config)
    assert hs.optional_dino_scorer(tiny_config, scorer) is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sdxl = tiny_config.replace(profile="sdxl")
    with pytest.warns(UserWarning, match="DINO scores skipped.*facebook/dinov2-base"):
        assert hs.optional_dino_scorer(sdxl, scorer) is None


def test_loop_invariants_hold_and_catch_a_broken_log(run_loop, tiny_config):
    import copy

    outcome, _ = run_loop({"cat": [0.1, 0.9], "mug": [0.9]})
    config = tiny_config.replace(max_retries=2)
    assert all(qa.loop_invariants(outcome, config).values())
    refined_a_passing_one = copy.deepcopy(outcome)
    refined_a_passing_one.log.append({**outcome.log[-1], "subject": "mug", "attempt": 1})
    assert not qa.loop_invariants(refined_a_passing_one, config)["only failing subjects were refined"]
    wrong_kept = copy.deepcopy(outcome)
    wrong_kept.summary["cat"]["kept_attempt"] = 0
    assert not qa.loop_invariants(wrong_kept, config)["the kept attempt is the best logged"]
    assert not qa.loop_invariants(outcome, tiny_config.replace(max_retries=0))["never more than max_retries refinements"]


def test_a_region_without_its_class_is_repainted_at_the_first_pass_strength_and_the_rule_is_logged(run_loop,
                                                                                                   tiny_config):
    outcome, refinements = run_loop({"cat": [0.9], "mug": [0.9]}, named={"cat": [None, "mug", "cat"]})
    cat_log = [e for e in outcome.log if e["subject"] == "cat"]
    assert cat_log[0]["rule"] == "class" and cat_log[0]["reason"] == "class: the region shows nothing, not a cat"
    assert cat_log[1]["reason"] == "class: the region shows a mug, not a cat" and cat_log[2]["passed"]
    assert [r[2] for r in refinements] == [tiny_config.inpaint_strength] * 2  # a repaint, not a small adjustment
    assert outcome.summary["cat"]["kept_attempt"] == 2 and outcome.summary["mug"]["refinements"] == 0


def test_a_candidate_that_shows_its_class_beats_a_higher_identity_without_it(run_loop, tiny_config):
    outcome, _ = run_loop({"cat": [0.1, 0.4, 0.3], "mug": [0.9]}, max_retries=2, named={"cat": ["cat", None, "cat"]})
    assert outcome.summary["cat"]["kept_attempt"] == 2  # attempt 1 had the higher identity but showed no cat
    assert all(qa.loop_invariants(outcome, tiny_config.replace(max_retries=2)).values())


def test_a_round_refines_every_failing_subject_in_one_batched_call(tiny_models, tiny_config, trained, corner_layout,
                                                                   monkeypatch):
    result = hp.coarse_to_fine(tiny_models, tiny_config, corner_layout, seed=5)
    calls, original = [], hp.batched_pass
    monkeypatch.setattr(hp, "batched_pass", lambda *a: calls.append([j.subject.name for j in a[-1]]) or original(*a))
    config = tiny_config.replace(max_retries=2, qa_threshold_mode="fixed", qa_pass_threshold=0.5,
                                 qa_setting_rule=False)
    outcome = qa.qa_loop(tiny_models, result, config, ScriptedScorer({"cat": [0.1, 0.2, 0.3], "mug": [0.1, 0.9]}))
    assert calls == [["cat", "mug"]]  # round 2: the mug passed; the cat alone is a plain (fused) pass
    assert [(e["subject"], e["attempt"]) for e in outcome.log] == [("cat", 0), ("mug", 0), ("cat", 1), ("mug", 1),
                                                                   ("cat", 2)]
    assert outcome.summary["mug"]["kept_attempt"] == 1 and outcome.summary["cat"]["kept_attempt"] == 2
    assert all(qa.loop_invariants(outcome, config).values())


@pytest.fixture
def scripted_setting(monkeypatch):
    """The share of each region's inner edge that shows the scene, call by call per subject (last one repeats)."""
    def script(shares: dict[str, list[float]]):
        calls = {k: 0 for k in shares}

        def share(image, masks_, subject):
            values = shares.get(subject, [1.0])
            calls.setdefault(subject, 0)
            value = values[min(calls[subject], len(values) - 1)]
            calls[subject] += 1
            return value

        monkeypatch.setattr(qa, "scene_background_share", share)
    return script


def test_a_region_whose_edge_lost_the_scene_is_repainted_with_the_plain_pass_prompt(run_loop, scripted_setting,
                                                                                   tiny_config):
    scripted_setting({"cat": [0.05, 0.1, 0.6], "mug": [0.6]})
    outcome, refinements = run_loop({"cat": [0.9], "mug": [0.9]}, qa_setting_rule=True)
    cat_log = [e for e in outcome.log if e["subject"] == "cat"]
    assert [e["rule"] for e in cat_log] == ["setting", "setting", None]
    assert cat_log[0]["reason"].startswith("setting: 5% of the region's inner edge shows the scene")
    assert cat_log[0]["setting_broken"] and cat_log[0]["background_share"] == 0.05
    # painted anew (first pass's strength) without the weighted-up subject words that spread it to the edges
    assert refinements == [("cat", refinements[0][1], tiny_config.inpaint_strength, 1.0)] * 1 + \
        [("cat", refinements[1][1], tiny_config.inpaint_strength, 1.0)]
    assert outcome.summary["cat"]["kept_attempt"] == 2 and outcome.summary["mug"]["refinements"] == 0
    assert all(qa.loop_invariants(outcome, tiny_config.replace(max_retries=2)).values())


def test_a_candidate_that_keeps_the_setting_beats_a_higher_identity_that_breaks_it(run_loop, scripted_setting,
                                                                                 tiny_config):
    scripted_setting({"cat": [0.6, 0.05], "mug": [0.6]})
    outcome, _ = run_loop({"cat": [0.3, 0.4], "mug": [0.9]}, max_retries=1, qa_setting_rule=True)
    assert outcome.summary["cat"]["kept_attempt"] == 0  # attempt 1: higher identity, but the region lost the scene
    assert all(qa.loop_invariants(outcome, tiny_config.replace(max_retries=1)).values())


def test_the_setting_rule_can_be_switched_off(run_loop, scripted_setting):
    scripted_setting({"cat": [0.05], "mug": [0.05]})
    outcome, refinements = run_loop({"cat": [0.9], "mug": [0.9]})  # qa_setting_rule=False
    assert not refinements and all(e["background_share"] is None for e in outcome.log)


def test_a_broken_setting_is_repainted_from_phase0s_region_and_nothing_else_is(tiny_models, tiny_config, base_result,
                                                                               scripted_setting, monkeypatch):
    starts, original = [], qa.pass_candidates
    monkeypatch.setattr(qa, "pass_candidates", lambda m, c, image, masks_, jobs: starts.append(image) or
                        original(m, c, image, masks_, jobs))
    scripted_setting({"cat": [0.05, 0.6], "mug": [0.6]})
    config = tiny_config.replace(max_retries=1, qa_threshold_mode="fixed", qa_pass_threshold=0.5)
    qa.qa_loop(tiny_models, base_result, config, ScriptedScorer({"cat": [0.9], "mug": [0.1, 0.9]}))
    (start,) = starts
    start, final, coarse = (np.asarray(p, np.int16) for p in (start, base_result.final, base_result.coarse))
    masks_ = base_result.masks
    cat, mug = masks_.support["cat"] & ~masks_.dilated["mug"], masks_.support["mug"]
    assert np.array_equal(start[cat], coarse[cat]) and not np.array_equal(final[cat], coarse[cat])
    assert np.array_equal(start[~masks_.dilated["cat"]], final[~masks_.dilated["cat"]])
    assert np.array_equal(start[mug], final[mug])  # an identity failure starts from the picture as it is


def test_a_split_region_that_also_fails_identity_is_repainted_from_phase0_not_adjusted(run_loop, scripted_setting,
                                                                                     tiny_config):
    scripted_setting({"cat": [0.05, 0.6], "mug": [0.6]})
    outcome, refinements = run_loop({"cat": [0.1, 0.9], "mug": [0.9]}, max_retries=1, qa_setting_rule=True)
    assert outcome.log[0]["rule"] == "identity" and outcome.log[0]["setting_broken"]
    assert refinements == [("cat", refinements[0][1], tiny_config.inpaint_strength, 1.0)]  # not 0.65, not boosted
