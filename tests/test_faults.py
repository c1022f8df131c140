"""Issue 14's fault battery: every bad input, damaged file and full disk gets one clear line naming the file or
field, and leaves every good file as it was."""
from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import adapters as ha, data as hd, io as hio, layout as hl, pipeline as hp, profiles as hpr, run as hr
from helpers import training as ht
from helpers.config import ProjectConfig
from helpers.notebook import make_config, notebook_config


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(message: str) -> str:
    assert message and "\n" not in message.strip() and "Traceback" not in message, message
    return message


def _photo(path: Path, size: int = 300, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# photos
# ---------------------------------------------------------------------------------------------------------------
def test_a_flat_photo_is_refused_by_name(subject_dir):
    Image.new("RGB", (300, 300), (120, 80, 200)).save(subject_dir / "flat.png")
    with pytest.raises(hd.SubjectDataError, match=r"flat\.png: the photo is blank or one flat colour"):
        hd.load_photo(subject_dir / "flat.png", 64)


def noisy_photo(width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))


def test_a_decompression_bomb_photo_gets_one_line_naming_it(subject_dir, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # PIL refuses above twice this: a 200x200 photo
    noisy_photo(200, 200).save(subject_dir / "huge.png")
    with pytest.raises(hd.SubjectDataError, match=r"huge\.png: the photo is too large to open safely \(40000 "
                                                  r"pixels, over PIL's limit of 20000") as error:
        hd.load_photo(subject_dir / "huge.png", 64)
    _one_line(str(error.value))


def test_a_photo_in_the_warning_band_is_downscaled_with_a_note(subject_dir, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # PIL warns between 10,000 and 20,000 pixels
    monkeypatch.setattr(hd, "MAX_PHOTO_SIDE", 100)
    noisy_photo(130, 110).save(subject_dir / "big.png")
    with pytest.warns(UserWarning, match=r"big\.png: a very large photo .*downscaled to at most 100 px"):
        photo = hd.load_photo(subject_dir / "big.png", 64)
    assert max(photo.size) == 100


def test_a_16_bit_photo_keeps_its_content_instead_of_turning_white(subject_dir):
    ramp = np.tile(np.linspace(0, 65535, 300, dtype=np.uint16), (300, 1))
    Image.fromarray(ramp).save(subject_dir / "deep.png")
    assert Image.open(subject_dir / "deep.png").mode.startswith("I")
    pixels = np.asarray(hd.load_photo(subject_dir / "deep.png", 64))
    assert pixels[:, 0].max() < 5 and pixels[:, -1].min() > 250  # the ramp survived, dark to light


def test_every_file_not_used_is_reported_with_its_reason(subject_dir):
    for i in range(3):
        _photo(subject_dir / f"p{i}.jpg", seed=i)
    (subject_dir / "notes.txt").write_text("x")
    (subject_dir / "raw.heic").write_bytes(b"x")
    (subject_dir / "more").mkdir()
    _photo(subject_dir / "more" / "deep.jpg")
    (subject_dir / "folder.jpg").mkdir()  # a folder whose name looks like a photo
    (subject_dir / ".DS_Store").write_bytes(b"x")
    used, ignored = hd.photo_inventory(subject_dir)
    assert [p.name for p in used] == ["p0.jpg", "p1.jpg", "p2.jpg"]
    assert {p.name for p, _ in ignored} == {"notes.txt", "raw.heic", "more", "folder.jpg"}
    note = _one_line(hd.ignored_files_note(subject_dir, "toy"))
    assert "subfolders" in note and "'.heic'" in note and "folder.jpg" in note
    config = ProjectConfig(profile="tiny", subjects=[{"name": "toy", "token": "sks", "class_name": "toy",
                                                      "data_dir": str(subject_dir)}])
    with pytest.warns(UserWarning, match="not used: folder.jpg"):
        assert len(hd.load_subject_photos(config, config.subjects[0], min_size=64)) == 3
    assert "not used" in hd.photo_summary(config, config.subjects[0])


# ---------------------------------------------------------------------------------------------------------------
# subjects as the tokenizer sees them
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("subjects, scene, expected", [
    ([("cat", "sks"), ("mug", "SKS ")], None, r"tokens 'sks' and 'SKS ' are the same to the tokenizer"),
    ([("cat", "toy")], None, r"token 'toy' is a common word"),
    ([("cat", "ohwx")], "an ohwx on a table", r"token 'ohwx' already occurs in scene_prompt"),
])
def test_subject_tokens_are_checked_as_the_tokenizer_reads_them(tmp_path, subjects, scene, expected):
    config = make_config("tiny", output_dir=str(tmp_path), subjects=[
        {"name": n, "token": t, "class_name": n} for n, t in subjects], **({"scene_prompt": scene} if scene else {}))
    assert hpr.subject_token_problem(config) is not None
    parameters = {"profile": "tiny", "output_dir": str(tmp_path), "subjects": config.to_dict()["subjects"],
                  "scene_prompt": config.scene_prompt}
    with pytest.raises(ValueError, match=expected) as error:
        notebook_config("00", parameters)
    _one_line(str(error.value))
    assert not (tmp_path / "config.json").exists()  # refused before anything was written


def test_the_shipped_subjects_pass_the_token_check():
    from helpers.config import PROFILE_DEFAULTS

    for profile, defaults in PROFILE_DEFAULTS.items():
        assert hpr.subject_token_problem(ProjectConfig(profile=profile, **defaults)) is None, profile


def test_a_wrong_value_in_config_json_names_file_and_field_and_a_damaged_one_is_set_aside(tmp_path):
    config = make_config("tiny", output_dir=str(tmp_path))
    hio.save_config(config)
    data = json.loads(config.config_file.read_text())
    config.config_file.write_text(json.dumps({**data, "steps": 10.5}))
    with pytest.raises(ValueError, match=r"config\.json: steps: must be an int, got 10\.5") as error:
        make_config("tiny", output_dir=str(tmp_path))
    _one_line(str(error.value))
    config.config_file.write_text(json.dumps({**data, "stepz": 3}))
    with pytest.raises(ValueError, match=r"config\.json: unknown field\(s\) stepz \(did you mean steps") as error:
        make_config("tiny", output_dir=str(tmp_path))
    _one_line(str(error.value))
    config.config_file.write_text('{"steps": 4, "prof')  # cut off mid-write by another tool
    with pytest.warns(UserWarning, match="not valid JSON; starting from the profile's defaults"):
        fresh = make_config("tiny", output_dir=str(tmp_path))
    assert fresh.steps == ProjectConfig(profile="tiny").steps or fresh.profile == "tiny"
    assert [p.read_text() for p in tmp_path.glob("config.json.damaged-*")] == ['{"steps": 4, "prof']


# ---------------------------------------------------------------------------------------------------------------
# LoRA files, checkpoints and the model cache: trust the file, not the note about it
# ---------------------------------------------------------------------------------------------------------------
def _one_subject(tmp_path, **kw):
    config = make_config("tiny", output_dir=str(tmp_path / "out"), train_steps=4, checkpoint_every=2, **kw)
    return config.replace(subjects=config.subjects[:1])


def test_a_damaged_lora_is_not_up_to_date_is_set_aside_and_retrained(tmp_path, tiny_models):
    config = _one_subject(tmp_path)
    ht.run_training(config, models=tiny_models, progress=False)
    lora = config.lora_path(config.subjects[0]) / ha.LORA_WEIGHTS_FILE
    damaged = lora.read_bytes()[:-100]
    lora.write_bytes(damaged)
    with pytest.warns(UserWarning, match=r"does not open.*retraining.*kept as pytorch_lora_weights"):
        report = ht.run_training(config, models=tiny_models, progress=False)["cat"]
    assert report.status == "trained" and "does not open" in report.message
    assert [p.read_bytes() for p in lora.parent.glob(f"{ha.LORA_WEIGHTS_FILE}.damaged-*")] == [damaged]
    assert ht.run_training(config, progress=False)["cat"].status == "skipped"  # the new file is trusted


def test_a_lora_replaced_by_another_file_is_not_used_as_up_to_date(tmp_path, tiny_models):
    config = _one_subject(tmp_path)
    ht.run_training(config, models=tiny_models, progress=False)
    other = _one_subject(tmp_path / "other", lora_rank=2)
    ht.run_training(other, models=tiny_models, progress=False)
    lora = config.lora_path(config.subjects[0]) / ha.LORA_WEIGHTS_FILE
    lora.write_bytes((other.lora_path(other.subjects[0]) / ha.LORA_WEIGHTS_FILE).read_bytes())
    folder = config.lora_path(config.subjects[0])
    problem = ht.lora_file_problem(folder, ht.read_meta(folder), config)
    assert _one_line(problem) and "rank 2, the config asks for 4" in problem
    assert ht.skip_report(config, config.subjects[0], ht.read_meta(folder)["config_hash"]) is None


def test_a_lora_that_does_not_load_names_the_file_and_the_fix(tmp_path, tiny_models):
    config = _one_subject(tmp_path)
    folder = config.lora_path(config.subjects[0])
    folder.mkdir(parents=True)
    (folder / ha.LORA_WEIGHTS_FILE).write_bytes(b"\x00" * 64)
    with pytest.raises(ha.MissingLoraError, match=r"pytorch_lora_weights.safetensors cannot be loaded.*force=True") \
            as error:
        ha.load_subject_loras(tiny_models, config)
    _one_line(str(error.value))
    assert "cat" not in ha.adapter_names(tiny_models)


def test_a_checkpoint_of_the_wrong_shape_is_set_aside_not_half_loaded(tmp_path, tiny_models):
    config = _one_subject(tmp_path)
    ht.run_training(config, models=tiny_models, stop_after_steps=2, progress=False)
    folder = config.lora_path(config.subjects[0])
    checkpoint = folder / ht.CHECKPOINT_FILE
    wrong = _one_subject(tmp_path / "wrong", lora_rank=2)
    ht.run_training(wrong, models=tiny_models, stop_after_steps=2, progress=False)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(checkpoint), "pt") as f:
        metadata = f.metadata()
    save_file(load_file(wrong.lora_path(wrong.subjects[0]) / ht.CHECKPOINT_FILE), str(checkpoint), metadata=metadata)
    with pytest.warns(UserWarning, match="damaged training checkpoint.*LoRA shapes differ"):
        report = ht.run_training(config, models=tiny_models, progress=False)["cat"]
    assert report.status == "trained" and report.steps_done == 4
    clean = _one_subject(tmp_path / "clean")
    ht.run_training(clean, models=tiny_models, progress=False)
    assert load_file(folder / ha.LORA_WEIGHTS_FILE).keys() == \
        load_file(clean.lora_path(clean.subjects[0]) / ha.LORA_WEIGHTS_FILE).keys()
    assert len(list(folder.glob(f"{ht.CHECKPOINT_FILE}.damaged-*"))) == 1


def test_a_damaged_tiny_model_cache_is_set_aside_and_rebuilt(tmp_path):
    import torch

    cache = tmp_path / "cache"
    folder = hpr.ensure_tiny_pipeline(cache)
    weights = next((folder / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="tiny-model cache does not load"):
        pipe, _ = hpr.load_tiny_pipeline(cache, torch.float32)
    assert pipe.unet is not None and (folder / "model_index.json").exists()
    assert len(list(cache.glob(f"{hpr.TINY_VERSION}.damaged-*"))) == 1


# ---------------------------------------------------------------------------------------------------------------
# layouts from anywhere
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("regions, expected", [
    ([("cat", math.nan, 0.1, 0.3, 0.3)], "must be finite"),
    ([("cat", 0.9, 0.1, 0.3, 0.3)], "leaves the canvas"),
    ([("cat", 0.1, 0.1, 0.0, 0.0)], "smaller than the minimum"),
    ([("cat", "0.1", 0.1, 0.3, 0.3)], "must be numbers"),
    ([("cat", 0.5, 0.1, 0.3, 0.3), ("mug", 0.5, 0.1, 0.3, 0.3)], "overlap by 100%"),
])
def test_a_layout_built_in_code_is_checked_before_any_pass(tiny_models, tiny_config, regions, expected):
    regions = regions if len(regions) == 2 else regions + [("mug", 0.6, 0.6, 0.3, 0.3)]
    layout = hl.Layout([hl.Region(*r) for r in regions], 64, 64)
    with pytest.raises(hl.LayoutError, match=expected) as error:
        hp.coarse_to_fine(tiny_models, tiny_config, layout)
    _one_line(str(error.value))


def test_the_designer_opens_on_a_bad_layout_file_and_shows_the_problem(tmp_path):
    path = tmp_path / "layout.json"
    overlapping = hl.Layout([hl.Region("cat", 0.1, 0.1, 0.5, 0.5), hl.Region("mug", 0.2, 0.2, 0.5, 0.5)], 64, 64)
    overlapping.save(path)
    before = path.read_bytes()
    layout, note = hl.layout_to_repair(path, ["cat", "mug"], 64, 64)
    assert layout.to_dict() == overlapping.to_dict() and "overlap" in _one_line(note)
    from helpers.designer import LayoutDesigner

    designer = LayoutDesigner(["cat", "mug"], layout, save_path=path)
    assert "overlap" in designer.message.value and designer.save_button.disabled
    designer.set_region("mug", x=0.65, y=0.65, w=0.3, h=0.3)
    assert designer.save() == path and path.read_bytes() != before
    path.write_text("{not json")
    layout, note = hl.layout_to_repair(path, ["cat", "mug"], 64, 64)
    assert layout.subjects == ["cat", "mug"] and "starting from the default" in _one_line(note)
    assert path.read_text() == "{not json"  # replaced only when the user saves


# ---------------------------------------------------------------------------------------------------------------
# the runner: writes that cannot destroy, a clean Ctrl-C
# ---------------------------------------------------------------------------------------------------------------
def _series(folder: Path) -> Path:
    import nbformat

    folder.mkdir()
    for name in ("00_a", "01_b"):
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.cells = [nbformat.v4.new_code_cell("x = 1")]
        nb.cells[0].metadata["tags"] = ["parameters"]
        nbformat.write(nb, folder / f"{name}.ipynb")
    return folder


def _fake_papermill(monkeypatch, behaviour):
    import papermill

    monkeypatch.setattr(papermill, "execute_notebook", behaviour)


@pytest.mark.parametrize("code, said", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "the folder is read-only"),
                                        (errno.EDQUOT, "the disk quota is used up")])
