"""The rendered world and the quality gates of the models trained on it (fixed seeds, CPU; thresholds from what was
measured, with a margin: see models/world/MODEL_CARD.md)."""
import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import world
from helpers.world import evaluate as we
from helpers.adapters import generate, load_subject_loras, only_adapter
from helpers.config import PROJECT_ROOT
from helpers.models import load_models
from helpers.notebook import make_config
from helpers.scoring import ClipScorer
from helpers.training import run_training


@pytest.fixture(scope="module")
def world_config(tmp_path_factory):
    return make_config("world", output_dir=str(tmp_path_factory.mktemp("world") / "out"))


@pytest.fixture(scope="module")
def world_models(world_config):
    return load_models(world_config)


@pytest.fixture(scope="module")
def world_scorer(world_config):
    return ClipScorer.for_config(world_config)


@pytest.fixture(scope="module")
def world_cat(world_config, world_models):
    """The world's cat LoRA, trained once for the module (``run_training`` skips it when it is up to date)."""
    config = world_config.replace(subjects=world_config.subjects[:1], train_steps=300)  # the gate's recipe
    return config, run_training(config, models=world_models, progress=False)["cat"]


# -- the world itself ------------------------------------------------------------------------------------------
def test_scenes_are_deterministic_and_captions_name_every_object_left_to_right():
    a, b = world.render_scene(42), world.render_scene(42)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.caption == b.caption
    assert not np.array_equal(np.asarray(a.image), np.asarray(world.render_scene(43).image))
    for seed in range(200):
        scene = world.render_scene(seed)
        assert scene.image.size == (128, 128)
        positions = [scene.caption.find(o.describe()) for o in scene.spec.objects]
        assert -1 not in positions and positions == sorted(positions), scene.caption
        assert world.BACKGROUNDS[scene.spec.background] in scene.caption and f"{scene.spec.light} light" in scene.caption
        xs = [box[0] for box in scene.boxes]
        assert xs == sorted(xs)


def test_the_world_has_what_the_method_needs():
    assert len(world.BACKGROUNDS) >= 4 and len(world.CLASSES) >= 5 and len(world.COLORS) >= 8
    assert {"cat", "mug"} <= set(world.CLASSES) and set(world.PATTERNS) == {"solid", "striped", "dotted"}
    counts = {n: 0 for n in (1, 2, 3)}
    for seed in range(300):
        counts[len(world.sample_spec(random.Random(seed)).objects)] += 1
    assert all(counts.values())


def test_the_personal_subjects_look_never_occurs_in_the_base_data():
    assert {"cat", "mug", "cat2"} <= set(world.PERSONAL_SUBJECTS)
    assert world.PERSONAL_SUBJECTS["cat2"].cls == "cat" and world.PERSONAL_SUBJECTS["cat2"].pattern not in world.PATTERNS
    for seed in range(3000):
        for obj in world.sample_spec(random.Random(seed)).objects:
            assert (obj.cls, obj.color, obj.pattern) not in world.EXCLUDED_LOOKS and obj.mark is None
            assert obj.pattern in world.PATTERNS  # the second cat's checks never occur in base data


def test_the_two_cats_preset_names_both_cats_in_every_scene():
    from helpers.config import PRESETS
    from helpers.prompts import scene_prompt_problem

    config = make_config("world", **PRESETS["two-cats"])
    assert [s.class_name for s in config.subjects] == ["cat", "cat"] and scene_prompt_problem(config) is None
    assert all((PROJECT_ROOT / s.data_dir).is_dir() for s in config.subjects)


