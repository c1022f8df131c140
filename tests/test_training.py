import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import training as ht
from helpers.adapters import LORA_WEIGHTS_FILE, active_adapters, only_adapter
from helpers.io import atomic_path
from helpers.notebook import make_config
from helpers.training import CHECKPOINT_FILE, META_FILE, run_training


def _unet_output(models, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    embeds = torch.randn(1, 77, 64, generator=g)
    cond = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return models.unet(sample, torch.tensor([500]), embeds, added_cond_kwargs=cond).sample


def _config(tmp_path, **kw):
    return make_config("tiny", output_dir=str(tmp_path / "out"), **{"train_steps": 6, "checkpoint_every": 2, **kw})


def test_written_lora_loads_and_changes_the_unet(tiny_config, tiny_models, trained):
    for name, report in trained.items():
        assert report.steps_done == 6 and len(report.loss_history) == 6
        folder = tiny_config.lora_path(tiny_config.subject(name))
        meta = json.loads((folder / META_FILE).read_text())
        assert meta["config_hash"] and meta["versions"]["diffusers"] and meta["steps_done"] == 6
        assert not (folder / CHECKPOINT_FILE).exists()
        keys = load_file(folder / LORA_WEIGHTS_FILE)
        assert keys and all(k.startswith("unet.") for k in keys)  # diffusers format
    with only_adapter(tiny_models, None):
        base = _unet_output(tiny_models)
    with only_adapter(tiny_models, "cat"):
        assert active_adapters(tiny_models) == ["cat"]
        cat = _unet_output(tiny_models)
    with only_adapter(tiny_models, "mug"):
        assert active_adapters(tiny_models) == ["mug"]
        mug = _unet_output(tiny_models)
    assert not torch.allclose(base, cat) and not torch.allclose(base, mug) and not torch.allclose(cat, mug)
    tiny_models.txt2img.set_adapters(["cat"])  # the plain diffusers switch works the same
    assert torch.equal(_unet_output(tiny_models), cat)
    tiny_models.txt2img.set_adapters(["mug"])
    assert torch.equal(_unet_output(tiny_models), mug)


def test_second_run_skips_without_loading_a_model_or_taking_a_step(tiny_config, trained, capsys, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("an up-to-date LoRA must not load models or train")

    monkeypatch.setattr(ht, "load_models", forbidden)
    monkeypatch.setattr(ht.LoraTrainer, "step", forbidden)
    reports = run_training(tiny_config, progress=False)
    assert {r.status for r in reports.values()} == {"skipped"}
    assert "up to date" in capsys.readouterr().out


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, tiny_models):
    single = _config(tmp_path / "a")
    one = run_training(single.replace(subjects=single.subjects[:1]), models=tiny_models, progress=False)
    resumed_cfg = _config(tmp_path / "b")
    resumed_cfg = resumed_cfg.replace(subjects=resumed_cfg.subjects[:1])
    first = run_training(resumed_cfg, models=tiny_models, stop_after_steps=3, progress=False)
    assert first["cat"].status == "interrupted" and first["cat"].steps_done == 3
    assert (resumed_cfg.lora_path(resumed_cfg.subjects[0]) / CHECKPOINT_FILE).exists()
    second = run_training(resumed_cfg, models=tiny_models, progress=False)
    assert second["cat"].status == "resumed" and second["cat"].steps_done == 6
    a = load_file(single.lora_path(single.subjects[0]) / LORA_WEIGHTS_FILE)
    b = load_file(resumed_cfg.lora_path(resumed_cfg.subjects[0]) / LORA_WEIGHTS_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert one["cat"].loss_history == second["cat"].loss_history


def test_corrupt_checkpoint_is_never_loaded(tmp_path, tiny_models):
    config = _config(tmp_path)
    config = config.replace(subjects=config.subjects[:1])
    folder = config.lora_path(config.subjects[0])
    folder.mkdir(parents=True)
    (folder / CHECKPOINT_FILE).write_bytes(b"garbage that is not safetensors")
    with pytest.warns(UserWarning, match="damaged training checkpoint.*kept as checkpoint.safetensors.damaged-"):
        report = run_training(config, models=tiny_models, progress=False)["cat"]
    assert report.status == "trained" and report.steps_done == 6
    kept = list(folder.glob(f"{CHECKPOINT_FILE}.damaged-*"))  # set aside, never deleted
    assert len(kept) == 1 and kept[0].read_bytes() == b"garbage that is not safetensors"


def test_a_checkpoint_write_killed_halfway_leaves_the_previous_checkpoint_intact(tmp_path, tiny_models, monkeypatch):
    config = _config(tmp_path).replace(train_steps=6, checkpoint_every=2)
    config = config.replace(subjects=config.subjects[:1])
    run_training(config, models=tiny_models, stop_after_steps=2, progress=False)
    checkpoint = config.lora_path(config.subjects[0]) / CHECKPOINT_FILE
    before = checkpoint.read_bytes()
    real_save = ht.save_safetensors_atomic

    def dies_halfway(tensors, path, metadata=None):
        with atomic_path(path) as partial:  # the project's write path, cut off inside it
            real_save(tensors, partial, metadata)
            with open(partial, "r+b") as f:  # the write got this far when the process died
                f.truncate(len(before) // 2)
            raise KeyboardInterrupt

    monkeypatch.setattr(ht, "save_safetensors_atomic", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        run_training(config, models=tiny_models, progress=False)
    assert checkpoint.read_bytes() == before  # the completed checkpoint of step 2 is still there, whole
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == [CHECKPOINT_FILE]  # and no half file beside it
    monkeypatch.setattr(ht, "save_safetensors_atomic", real_save)
    report = run_training(config, models=tiny_models, progress=False)["cat"]
    assert report.status == "resumed" and report.steps_done == 6


def test_changed_config_retrains_and_force_always_does(tmp_path, tiny_models, capsys):
    config = _config(tmp_path)
    config = config.replace(subjects=config.subjects[:1])
    run_training(config, models=tiny_models, progress=False)
    changed = run_training(config.replace(lora_rank=2), models=tiny_models, progress=False)["cat"]
    assert changed.status == "trained" and "settings.lora_rank" in changed.message
    assert run_training(config.replace(lora_rank=2), progress=False)["cat"].status == "skipped"
    assert run_training(config.replace(lora_rank=2), models=tiny_models, force=True,
                        progress=False)["cat"].status == "trained"


def test_changed_photos_retrain(tmp_path, tiny_models, demo_photos):
    from PIL import Image
    config = _config(tmp_path)
    subject = config.subjects[0]
    subject = type(subject)(subject.name, subject.token, subject.class_name, str(demo_photos / "cat"),
                            subject.lora_dir)
    config = config.replace(subjects=[subject])
    run_training(config, models=tiny_models, progress=False)
    Image.open(demo_photos / "cat" / "cat_0.jpg").transpose(Image.FLIP_TOP_BOTTOM).save(demo_photos / "cat" / "x.jpg")
    report = run_training(config, models=tiny_models, progress=False)["cat"]
    assert report.status == "trained" and "photos.x.jpg" in report.message


def test_prior_preservation_caches_class_images(tmp_path, tiny_models):
    config = _config(tmp_path, prior_preservation=True, num_class_images=2, train_steps=2)
    config = config.replace(subjects=config.subjects[:1])
    assert run_training(config, models=tiny_models, progress=False)["cat"].steps_done == 2
    cached = list((config.cache_path / "class_images").rglob("*.png"))
    assert len(cached) == 2


def test_gradient_checkpointing_is_chosen_from_free_memory():
    sdxl = dict(device_type="cuda", unet_params=2.5675e9, resolution=1024, batch=1)
    on, why = ht.checkpointing_choice("auto", free_gib=22.0, **sdxl)  # an L4 (24 GB): the faster setting fits
    assert on is False and "off" in why
    on, why = ht.checkpointing_choice("auto", free_gib=12.0, **sdxl)  # a 16 GB card after the model: it does not
    assert on is True and "only 12.0 GiB free" in why
    assert ht.checkpointing_choice("auto", free_gib=12.0, **{**sdxl, "resolution": 512})[0] is False
    assert ht.checkpointing_choice("on", free_gib=80.0, **sdxl)[0] is True
    assert ht.checkpointing_choice("off", free_gib=1.0, **sdxl)[0] is False
    assert ht.checkpointing_choice("auto", **{**sdxl, "device_type": "cpu"}, free_gib=None)[0] is False


def test_expected_duration_is_an_sdxl_estimate_scaled_by_card_and_labelled_so():
    line = ht.expected_duration("sdxl", "NVIDIA L4", False, 500, 1)
    assert line.startswith("expected ~20 min for 500 steps on this L4") and "estimate" in line
    assert "~6 min" in ht.expected_duration("sdxl", "NVIDIA H100 80GB HBM3", True, 500, 1)
    assert ht.expected_duration("world", "NVIDIA L4", False, 500, 1) is None  # no measured basis: says nothing
    assert ht.expected_duration("sdxl", "Some Other GPU", False, 500, 1) is None


def _unet_with(models, adapter):
    unet = models.unet
    generator = torch.Generator().manual_seed(0)
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    args = (torch.randn(1, 4, 8, 8, generator=generator), torch.tensor([400]),
            torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator))
    extra = {"text_embeds": torch.randn(1, pooled, generator=generator), "time_ids": torch.zeros(1, 6)}
    with torch.no_grad(), only_adapter(models, adapter):
        return unet(*args, added_cond_kwargs=extra).sample


def test_kohya_files_load_as_a_subjects_lora_file_with_the_adapters_outputs(tiny_config, tiny_models, trained,
                                                                             tmp_path):
    """The export of a trained LoRA, and a peer's LoRA converted with diffusers' own utilities in the test, each
    given as ``lora_file``: the UNet computes what the original adapter computes."""
    import dataclasses

    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
    from safetensors.torch import save_file

    from helpers.adapters import load_subject_loras
    from helpers.models import load_models

    cat, mug = tiny_config.subject("cat"), tiny_config.subject("mug")
    exported = ht.kohya_path(tiny_config.lora_path(cat), cat)
    peer = tmp_path / "mug_converted.safetensors"
    save_file(convert_state_dict_to_kohya(convert_all_state_dict_to_peft(
        load_file(str(tiny_config.lora_path(mug) / LORA_WEIGHTS_FILE)))), str(peer))
    given = tiny_config.replace(output_dir=str(tmp_path / "out"), subjects=[
        dataclasses.replace(cat, lora_file=str(exported)), dataclasses.replace(mug, lora_file=str(peer))])
    models = load_models(given)
    reports = run_training(given, models=models, progress=False)
    assert {r.status for r in reports.values()} == {"provided"}
    assert json.loads((given.lora_path(cat) / META_FILE).read_text())["source"] == str(exported)
    with pytest.MonkeyPatch.context() as patch:  # checked once: a second run loads no model for them
        patch.setattr(ht, "load_models", lambda *a, **k: pytest.fail("models loaded for recorded LoRA files"))
        assert {r.status for r in run_training(given, progress=False).values()} == {"provided"}
    load_subject_loras(models, given)
    for name in ("cat", "mug"):
        assert torch.allclose(_unet_with(models, name), _unet_with(tiny_models, name), atol=1e-5), name
    assert not torch.allclose(_unet_with(models, "cat"), _unet_with(models, None), atol=1e-5)


def test_masks_weight_the_loss_towards_the_subject_and_enter_the_fingerprint_only_when_used(tmp_path, tiny_models,
                                                                                            demo_photos):
    from PIL import Image

    from helpers.data import subject_photo_paths

    config = _config(tmp_path, train_steps=2)
    subject = config.subjects[0]
    subject = type(subject)(subject.name, subject.token, subject.class_name, str(demo_photos / "cat"),
                            subject.lora_dir)
    config = config.replace(subjects=[subject])
    unmasked = ht.training_fingerprint(config, subject, "tiny")
    for photo in subject_photo_paths(demo_photos / "cat", "cat"):
        with Image.open(photo) as im:
            mask = Image.new("L", im.size, 0)
        mask.paste(255, (0, 0, mask.width // 2, mask.height))  # the left half is "the subject"
        mask.save(photo.with_name(photo.stem + ".mask.png"))
    assert ht.training_fingerprint(config, subject, "tiny") == unmasked  # weight 1: masks unused, LoRAs stay current
    weighted = config.replace(mask_background_weight=0.2)
    assert set(ht.training_fingerprint(weighted, subject, "tiny")) - set(unmasked) == {"masks",
                                                                                        "mask_background_weight"}
    data = ht.prepare_training_data(tiny_models, weighted, subject)
    weights = data.loss_weights
    assert weights.shape == (data.latents.shape[0], 1, *data.latents.shape[-2:])
    assert weights.min() == pytest.approx(0.2) and weights.max() == pytest.approx(1.0)
    assert ht.prepare_training_data(tiny_models, config, subject).loss_weights is None
    assert run_training(weighted, models=tiny_models, progress=False)["cat"].steps_done == 2


def test_flips_enter_the_fingerprint_only_when_off(tmp_path):
    config = _config(tmp_path)
    flipped, unflipped = (ht.training_fingerprint(config.replace(random_flip=flip), config.subjects[0], "tiny")
                          for flip in (True, False))
    assert set(unflipped) - set(flipped) == {"random_flip"}  # LoRAs trained with flips stay current
    assert flipped["settings"] == unflipped["settings"]
    # a subject's own choice overrides the config's, both ways
    cat = config.subjects[0]
    for flip in (True, False):
        for mirror in (True, False):
            subject = dataclasses.replace(cat, mirror=mirror)
            fingerprint = ht.training_fingerprint(config.replace(random_flip=flip), subject, "tiny")
            assert fingerprint == (flipped if mirror else unflipped)


def test_a_subjects_mirror_choice_is_read_from_a_notebook_parameter(tmp_path):
    from helpers.config import subject_from

    given = dict(name="toy", token="qwe", class_name="toy")
    assert subject_from(given).mirror is None
    assert subject_from({**given, "mirror": True}).mirrors_views(False)
    assert not subject_from({**given, "mirror": False}).mirrors_views(True)
    with pytest.raises(ValueError, match="mirror must be true, false or absent"):
        subject_from({**given, "mirror": "yes"})
    subjects = [{**given, "mirror": True}, dict(given, name="mug", token="zwx")]
    config = make_config("tiny", output_dir=str(tmp_path), subjects=subjects)
    assert "subjects: toy (qwe toy, mirrored views), mug (zwx toy)\n" in config.summary()
    assert config.from_json(config.to_json()).subjects == config.subjects  # the saved config keeps the choice


def test_subject_loss_weights_follow_the_mask():
    from PIL import Image

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    weights = ht.subject_loss_weights([mask], 8, 0.1)
    assert torch.allclose(weights[0, 0, :, :4], torch.ones(8, 4))
    assert torch.allclose(weights[0, 0, :, 4:], torch.full((8, 4), 0.1))