def test_a_full_or_read_only_disk_ends_with_one_failed_line_and_keeps_the_previous_executed_copy(
        tmp_path, monkeypatch, code, said):
    notebooks, out = _series(tmp_path / "nbs"), tmp_path / "out"
    executed = out / "executed"
    executed.mkdir(parents=True)
    (executed / "00_a.ipynb").write_text('{"previous": "run"}')

    def disk_full(source, target, **kwargs):
        Path(target).write_text('{"cells": [')  # papermill got this far
        raise OSError(code, "cannot write")

    _fake_papermill(monkeypatch, disk_full)
    stream = io.StringIO()
    runs, exit_code = hr.run_series(notebooks, str(out), progress=False, stream=stream)
    failed = [line for line in stream.getvalue().splitlines() if line.startswith("FAILED")]
    assert exit_code == 1 and len(failed) == 1 and said in failed[0] and str(executed) in failed[0]
    assert "MiB free" in failed[0] and "Traceback" not in stream.getvalue()
    assert (executed / "00_a.ipynb").read_text() == '{"previous": "run"}'
    assert sorted(p.name for p in executed.iterdir()) == ["00_a.ipynb"]  # no half-written copy beside it


def test_an_unwritable_output_folder_stops_before_anything_runs(tmp_path, monkeypatch):
    notebooks = _series(tmp_path / "nbs")
    (tmp_path / "out").write_text("a file where the output folder should be")
    _fake_papermill(monkeypatch, lambda *a, **k: pytest.fail("nothing may run"))
    stream = io.StringIO()
    _, code = hr.run_series(notebooks, str(tmp_path / "out"), progress=False, stream=stream)
    assert code == 1 and _one_line(stream.getvalue()).startswith("FAILED: cannot write to")


