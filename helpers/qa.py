"""The active QA loop: score every subject, refine only the ones that fail, keep the best attempt, log every decision.

Scores come from a ``scoring.Scorer`` on each subject's own pixels (``measures.own_crop``: its support without its
neighbours'): identity = against that subject's reference photos (CLIP-I), prompt adherence = against "a photo of a
{class}" (CLIP-T), a leakage row = against every subject's references, and the class the scorer names the object
located there. A subject fails by the first rule it breaks: its class is not what the region shows, its identity is
below its threshold, another subject's photos match it better (leak), or the region's inner edge no longer shows the
scene around it (setting: another setting or the subject painted edge to edge, ``measures.scene_background_share``;
``qa_setting_rule``); the log names the rule. Refinement reuses the subject pass (``pipeline.pass_candidates``: every
failing subject of a round in one batched call where crops allow) with the subject's prompt in the scene's setting,
its token and class word weighted up; a region whose setting broke is repainted from Phase 0's region with the
first pass's plain prompt, whichever rule fired first (``refinement_job``). No plots.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .config import ProjectConfig, Subject
from .io import save_image_atomic, write_json_atomic
from .measures import SPLIT_WORLD_MIN_SHARE, own_crop, scene_background_share
from .models import ModelBundle
from .pipeline import GenerationResult, PassJob, pass_candidates, subject_seed, with_regions_from
from .prompts import ScenePrompts, config_scene_prompts
from .scoring import Scorer


# ----------------------------------------------------------------------------------------------------------------
# thresholds
# ----------------------------------------------------------------------------------------------------------------
def subject_thresholds(scorer: Scorer, config: ProjectConfig) -> dict[str, float]:
    """Pass threshold per subject.

    ``calibrated`` (default): ``qa_calibration_fraction`` x the mean similarity between the subject's own reference
    photos. Raw cosine levels differ between scorers (ViT-H vs ViT-L vs a random tower) and between subjects (a
    plain mug's photos agree more than a cat's), so a threshold relative to how alike the references are carries over;
    a fixed number does not. ``fixed``: ``qa_pass_threshold`` for everyone. A subject with a single reference photo
    cannot be calibrated and falls back to the fixed threshold.
    """
    thresholds = {}
    for subject in config.subjects:
        reference = scorer.reference_similarity(subject.name) if config.qa_threshold_mode == "calibrated" else None
        if reference is None or not np.isfinite(reference):
            if config.qa_threshold_mode == "calibrated":
                warnings.warn(f"{subject.name}: one reference photo cannot calibrate a threshold; using the fixed "
                              f"qa_pass_threshold={config.qa_pass_threshold}")
            thresholds[subject.name] = config.qa_pass_threshold
        else:
            thresholds[subject.name] = config.qa_calibration_fraction * reference
    return thresholds


# ----------------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SubjectScore:
    identity: float
    prompt: float
    leakage: dict[str, float]
    threshold: float
    class_name: str = ""  # the subject's class
    named_as: str | None = None  # what the scorer named the object in the region (None: nothing found)
    # share of the region's inner edge showing the scene's background; nan: not judged (rule off, or no band)
    background_share: float = float("nan")

    @property
    def leaked_to(self) -> str | None:
        """Another subject whose references match this region better than its own do."""
        own = self.identity
        rivals = {name: s for name, s in self.leakage.items() if s > own}
        return max(rivals, key=rivals.get) if rivals else None

    @property
    def class_present(self) -> bool:
        return self.named_as == self.class_name

    @property
    def setting_broken(self) -> bool:
        """The region's inner edge hardly shows the scene around it (a split world)."""
        return bool(self.background_share < SPLIT_WORLD_MIN_SHARE)  # nan compares False: not judged

    @property
    def rule(self) -> str | None:
        """The first rule the region breaks (class, identity, leak, setting), or None when it passes."""
        if not self.class_present:
            return "class"
        if self.identity < self.threshold:
            return "identity"
        if self.leaked_to:
            return "leak"
        if self.setting_broken:
            return "setting"
        return None

    @property
    def passed(self) -> bool:
        return self.rule is None

    def rank(self) -> tuple:
        """Candidates compare by: passes, shows its class, keeps the scene's setting, identity."""
        return self.passed, self.class_present, not self.setting_broken, self.identity

    def reason(self) -> str:
        if self.rule == "class":
            seen = f"a {self.named_as}" if self.named_as else "nothing"
            return f"class: the region shows {seen}, not a {self.class_name}"
        if self.rule == "identity":
            return f"identity: {self.identity:.3f} < threshold {self.threshold:.3f}"
        if self.rule == "leak":
            return f"leak: the region looks more like {self.leaked_to!r} ({self.leakage[self.leaked_to]:.3f})"
        if self.rule == "setting":
            return (f"setting: {self.background_share:.0%} of the region's inner edge shows the scene around it "
                    f"(< {SPLIT_WORLD_MIN_SHARE:.0%})")
        return "passed"