def test_marked_views_differ_from_their_scene_only_by_marks_of_any_colour():
    """The decoder's training views: the same scene and caption, marks on some objects, in colours of their own."""
    colours = set()
    for seed in range(40):
        plain, marked = world.render_scene(seed), world.render_scene(seed, marks=True)
        assert plain.caption == marked.caption and plain.boxes == marked.boxes
        for a, b in zip(plain.spec.objects, marked.spec.objects):
            assert dataclasses.replace(b, mark=None, mark_color=None) == a and b.mark_color != a.color
            colours.add(b.mark_color)
        changed = np.any(np.asarray(plain.image) != np.asarray(marked.image), axis=-1)
        inside_a_marked_box = np.zeros_like(changed)
        for o in marked.spec.objects:
            if o.mark:
                x0, y0, x1, y1 = o.box()
                inside_a_marked_box[max(y0 - 2, 0):y1 + 2, max(x0 - 2, 0):x1 + 2] = True  # 2 px: the downsampling
        assert changed.any() == inside_a_marked_box.any() and not (changed & ~inside_a_marked_box).any()
    assert len(colours - {None}) >= 6


def test_the_shipped_subject_photos_are_the_renderers():
    for subject in world.PERSONAL_SUBJECTS.values():
        specs = world.subject_photo_specs(subject)
        assert 4 <= len(specs) <= 6 and len({s.background for s in specs}) >= 3
        for i, spec in enumerate(specs):
            shipped = np.asarray(Image.open(PROJECT_ROOT / "data" / "world" / subject.name / f"{subject.name}_{i}.png"))
            assert np.array_equal(shipped, np.asarray(world.render(spec)))
            mask = Image.open(PROJECT_ROOT / "data" / "world" / subject.name / f"{subject.name}_{i}.mask.png")
            assert np.array_equal(np.asarray(mask), np.asarray(world.subject_mask(spec)))
            x0, y0, x1, y1 = spec.objects[0].box()
            inside = np.asarray(mask)[max(y0, 0):y1, max(x0, 0):x1] > 0
            assert inside.mean() > 0.3 and (np.asarray(mask) > 0).sum() <= inside.sum() * 1.2  # on the subject


def test_every_caption_word_is_known_to_the_real_clip_tokenizer(world_models):
    tokenizer = world_models.txt2img.tokenizer
    assert len(tokenizer) == 49408
    for word in world.vocabulary():
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert ids and tokenizer.decode(ids).strip() == word


# -- the models ------------------------------------------------------------------------------------------------
def test_world_loads_like_a_local_sdxl(world_config, world_models):
    assert world_models.source.endswith("models/world/pipeline")
    assert type(world_models.txt2img).__name__ == "StableDiffusionXLPipeline"
    assert world_models.inpaint.unet is world_models.unet
    assert world_models.unet.config.addition_embed_type == "text_time"
    assert len(world_models.vae.config.block_out_channels) == 4  # 8x down: 16x16 latents at 128 px


def test_gate_scorer_zero_shot_on_held_out_objects(world_scorer):
    accuracy = we.scorer_accuracy(world_scorer, n=200)
    print({k: str(v) for k, v in accuracy.items()})
    assert accuracy["class"].rate >= 0.95 and accuracy["color"].rate >= 0.90
    assert accuracy["class_located"].rate >= 0.90  # the object located in the whole picture, then named


def test_gate_generator_draws_the_prompted_class_and_colour(world_config, world_models, world_scorer):
    accuracy = we.generator_accuracy(world_models, world_config, world_scorer, n=64)
    print({k: str(v) for k, v in accuracy.items()})
    assert accuracy["class"].rate >= 0.85 and accuracy["color"].rate >= 0.75


def test_the_inpainting_measure_confirms_rendered_truth(world_config, world_scorer, capsys):
    """The scorer names the object located on a region's own pixels (the inpainting gate's measure, and class
    presence everywhere) on the gate's own cases with an object of the class rendered in the region (a green object
    on grass or a black one under the night sky cannot be located)."""
    truth = we.inpaint_measure_on_truth(world_config, world_scorer, seeds=16)
    with capsys.disabled():
        print(f"\ninpainting measure on rendered truth: {truth['all']}")
    assert truth["all"].rate >= 0.90 and min(a.rate for a in truth.values()) >= 0.85, truth