def test_ctrl_c_stops_cleanly_saying_what_finished(tmp_path, monkeypatch):
    notebooks, out = _series(tmp_path / "nbs"), tmp_path / "out"

    def interrupted_in_the_second(source, target, **kwargs):
        if "01_b" in source:
            Path(target).write_text("half")
            raise KeyboardInterrupt
        Path(target).write_text("{}")

    _fake_papermill(monkeypatch, interrupted_in_the_second)
    stream = io.StringIO()
    runs, code = hr.run_series(notebooks, str(out), progress=False, stream=stream)
    assert code == 130 and "interrupted during 01_b.ipynb: finished 00_a.ipynb" in stream.getvalue()
    assert sorted(p.name for p in (out / "executed").iterdir()) == ["00_a.ipynb"]


def test_temp_files_left_by_a_kill_are_removed_on_the_next_run(tmp_path, monkeypatch):
    notebooks, out = _series(tmp_path / "nbs"), tmp_path / "out"
    dead_pid = 2**22 + 12345  # above Linux's pid_max default: no such process
    left = [out / "executed" / f".00_a{hio.TEMP_MARK}{dead_pid}.ipynb", out / "loras" / "cat" /
            f".train_meta{hio.TEMP_MARK}{dead_pid}.json"]
    for p in left:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("half")
    live = out / f".layout{hio.TEMP_MARK}{__import__('os').getpid()}.json"  # a live writer's file stays
    live.write_text("in progress")
    _fake_papermill(monkeypatch, lambda source, target, **k: Path(target).write_text("{}"))
    stream = io.StringIO()
    _, code = hr.run_series(notebooks, str(out), progress=False, stream=stream)
    assert code == 0 and "removed 2 temp file(s)" in stream.getvalue()
    assert not any(p.exists() for p in left) and live.exists()