def score_subject(scorer: Scorer, image: Image.Image, result: GenerationResult, subject: Subject,
                  threshold: float, classes: list[str], setting_rule: bool = True) -> SubjectScore:
    """Scores of the subject's own pixels (its support minus its neighbours'; ``measures.own_crop``)."""
    crop = own_crop(image, result.masks, subject.name)
    row = scorer.leakage_row(crop, subject.name)
    share = scene_background_share(image, result.masks, subject.name) if setting_rule else float("nan")
    return SubjectScore(row[subject.name], scorer.prompt_score(crop, subject.class_prompt), row, threshold,
                        subject.class_name, scorer.name_class(crop, classes), share)


@dataclass
class QAOutcome:
    final: Image.Image
    log: list[dict] = field(default_factory=list)
    summary: dict[str, dict] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        save_image_atomic(self.final, folder / "final.png")
        return write_json_atomic(folder / "qa_log.json", {"thresholds": self.thresholds, "summary": self.summary,
                                                           "decisions": self.log, "seconds": self.seconds})

    def ablation_rows(self) -> list[dict]:
        """Per subject: score without the loop, with it, and what the loop did."""
        return [{"subject": name, "identity_before": round(s["before"], 4), "identity_after": round(s["after"], 4),
                 "class_before": s["class_before"], "class_after": s["class_after"], "failed_rule": s["rule_before"],
                 "threshold": round(self.thresholds[name], 4), "refinements": s["refinements"],
                 "kept_attempt": s["kept_attempt"], "passed": s["passed"]} for name, s in self.summary.items()]


def qa_loop(models: ModelBundle, result: GenerationResult, config: ProjectConfig, scorer: Scorer,
            thresholds: dict[str, float] | None = None) -> QAOutcome:
    """Score each subject of ``result.final``; refine failing ones (only their own region, only their own LoRA,
    emphasised prompt, a new seed per attempt), at most ``config.max_retries`` times; keep the best attempt.

    The loop goes in rounds: every subject still failing is refined once per round, all from the same picture, as
    one batched call where ``pipeline.pass_batches`` allows; each subject's best attempt is then put back into the
    picture inside its own mask, in layout order."""
    start = time.perf_counter()
    thresholds = thresholds or subject_thresholds(scorer, config)
    outcome = QAOutcome(result.final, thresholds=thresholds)
    image = result.final
    prompts = config_scene_prompts(config, result.scene_prompt)
    classes = config.presence_classes()
    subjects = [config.subject(region.subject) for region in result.layout.regions]
    first, best, attempts = {}, {}, {s.name: 0 for s in subjects}
    for subject in subjects:
        t0 = time.perf_counter()
        score = score_subject(scorer, image, result, subject, thresholds[subject.name], classes,
                              config.qa_setting_rule)
        first[subject.name] = best[subject.name] = (score, image, 0)
        outcome.log.append(_log_entry(subject, 0, None, score, "pass" if score.passed else "refine",
                                      time.perf_counter() - t0))
    for attempt in range(1, config.max_retries + 1):
        failing = [(index, s) for index, s in enumerate(subjects) if not best[s.name][0].passed]
        if not failing:
            break
        t0 = time.perf_counter()
        per_round = config.qa_candidates  # passes are numbered on across rounds (with 1 candidate: the round)
        planned = [(index, s, (attempt - 1) * per_round + j + 1)  # subjects alternate: a batch per candidate
                   for j in range(per_round) for index, s in failing]
        jobs = [refinement_job(config, prompts, s, subject_seed(result.seed, index, number), best[s.name][0])
                for index, s, number in planned]
        start_from = _with_phase0_where_setting_broke(result, _with_best(result, config, best),
                                                      [s.name for _, s in failing if best[s.name][0].setting_broken])
        candidates = pass_candidates(models, config, start_from, result.masks, jobs)
        seconds = (time.perf_counter() - t0) / len(jobs)
        for (_, subject, number), job, (candidate, _) in zip(planned, jobs, candidates):
            t1 = time.perf_counter()
            attempts[subject.name] = number
            cand_score = score_subject(scorer, candidate, result, subject, thresholds[subject.name], classes,
                                       config.qa_setting_rule)
            if cand_score.rank() > best[subject.name][0].rank():
                best[subject.name] = (cand_score, candidate, number)
            decision = ("pass" if cand_score.passed else "retry" if attempt < config.max_retries else "give up")
            decision += f"; best so far: attempt {best[subject.name][2]}"
            outcome.log.append(_log_entry(subject, number, job.seed, cand_score, decision,
                                          seconds + time.perf_counter() - t1))
    for subject in subjects:
        score, _, attempt = best[subject.name]
        before = first[subject.name][0]
        outcome.summary[subject.name] = {"before": before.identity, "after": score.identity,
                                         "class_before": before.class_present, "class_after": score.class_present,
                                         "rule_before": before.rule, "refinements": attempts[subject.name],
                                         "kept_attempt": attempt, "passed": score.passed, "reason": score.reason()}
    outcome.final = _with_best(result, config, best)
    outcome.seconds = time.perf_counter() - start
    return outcome


