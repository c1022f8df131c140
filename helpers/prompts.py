"""Every prompt of a run from the one scene prompt the user writes.

The scene prompt names each subject by its class word ("a cat left of a mug on grass, cool light") or by a
placeholder with the subject's name ("{cat} left of {mug} on grass"). From it come:

* Phase 0's prompt: the scene as written (placeholders become "a cat");
* the baseline's: the same with each subject's token before its class word ("a sks cat left of a zwx mug on grass");
* each subject pass's: the subject's own words with its token, in the scene's setting — the words around the
  subjects ("a photo of " ... " on grass, cool light") — so a region is inpainted into the scene being made;
* the QA loop's: the pass prompt, whose token and class word it emphasises.

Two subjects of one class take that class's mentions in order (the first "cat" is the first cat subject's).
Plain text, standard library only: the notebooks check a scene before anything runs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .config import ProjectConfig, Subject

ARTICLES = ("a", "an", "the", "one", "my", "your", "our")
ADJECTIVES_BEFORE_CLASS = 3  # "a small fluffy cat": the subject's own words reach back to its article
_WORD = re.compile(r"[A-Za-z0-9'-]+")


class ScenePromptError(ValueError):
    """A scene prompt that does not name every subject."""


@dataclass(frozen=True)
class Mention:
    """Where a subject stands in the scene prompt: ``start``..``end`` is its phrase ("a fluffy cat"), ``word`` the
    class word's own span."""

    subject: str
    start: int
    end: int
    word_start: int


@dataclass(frozen=True)
class ScenePrompts:
    """The prompts of one run, all derived from ``scene``."""

    scene: str
    phase0: str
    baseline: str
    passes: dict[str, str]
    setting_prefix: str
    setting_suffix: str

    @property
    def setting(self) -> str:
        """The words around the subjects ("a photo of … on grass, cool light"): what every prompt shares."""
        return " … ".join(p.strip(" ,") for p in (self.setting_prefix, self.setting_suffix) if p.strip(" ,"))

    def setting_words(self) -> list[str]:
        return words(self.setting)

    @property
    def empty_setting(self) -> str:
        """The scene without its subjects ("on grass, cool light"): what a ghost is painted over with."""
        return _tidy(f"{self.setting_prefix} {self.setting_suffix}").strip(" ,")

    def qa(self, subject: str) -> str:
        """The QA loop's prompt for ``subject`` (its pass prompt; the loop weights the token and class word up)."""
        return self.passes[subject]


def expand_placeholders(scene: str, subjects: list[Subject]) -> str:
    """``{name}`` becomes "a <class>" (or "an <class>")."""
    for s in subjects:
        scene = scene.replace("{" + s.name + "}", f"{_article(s.class_name)} {s.class_name}")
    return scene


def find_mentions(scene: str, subjects: list[Subject]) -> dict[str, Mention]:
    """Each subject's phrase in ``scene`` (placeholders already expanded); ``ScenePromptError`` naming the first
    subject the prompt does not name."""
    words = [(m.group(0), m.start(), m.end()) for m in _WORD.finditer(scene)]
    taken: set[int] = set()
    mentions: dict[str, Mention] = {}
    for s in subjects:
        class_words = s.class_name.lower().split()
        n = len(class_words)
        found = None
        for i in range(len(words) - n + 1):
            if i not in taken and [w.lower() for w, _, _ in words[i:i + n]] == class_words:
                found = i
                break
        if found is None:
            same_class = [o.name for o in subjects if o.class_name.lower() == s.class_name.lower()]
            more = (f" (subjects {', '.join(map(repr, same_class))} are all {s.class_name}s: name each one)"
                    if len(same_class) > 1 else "")
            raise ScenePromptError(
                f"scene prompt {scene!r} does not name subject {s.name!r}{more}: write its class word where it goes "
                f"('{_article(s.class_name)} {s.class_name} …') or the placeholder {{{s.name}}}, e.g. "
                f"'{example_scene(subjects)}'")
        taken.update(range(found, found + n))
        start = found
        for back in range(1, ADJECTIVES_BEFORE_CLASS + 1):
            j = found - back
            if j < 0 or j in taken:
                break
            if words[j][0].lower() in ARTICLES:
                start = j
                break
        mentions[s.name] = Mention(s.name, words[start][1], words[found + n - 1][2], words[found][1])
    return mentions


def scene_prompts(scene: str, subjects: list[Subject]) -> ScenePrompts:
    """Phase 0's, the baseline's and every pass's prompt from one scene prompt (see the module docstring)."""
    phase0 = expand_placeholders(expand_subjects(scene, subjects), subjects)
    mentions = find_mentions(phase0, subjects)
    by_subject = {s.name: s for s in subjects}
    baseline = phase0
    for m in sorted(mentions.values(), key=lambda m: m.word_start, reverse=True):
        baseline = f"{baseline[:m.word_start]}{by_subject[m.subject].token} {baseline[m.word_start:]}"
    first, last = min(m.start for m in mentions.values()), max(m.end for m in mentions.values())
    prefix, suffix = phase0[:first], phase0[last:]
    passes = {}
    for name, m in mentions.items():
        phrase = phase0[m.start:m.word_start] + f"{by_subject[name].token} " + phase0[m.word_start:m.end]
        if not phrase.split()[0].lower() in ARTICLES:
            phrase = f"{_article(phrase)} {phrase}"
        passes[name] = _tidy(f"{prefix}{phrase}{suffix}")
    return ScenePrompts(scene, phase0, baseline, passes, prefix, suffix)


def config_scene_prompts(config: ProjectConfig, scene: str | None = None) -> ScenePrompts:
    return scene_prompts(scene or config.scene_prompt, config.subjects)


def evaluation_scenes(config: ProjectConfig) -> list[str]:
    """The scene prompt, then the config's extra scenes (``{subjects}`` becomes "a cat and a mug"), ``eval_prompts``
    of them in all."""
    variants = [config.scene_prompt, *(expand_subjects(p, config.subjects) for p in config.extra_scene_prompts)]
    return variants[:config.eval_prompts]


def expand_subjects(scene: str, subjects: list[Subject]) -> str:
    if "{subjects}" not in scene:
        return scene
    phrases = [f"{_article(s.class_name)} {s.class_name}" for s in subjects]
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return scene.replace("{subjects}", listed)


def scene_prompt_problem(config: ProjectConfig) -> str | None:
    """One line naming the first configured scene (``scene_prompt`` or an extra one) that does not name every
    subject, or None."""
    scenes = {"scene_prompt": config.scene_prompt,
              **{f"extra_scene_prompts[{i}]": expand_subjects(p, config.subjects)
                 for i, p in enumerate(config.extra_scene_prompts)}}
    for field_name, scene in scenes.items():
        try:
            scene_prompts(scene, config.subjects)
        except ScenePromptError as e:
            return f"{field_name}: {e}"
    return None


def example_scene(subjects: list[Subject]) -> str:
    phrases = [f"{_article(s.class_name)} {s.class_name}" for s in subjects]
    listed = phrases[0] if len(phrases) == 1 else " left of ".join(phrases[:2]) + "".join(
        f" and {p}" for p in phrases[2:])
    return f"{listed} on grass, cool light"


def words(text: str) -> list[str]:
    """The lower-case words of ``text`` (punctuation dropped)."""
    return _WORD.findall(text.lower())


def _article(words: str) -> str:
    return "an" if words[:1].lower() in ("a", "e", "i", "o", "u") else "a"


def _tidy(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()