# ---------------------------------------------------------------------------------------------------------------
# fuzz: random corrupt bytes in every file kind the project reads
# ---------------------------------------------------------------------------------------------------------------
def _mutations(good: bytes, rng: random.Random, count: int) -> list[bytes]:
    out = []
    for i in range(count):
        kind = i % 5
        if kind == 0:
            out.append(good[:rng.randrange(0, max(1, len(good)))])  # truncated
        elif kind == 1:
            b = bytearray(good)
            for _ in range(rng.randint(1, 20)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            out.append(bytes(b))  # bit rot
        elif kind == 2:
            out.append(bytes(rng.randrange(256) for _ in range(rng.randint(0, 300))))  # noise
        elif kind == 3:
            cut = rng.randrange(len(good))
            out.append(good[:cut] + good[cut + rng.randint(1, 50):])  # a hole
        else:
            out.append(good[:rng.randrange(len(good))] + b"\x00" * rng.randint(1, 64))  # zero-filled tail
    return out


def test_fuzz_corrupt_inputs_give_one_line_naming_the_file_and_touch_nothing_else(tmp_path, tiny_models):
    rng = random.Random(14)
    good_dir = tmp_path / "good"
    good_dir.mkdir()
    photo = _photo(good_dir / "photo.png", 64)
    jpeg = good_dir / "photo.jpg"
    Image.open(photo).save(jpeg, quality=90)
    layout = hl.default_layout(["cat", "mug"], 64, 64).save(good_dir / "layout.json")
    config = make_config("tiny", output_dir=str(tmp_path / "cfg"))
    config_file = hio.save_config(config, good_dir / "config.json")
    lora_config = _one_subject(tmp_path / "lora")
    ht.run_training(lora_config, models=tiny_models, stop_after_steps=2, progress=False)
    lora_folder = lora_config.lora_path(lora_config.subjects[0])
    checkpoint_good = (lora_folder / ht.CHECKPOINT_FILE).read_bytes()
    ht.run_training(lora_config, models=tiny_models, progress=False)
    lora_good = (lora_folder / ha.LORA_WEIGHTS_FILE).read_bytes()
    meta = ht.read_meta(lora_folder)
    good_before = _tree_hashes(good_dir)

    bad = tmp_path / "bad"
    bad.mkdir()
    cases = 0

    def check(target: Path, content: bytes, attempt) -> None:
        nonlocal cases
        target.write_bytes(content)
        cases += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                attempt(target)
        except (hd.SubjectDataError, hl.LayoutError, ValueError) as e:
            message = _one_line(str(e))
            assert target.name in message or str(target) in message, message

    for i, content in enumerate(_mutations(photo.read_bytes(), rng, 40) + _mutations(jpeg.read_bytes(), rng, 40)):
        check(bad / f"photo{i}{'.png' if i < 40 else '.jpg'}", content, lambda p: hd.load_photo(p, 32))
    for i, content in enumerate(_mutations(layout.read_bytes(), rng, 40)):
        check(bad / f"layout{i}.json", content, lambda p: hl.load_or_default_layout(p, ["cat", "mug"], 64, 64))
    for i, content in enumerate(_mutations(config_file.read_bytes(), rng, 40)):
        check(bad / f"config{i}.json", content, hio.load_config)
    for i, content in enumerate(_mutations(lora_good, rng, 30)):
        folder = bad / f"lora{i}"
        folder.mkdir()

        def lora_problem(p, folder=folder):
            problem = ht.lora_file_problem(folder, meta, lora_config)
            assert problem is not None or p.read_bytes() == lora_good  # a changed file is never trusted
            if problem:
                raise ValueError(problem)
        check(folder / ha.LORA_WEIGHTS_FILE, content, lora_problem)
    trainer = ht.LoraTrainer(tiny_models, lora_config, "fuzz__training", ht.prepare_training_data(
        tiny_models, lora_config, lora_config.subjects[0]))
    try:
        start = [p.detach().clone() for p in trainer.params]
        config_hash = meta["config_hash"]
        for i, content in enumerate(_mutations(checkpoint_good, rng, 30)):
            target = bad / f"ckpt{i}" / ht.CHECKPOINT_FILE
            target.parent.mkdir()
            target.write_bytes(content)
            cases += 1
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                loaded = ht.load_checkpoint(trainer, target, config_hash)
            if not loaded:  # refused: named in one line, set aside, and the trainer untouched
                assert len(caught) == 1 and str(target) in _one_line(str(caught[0].message))
                assert all(torch_equal(p, s) for p, s in zip(trainer.params, start))
                assert not target.exists() and len(list(target.parent.glob("*.damaged-*"))) <= 1
            else:  # a byte flip inside a float: a valid checkpoint; put the trainer back for the next case
                reset_trainer(trainer, start)
    finally:
        trainer.close()
    assert cases >= 200
    assert _tree_hashes(good_dir) == good_before


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def reset_trainer(trainer, start) -> None:
    import torch

    with torch.no_grad():
        for p, s in zip(trainer.params, start):
            p.copy_(s)
    trainer.step_count, trainer.loss_history = 0, []


def test_a_lora_made_for_another_model_names_the_file(tmp_path, tiny_models):
    import torch
    from safetensors.torch import load_file, save_file

    config = _one_subject(tmp_path)
    ht.run_training(config, models=tiny_models, progress=False)
    lora = config.lora_path(config.subjects[0]) / ha.LORA_WEIGHTS_FILE
    state = load_file(lora)
    state = {k: torch.zeros(v.shape[0], v.shape[1] + 8) if ("lora_A" in k or "lora.down" in k) else v
             for k, v in state.items()}
    save_file(state, str(lora))  # the keys of this UNet, the shapes of a bigger one
    with pytest.raises(ha.MissingLoraError, match=r"pytorch_lora_weights.safetensors cannot be loaded \(its tensor "
                                                  r"shapes do not fit this model") as error:
        ha.load_subject_loras(tiny_models, config)
    _one_line(str(error.value))
    assert "cat" not in ha.adapter_names(tiny_models)


@pytest.mark.parametrize("lora_dir", ["/tmp/elsewhere", "../outside", ""])
def test_a_lora_folder_outside_the_output_folder_is_refused(lora_dir):
    with pytest.raises(ValueError, match="must be a folder inside the output folder"):
        ProjectConfig(subjects=[{"name": "cat", "token": "sks", "class_name": "cat", "lora_dir": lora_dir}])


def test_a_notebook_start_removes_temp_files_a_killed_write_left(tmp_path, capsys):
    dead_pid = 2**22 + 54321
    left = tmp_path / "loras" / "cat" / f".pytorch_lora_weights{hio.TEMP_MARK}{dead_pid}.safetensors"
    left.parent.mkdir(parents=True)
    left.write_bytes(b"half")
    notebook_config("01", {"profile": "tiny", "output_dir": str(tmp_path)})
    assert not left.exists() and "removed 1 temp file(s)" in capsys.readouterr().out


def test_a_notebook_start_removes_temp_folders_a_killed_export_or_build_left(tmp_path, capsys):
    import os

    dead_pid = 2**22 + 54322
    export = tmp_path / "loras" / "cat" / f".pytorch_lora_weights.safetensors{hio.TEMP_MARK}{dead_pid}"
    build = tmp_path / "cache" / f".tiny-sdxl-v1{hio.TEMP_MARK}{dead_pid}" / "unet"
    live = tmp_path / "cache" / f".tiny-sdxl-v1{hio.TEMP_MARK}{os.getpid()}"
    for folder in (export, build, live):
        folder.mkdir(parents=True)
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
    notebook_config("01", {"profile": "tiny", "output_dir": str(tmp_path)})
    assert not export.exists() and not build.parent.exists() and live.exists()
    assert "removed 2 temp file(s)" in capsys.readouterr().out


def test_a_tiny_model_build_and_a_lora_export_leave_no_temp_folder(tiny_config, trained):
    leftovers = [p for p in tiny_config.output_path.rglob(f".*{hio.TEMP_MARK}*")]
    assert leftovers == [] and (tiny_config.cache_path / "tiny-sdxl-v1" / "model_index.json").exists()