def refinement_job(config: ProjectConfig, prompts: ScenePrompts, subject: Subject, seed: int,
                   score: SubjectScore) -> PassJob:
    """How a failing subject is painted again. A region whose setting broke (whichever rule fired first) is painted
    anew with the first pass's plain prompt, from Phase 0's region (``_with_phase0_where_setting_broke``): split
    regions were mostly mugs painted edge to edge that also failed identity, and an adjustment of such a region, with
    the subject's words weighted up, kept its shape. Otherwise a region without its subject is painted anew at the
    first pass's strength, and one that shows it is adjusted at the lower refine strength, which keeps what is there;
    both with the token and class word weighted up."""
    if score.setting_broken:
        return PassJob(subject, seed, config.inpaint_strength, prompts.passes[subject.name])
    strength = config.repaint_strength if score.rule == "class" else config.refine_strength
    return PassJob(subject, seed, strength, prompts.qa(subject.name), config.prompt_boost)


def _with_phase0_where_setting_broke(result: GenerationResult, image: Image.Image, names: list[str]) -> Image.Image:
    """``image`` with the regions of ``names`` back to Phase 0's scene: a repaint that starts from a region painted
    edge to edge keeps its shape, one that starts from the scene's own region does not. Pixels that another region's
    (dilated) mask also touches stay as they are, so no neighbour is undone."""
    if not names:
        return image
    pixels, coarse, m = np.array(image), np.asarray(result.coarse), result.masks
    for name in names:
        back = m.soft[name] > 0
        for other, dilated in m.dilated.items():
            if other != name:
                back &= ~dilated
        pixels[back] = coarse[back]
    return Image.fromarray(pixels)


def _with_best(result: GenerationResult, config: ProjectConfig, best: dict[str, tuple]) -> Image.Image:
    """``result.final`` with each subject's best attempt so far put back (an attempt differs from the picture it was
    painted on only inside its subject's mask)."""
    kept = {name: picture for name, (_, picture, attempt) in best.items() if attempt}
    return with_regions_from(result.final, kept, result.masks, result.layout, config.region_margin)


def loop_invariants(outcome: QAOutcome, config: ProjectConfig) -> dict[str, bool]:
    """The loop's rules, checked on what it logged (true whatever the scores were)."""
    by_subject: dict[str, list[dict]] = {}
    for entry in outcome.log:
        by_subject.setdefault(entry["subject"], []).append(entry)
    facts = {"every subject scored once before any refinement":
             all(entries[0]["attempt"] == 0 for entries in by_subject.values())
             and sorted(by_subject) == sorted(outcome.summary)}
    facts["only failing subjects were refined"] = all(
        entries[0]["passed"] or len(entries) > 1 for entries in by_subject.values()) and all(
        len(entries) == 1 for entries in by_subject.values() if entries[0]["passed"])
    facts["never more than max_retries refinements"] = all(  # rounds; qa_candidates passes each
        len(entries) - 1 <= config.max_retries * config.qa_candidates for entries in by_subject.values())
    facts["the kept attempt is the best logged"] = all(
        max(entries, key=lambda e: (e["passed"], e["class_present"], not e.get("setting_broken", False),
                                    e["identity"]))["attempt"]
        == outcome.summary[name]["kept_attempt"]
        for name, entries in by_subject.items())
    facts["every decision has a reason"] = all(entry["reason"] for entry in outcome.log)
    return facts


def _log_entry(subject: Subject, attempt: int, seed: int | None, score: SubjectScore, decision: str,
               seconds: float) -> dict:
    return {"subject": subject.name, "attempt": attempt, "seed": seed, "identity": round(score.identity, 6),
            "prompt_score": round(score.prompt, 6), "leakage": {k: round(v, 6) for k, v in score.leakage.items()},
            "threshold": round(score.threshold, 6), "class_present": score.class_present, "named_as": score.named_as,
            "background_share": round(score.background_share, 4) if np.isfinite(score.background_share) else None,
            "setting_broken": score.setting_broken, "rule": score.rule, "passed": score.passed,
            "reason": score.reason(),
            "decision": decision, "seconds": round(seconds, 4)}


def score_table(scorer: Scorer, image: Image.Image, result: GenerationResult, config: ProjectConfig,
                thresholds: dict[str, float]) -> list[dict]:
    """One row per subject: identity, prompt score, threshold, pass/fail and why (no refinement)."""
    rows = []
    for region in result.layout.regions:
        subject = config.subject(region.subject)
        s = score_subject(scorer, image, result, subject, thresholds[subject.name], config.presence_classes(),
                          config.qa_setting_rule)
        rows.append({"subject": subject.name, **{k: v for k, v in asdict(s).items() if k != "leakage"},
                     "class_present": s.class_present, "passed": s.passed, "reason": s.reason()})
    return rows