def test_the_inpainting_measure_confirms_truth_as_the_vae_decodes_it(world_config, world_models, world_scorer,
                                                                     capsys):
    """The same cases sent through the world's VAE first: the look of every generated picture. The scorer trained
    on renders alone named 85.0 % here (93.8 % clean): it judged generated pixels worse than renders, so it now
    trains on decoded views too (MODEL_CARD)."""
    truth = we.inpaint_measure_on_truth(world_config, world_scorer, seeds=16, decoded_by=world_models)
    with capsys.disabled():
        print(f"\ninpainting measure on VAE-decoded truth: {truth['all']}")
    assert truth["all"].rate >= 0.90 and min(a.rate for a in truth.values()) >= 0.85, truth


def test_gate_base_model_inpaints_the_prompted_class_into_an_empty_region(world_config, world_models, world_scorer,
                                                                         capsys):
    """What the method asks of SDXL, asked of the world's base model: "a {class} {setting}" into an empty region
    (5 classes x 3 region widths x 8 seeds), named as that class on the region's own pixels in >= 85 %, with the
    project's own inpainting settings for painting a whole object (strength 1.0, RePaint resampling, region
    attention). The method's subject passes keep 0.85 and neither setting: they start from Phase 0's scene, and with
    the subject LoRAs the two settings did not pay (README); at those settings the base model reads ~50 %."""
    config = world_config.replace(inpaint_strength=1.0, inpaint_resample=5, region_attention=4.0)
    accuracy = we.inpaint_accuracy(world_models, config, world_scorer, seeds=8)
    with capsys.disabled():
        print(f"\nbase-model inpainting gate: {({k: str(v) for k, v in accuracy.items()})}")
    assert accuracy["all"].rate >= 0.85 and min(a.rate for a in accuracy.values()) >= 0.75, accuracy


def test_faded_on_truth_holds_the_subjects_as_rendered_and_reports_them_as_a_pass_decodes_them(
        world_config, world_models, world_scorer, capsys):
    """The report's "faded" on rendered truth: never on the subjects as rendered; through the VAE as a pass paints
    them the cat stays (0 of 60 scenes) and the mug does not (43 %: the VAE never draws its heart back,
    ``test_marks_kept_...``; the README's verdict explains the mug's faded rate by it)."""
    faded = we.faded_on_truth(world_models, world_config, world_scorer, scenes=12)
    with capsys.disabled():
        print(f"\nfaded on truth: { {k: round(v['faded'], 3) for k, v in faded.items()} }")
    assert set(faded) == {f"{kind} {name}" for kind in ("rendered", "decoded as a pass") for name in ("cat", "mug")}
    assert faded["rendered cat"]["faded"] == faded["rendered mug"]["faded"] == 0.0
    assert faded["decoded as a pass cat"]["faded"] <= 0.1
    for name in ("cat", "mug"):  # the VAE takes something of every subject's identity, never adds to it
        assert faded[f"decoded as a pass {name}"]["identity"] < faded[f"rendered {name}"]["identity"]


def test_marks_kept_reads_one_for_a_perfect_pass_and_less_through_the_vae(world_config, world_models, monkeypatch,
                                                                           capsys):
    """The measure on truth: a pass that returns its region untouched keeps every mark; the world's VAE does not
    (it never saw a mark: no base scene has one; the README's verdict explains the faded mug by it)."""
    import helpers.pipeline

    shipped = we.marks_kept_on_truth(world_models, world_config, scenes=6)
    with capsys.disabled():
        print(f"\nmarks kept through a pass's VAE round trip: { {k: round(v, 3) for k, v in shipped.items()} }")
    assert set(shipped) == {"cat", "mug"} and all(-1.0 < v < 0.9 for v in shipped.values())
    monkeypatch.setattr(helpers.pipeline, "region_round_trip", lambda models, config, image, masks_, name: image)
    assert we.marks_kept_on_truth(world_models, world_config, scenes=6) == {"cat": 1.0, "mug": 1.0}


def test_gate_vae_reconstructs_held_out_renders(world_models):
    assert we.vae_psnr(world_models, n=32) >= 24.0


def test_same_seed_same_world_image(world_config, world_models):
    first = generate(world_models, world_config, "a red ball on grass", seed=3)
    assert np.array_equal(np.asarray(first), np.asarray(generate(world_models, world_config, "a red ball on grass", 3)))
    assert not np.array_equal(np.asarray(first), np.asarray(generate(world_models, world_config, "a red ball on grass",
                                                                        4)))


def test_gate_a_subject_lora_learns_the_subjects_look(world_cat, world_models, world_scorer, capsys):
    config, report = world_cat
    assert report.steps_done == config.train_steps
    load_subject_loras(world_models, config)
    base = [world_scorer.identity(generate(world_models, config, "a photo of a cat", s), "cat") for s in range(8)]
    tuned = [world_scorer.identity(generate(world_models, config, "a photo of sks cat", s, adapter="cat"), "cat")
             for s in range(8)]
    with capsys.disabled():
        print(f"\nLoRA gate: identity base {np.mean(base):.3f}, with the cat's LoRA {np.mean(tuned):.3f} "
              f"(trained {report.steps_done} steps in {report.seconds:.1f} s)")
    assert np.mean(tuned) - np.mean(base) >= 0.25
    assert sum(t > b for t, b in zip(tuned, base)) >= 6


def test_the_training_command_runs_end_to_end_and_its_output_loads_like_the_shipped_models(tmp_path):
    """The trainer at toy size on the CPU: every stage, then the results load the way the world profile loads."""
    import open_clip

    from helpers.world import train as world_train
    from helpers.profiles import load_pipeline_folder

    out = tmp_path / "trained"
    assert world_train.main(["--out", str(out), "--scenes", "96", "--vae-steps", "2", "--unet-steps", "2",
                             "--unet-continue-steps", "1", "--scorer-steps", "2", "--batch", "8", "--unet-batch", "8",
                             "--workers", "1", "--inpaint-pairs", "0.5"]) == 0
    pipe = load_pipeline_folder(out / "pipeline", torch_dtype := __import__("torch").float32)
    assert pipe.unet.config.addition_embed_type == "text_time" and pipe.vae.dtype == torch_dtype
    assert pipe.config.force_zeros_for_empty_prompt is False  # an empty negative prompt is encoded, as in training
    open_clip.add_model_config(out / "scorer" / "world-clip.json")
    model, _, _ = open_clip.create_model_and_transforms("world-clip",
                                                        pretrained=str(out / "scorer" / "world-clip.safetensors"))
    assert sum(p.numel() for p in model.parameters()) > 1e6
    report = __import__("json").loads((out / "training_report.json").read_text())
    assert {"data", "vae", "unet", "scorer"} <= set(report) and report["unet"]["continued_steps"] == 1
    assert report["unet"]["inpaint_pairs"] == 0.5 and report["scorer"]["decoded"] is True

    before = torch.load(out / "vae.pt", weights_only=False)
    assert world_train.main(["--out", str(out), "--stages", "decoder", "--decoder-steps", "2", "--decoder-batch", "4",
                             "--scenes", "24", "--closeups", "8", "--workers", "1"]) == 0
    after = torch.load(out / "vae.pt", weights_only=False)
    frozen = [k for k in before["vae"] if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(before["vae"][k], after["vae"][k]) for k in frozen)
    assert not torch.equal(before["vae"]["decoder.conv_out.weight"], after["vae"]["decoder.conv_out.weight"])
    assert torch.equal(before["latents"], after["latents"])  # what the UNet and LoRAs learned from stays true
    decoded = load_pipeline_folder(out / "pipeline", torch.float32).vae.state_dict()["decoder.conv_out.weight"]
    assert torch.allclose(decoded, after["vae"]["decoder.conv_out.weight"], atol=1e-3)
    assert json.loads((out / "training_report.json").read_text())["decoder"]["steps"] == 2


def test_the_decoder_stage_without_a_trained_vae_says_what_to_run(tmp_path):
    from helpers.world import train as world_train

    with pytest.raises(SystemExit, match="run the vae stage .* or pass --vae-from"):
        world_train.main(["--out", str(tmp_path), "--stages", "decoder", "--workers", "1"])


def test_an_inpainting_pair_is_its_scene_with_one_object_left_out():
    """The trainer's pairs: the emptied scene differs from the scene only inside the removed object's box."""
    from helpers.world import train as world_train

    images, _, boxes, _, emptied, removed = world_train._render_chunk(range(12), pairs=True)
    assert len(emptied) == len(removed) == 12
    for image, empty, box, gone in zip(images, emptied, boxes, removed):
        assert gone in box
        x0, y0, x1, y1 = (max(v, 0) for v in gone)
        outside = np.ones(image.shape[:2], bool)
        outside[y0:y1 + 1, x0:x1 + 1] = False
        changed = np.abs(image.astype(int) - empty.astype(int)).max(axis=-1) > 8
        assert changed[~outside].any() and not (changed & outside).mean() > 0.01


def test_a_closeup_shows_one_object_at_a_regions_scale_and_names_it():
    for seed in range(20):
        scene = world.render_closeup(seed)
        sizes = [o.size for o in scene.spec.objects]
        assert scene.image.size == (world.SIZE, world.SIZE) and sizes
        assert max(sizes) >= world.CLOSEUP_FILL[0] - 1e-6  # the object it was cropped around fills the picture
        assert all(o.cls in scene.caption for o in scene.spec.objects)



# -- any diffusers user, and LoRAs in and out ---------------------------------------------------------------------
def test_the_world_pipeline_runs_in_plain_diffusers_with_a_world_lora(world_cat):
    """No project code and no torch_dtype: what a diffusers user types."""
    from diffusers import StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline

    from helpers.profiles import WORLD_DIR

    config, report = world_cat
    pipe = StableDiffusionXLPipeline.from_pretrained(WORLD_DIR / "pipeline")
    assert {getattr(pipe, k).dtype for k in ("unet", "vae", "text_encoder", "text_encoder_2")} == {torch.float32}
    pipe.load_lora_weights(str(config.lora_path(config.subjects[0])), weight_name="pytorch_lora_weights.safetensors",
                           adapter_name="cat")
    image = pipe("a photo of sks cat", num_inference_steps=4, height=128, width=128).images[0]
    inpaint = StableDiffusionXLInpaintPipeline.from_pipe(pipe)
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (32, 32, 96, 96))
    painted = inpaint("a photo of sks cat", image=image, mask_image=mask, strength=0.85, num_inference_steps=4,
                      height=128, width=128).images[0]
    assert image.size == painted.size == (128, 128)
    assert np.asarray(painted).std() > 1 and not np.array_equal(np.asarray(painted), np.asarray(image))
    half = StableDiffusionXLPipeline.from_pretrained(WORLD_DIR / "pipeline", torch_dtype=torch.float16)
    assert {getattr(half, k).dtype for k in ("unet", "vae", "text_encoder", "text_encoder_2")} == {torch.float16}


def unet_output(models, adapter: str | None) -> torch.Tensor:
    unet = models.unet
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=generator)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    extra = {"text_embeds": torch.randn(1, pooled, generator=generator), "time_ids": torch.zeros(1, 6)}
    with torch.no_grad(), only_adapter(models, adapter):
        return unet(x.to(unet.dtype), torch.tensor([400]), text.to(unet.dtype),
                    added_cond_kwargs={k: v.to(unet.dtype) for k, v in extra.items()}).sample.float()


def test_the_kohya_export_loads_back_as_a_subjects_lora_file_with_the_same_outputs(world_cat, world_config):
    from safetensors import safe_open

    from helpers.training import kohya_path

    config, _ = world_cat
    subject = config.subjects[0]
    kohya = kohya_path(config.lora_path(subject), subject)
    with safe_open(str(kohya), framework="pt") as f:
        assert f.metadata()["modelspec.trigger_phrase"] == "sks cat"
        assert all(k.startswith("lora_unet_") for k in f.keys())
    trained = load_models(config)
    load_subject_loras(trained, config)
    given = world_config.replace(subjects=[dataclasses.replace(subject, lora_file=str(kohya), lora_dir="loras/given")])
    models = load_models(given)
    reports = run_training(given, models=models, progress=False)
    assert reports["cat"].status == "provided" and "uses its own LoRA cat_kohya.safetensors" in reports["cat"].message
    load_subject_loras(models, given)
    original, loaded = unet_output(trained, "cat"), unet_output(models, "cat")
    assert torch.allclose(original, loaded, atol=1e-3), (original - loaded).abs().max()
    assert not torch.allclose(loaded, unet_output(models, None), atol=1e-3)  # and the LoRA does something


def test_a_lora_made_for_another_base_model_is_refused_in_one_line(world_config, tmp_path):
    import warnings

    from helpers.adapters import LoraFileError, adapter_names

    tiny = make_config("tiny", output_dir=str(tmp_path / "tiny"), train_steps=2, checkpoint_every=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_training(tiny.replace(subjects=tiny.subjects[:1]), progress=False)
    foreign = tiny.lora_path(tiny.subjects[0]) / "pytorch_lora_weights.safetensors"
    given = world_config.replace(subjects=[dataclasses.replace(world_config.subjects[0], lora_file=str(foreign),
                                                               lora_dir="loras/foreign")])
    models = load_models(given)
    with pytest.raises(LoraFileError, match=r"subject 'cat': .*pytorch_lora_weights.safetensors cannot be loaded") \
            as error:
        run_training(given, models=models, progress=False)
    assert "\n" not in str(error.value)
    assert adapter_names(models) == []  # nothing half-loaded stays
    assert not (given.lora_path(given.subjects[0]) / "train_meta.json").exists()


def test_the_mirror_check_tells_the_mugs_one_way_stripes_from_the_cats(world_config, world_scorer):
    """Rendered truth: the mug's stripes run one diagonal (mirrored, the other), the cats' coats look the same either
    way; the check's verdicts follow, with the mug far below the tolerance and the cats within it."""
    from helpers.config import WORLD_TWO_CATS
    from helpers.data import load_subject_photos
    from helpers.scoring import MIRROR_TOLERANCE, mirror_check

    cat2 = WORLD_TWO_CATS[1]
    references = {**world_scorer.references, "cat2": load_subject_photos(world_config, cat2, min_size=64),
                  "one photo": world_scorer.references["cat"][:1]}
    scorer = ClipScorer(world_scorer.model, world_scorer.preprocess, world_scorer.tokenizer, references,
                        world_scorer.device, world_scorer.name)  # the module's scorer keeps its two subjects
    checks = {name: mirror_check(scorer, name) for name in ("cat", "mug", "cat2")}
    print({name: (round(c.own, 3), round(c.mirrored, 3)) for name, c in checks.items()})
    assert not checks["mug"].looks_the_same_mirrored
    assert checks["mug"].own - checks["mug"].mirrored > 3 * MIRROR_TOLERANCE
    assert checks["cat"].looks_the_same_mirrored and checks["cat2"].looks_the_same_mirrored
    with pytest.raises(ValueError, match="it needs two or more"):
        mirror_check(scorer, "one photo")


def test_helpers_mirror_check_prints_one_advice_per_subject(capsys):
    from helpers.run import main

    assert main(["mirror-check", "--profile", "world", "--device", "cpu"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| cat ", "| mug "))]
    assert [row.split("|")[4].strip().split(":")[0] for row in rows] == ["yes", "no"]
