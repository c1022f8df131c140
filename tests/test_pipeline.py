from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import adapters as ha
from helpers import pipeline as hp
from helpers.evaluation import outside_mask_max_diff
from helpers.layout import Layout, Region, default_layout, masks


@pytest.fixture(scope="module")
def layout(tiny_config):
    return default_layout(tiny_config.subject_names, 64, 64)


@pytest.fixture(scope="module")
def result(tiny_models, tiny_config, trained, layout):
    return hp.coarse_to_fine(tiny_models, tiny_config, layout, seed=11)


def test_outside_all_masks_equals_the_coarse_scene_exactly(result):
    coarse, final = np.asarray(result.coarse), np.asarray(result.final)
    outside_support = ~np.logical_or.reduce(list(result.masks.support.values()))
    assert np.array_equal(coarse[outside_support], final[outside_support])
    assert outside_mask_max_diff(result.final, result.coarse, result.masks) == 0
    assert not np.array_equal(coarse, final)  # and the subjects' regions did change


def test_the_unet_sees_no_adapter_in_phase0_then_only_each_subjects_own(tiny_models, tiny_config, layout, unet_spy):
    # passes one after another (the batched call is observed layer by layer in the tests further down)
    again = hp.coarse_to_fine(tiny_models, tiny_config.replace(batch_subject_passes="off"), layout, seed=11)
    assert unet_spy.runs() == [(), ("cat",), ("mug",)]
    assert unet_spy.calls.count(()) == tiny_config.steps  # the whole of Phase 0 ran with every LoRA off
    assert [p.active_adapters for p in again.passes] == [["cat"], ["mug"]]  # and the record says the same


def test_only_the_subjects_own_adapter_is_active_and_other_regions_untouched(result):
    coarse, after_cat, after_mug = (np.asarray(im) for im in (result.coarse, *result.stages))
    mug_region, cat_region = result.masks.support["mug"], result.masks.support["cat"]
    assert np.array_equal(after_cat[mug_region], coarse[mug_region])  # the cat pass never touches the mug region
    assert np.array_equal(after_mug[cat_region], after_cat[cat_region])  # nor the mug pass the cat's
    assert not np.array_equal(after_cat[cat_region], coarse[cat_region])


def test_phase0_runs_with_every_lora_disabled_and_the_baseline_with_all(tiny_models, tiny_config, trained, unet_spy):
    hp.generate_scene(tiny_models, tiny_config, "a scene", 0)
    hp.one_pass_baseline(tiny_models, tiny_config, seed=0)
    assert unet_spy.runs() == [(), ("cat", "mug")]


def test_same_seed_same_images(tiny_models, tiny_config, trained, layout, result):
    again = hp.coarse_to_fine(tiny_models, tiny_config, layout, seed=11)
    assert np.array_equal(np.asarray(again.final), np.asarray(result.final))
    assert np.array_equal(np.asarray(again.coarse), np.asarray(result.coarse))
    other = hp.coarse_to_fine(tiny_models, tiny_config, layout, seed=12)
    assert not np.array_equal(np.asarray(other.coarse), np.asarray(result.coarse))


def test_result_saves_and_loads(tmp_path, result, tiny_config):
    result.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"coarse.png", "composite.png", "result.json",
                                                     "stage_1_cat.png", "stage_2_mug.png"}
    loaded = hp.GenerationResult.load(tmp_path, tiny_config.effective_feather_px)
    assert np.array_equal(np.asarray(loaded.final), np.asarray(result.final))
    assert loaded.passes == result.passes and loaded.layout == result.layout
    with pytest.raises(FileNotFoundError, match="notebooks/03"):
        hp.GenerationResult.load(tmp_path / "nothing", 2)


def test_missing_lora_names_subject_and_notebook(tmp_path, tiny_models, tiny_config):
    config = tiny_config.replace(output_dir=str(tmp_path), subjects=[tiny_config.subjects[0].__class__(
        "dog", "qwe", "dog", "data/cat", "loras/dog")])
    with pytest.raises(ha.MissingLoraError, match=r"subject 'dog'.*notebooks/01_train_subject_loras"):
        ha.load_subject_loras(tiny_models, config)


def test_layout_and_config_mismatch_is_listed(tiny_models, tiny_config, trained):
    layout = Layout([Region("cat", 0.1, 0.1, 0.3, 0.3), Region("dog", 0.5, 0.5, 0.3, 0.3)], 64, 64)
    with pytest.raises(ValueError, match=r"no region for mug; regions for unknown subject\(s\) dog"):
        hp.coarse_to_fine(tiny_models, tiny_config, layout)


def test_blend_is_exact_outside_and_mixes_inside():
    from PIL import Image
    base = Image.new("RGB", (8, 8), (10, 20, 30))
    patch = Image.new("RGB", (8, 8), (200, 200, 200))
    mask = np.zeros((8, 8), np.float32)
    mask[2:4, 2:4] = 0.5
    out = np.asarray(hp.blend_in_mask(base, patch, mask))
    assert (out[mask == 0] == (10, 20, 30)).all() and tuple(out[2, 2]) == (105, 110, 115)


def test_blend_takes_a_patch_of_the_whole_picture_or_of_the_box_alike():
    from PIL import Image
    rng = np.random.default_rng(0)
    base, whole = (Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(2))
    mask = np.zeros((32, 32), np.float32)
    mask[10:20, 12:18] = rng.random((10, 6), dtype=np.float32)
    box = (4, 6, 28, 30)
    expected = np.asarray(hp.blend_in_mask(base, whole, mask))
    assert (np.asarray(hp.blend_in_mask(base, whole, mask, box)) == expected).all()
    assert (np.asarray(hp.blend_in_mask(base, whole.crop(box), mask, box)) == expected).all()
    assert (np.asarray(hp.blend_in_mask(base, whole, np.zeros_like(mask), box)) == np.asarray(base)).all()


def test_a_pass_box_grows_to_its_pass_size_only_by_a_rounding(layout):
    m = masks(layout, 1024, 1024, 8)
    box = m.crop_box("cat", 0.15)
    side = box[2] - box[0]
    grown = hp.pass_box(box, side + 2, m)
    assert grown[2] - grown[0] == grown[3] - grown[1] == side + 2 and 0 <= grown[0] and grown[2] <= 1024
    assert grown[0] <= box[0] and box[2] <= grown[2] and grown[1] <= box[1] and box[3] <= grown[3]
    assert hp.pass_box(box, int(side * 1.3), m) == box  # a small box is upscaled, not given more context
    assert hp.pass_box(box, side - 32, m) == box  # nor shrunk


def test_pictures_reach_the_pipeline_with_the_values_diffusers_computes_from_them():
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image
    rng = np.random.default_rng(1)
    pictures = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(3)]
    masks_ = [Image.fromarray((rng.random((16, 16)) > 0.5).astype(np.uint8) * 255) for _ in range(3)]
    image_processor = VaeImageProcessor(vae_scale_factor=8)
    mask_processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True,
                                       do_convert_grayscale=True)
    for processor, given in ((image_processor, pictures), (mask_processor, masks_)):
        ours = processor.preprocess(hp._pixels(given, torch.device("cpu")), height=16, width=16)
        assert torch.equal(ours, processor.preprocess(given, height=16, width=16))


def test_crop_box_is_square_and_inside(layout):
    m = masks(layout, 64, 64, 2)
    for name in ("cat", "mug"):
        x0, y0, x1, y1 = m.crop_box(name, 0.15)
        assert x1 - x0 == y1 - y0 and 0 <= x0 and 0 <= y0 and x1 <= 64 and y1 <= 64
        ys, xs = np.nonzero(m.support[name])
        assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1


def test_weighted_prompt_scales_only_the_emphasised_tokens(tiny_models):
    plain = hp.weighted_prompt_embeds(tiny_models, "a photo of sks cat", "", ["sks"], 1.0)["prompt_embeds"]
    boosted = hp.weighted_prompt_embeds(tiny_models, "a photo of sks cat", "", ["sks"], 1.5)["prompt_embeds"]
    ratio = (boosted / plain)[0, :, 0].tolist()
    assert ratio[4] / ratio[3] == pytest.approx(1.5, rel=1e-3)  # "sks" is token 4 (after <bos> a photo of)
    assert ratio[2] == pytest.approx(ratio[3], rel=1e-5)


def test_a_fused_pass_merges_only_its_subjects_delta_and_restores_the_weights_exactly(tiny_models, trained):
    import torch
    from peft.tuners.lora import LoraLayer

    lora_layers = [m for m in tiny_models.unet.modules() if isinstance(m, LoraLayer)]
    before = [layer.get_base_layer().weight.detach().clone() for layer in lora_layers]
    with ha.fused_adapter(tiny_models, "cat"):
        assert ha.active_adapters(tiny_models) == ["cat"]
        for layer, weight in zip(lora_layers, before):
            merged = layer.get_base_layer().weight
            assert torch.allclose(merged, weight + layer.get_delta_weight("cat"), atol=1e-6)
            assert not torch.allclose(merged, weight + layer.get_delta_weight("mug"), atol=1e-6)
    assert all(torch.equal(layer.get_base_layer().weight, w) for layer, w in zip(lora_layers, before))
    assert not any(layer.merged for layer in lora_layers)


def test_fused_and_unfused_passes_paint_the_same_picture(tiny_models, tiny_config, trained, result):
    subject = tiny_config.subject("cat")
    images = [hp.region_pass(tiny_models, tiny_config.replace(fuse_subject_lora=fused), result.coarse, result.masks,
                             subject, 5, 0.85)[0] for fused in (True, False)]
    difference = np.abs(np.asarray(images[0], np.int16) - np.asarray(images[1], np.int16))
    assert difference.max() <= 2  # rounding only: W x + B A x vs (W + B A) x


def test_the_batched_merge_equals_diffusers_fuse_lora(tiny_models, trained):
    import torch

    layers = ha.lora_base_layers(tiny_models)
    with ha.fused_adapter(tiny_models, "mug"):
        ours = [layer.weight.detach().clone() for layer in layers]
    with ha.only_adapter(tiny_models, "mug"), ha._diffusers_fused(tiny_models, "mug"):
        theirs = [layer.weight.detach().clone() for layer in layers]
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(ours, theirs))
    assert any(not torch.equal(a, layer.weight) for a, layer in zip(ours, layers))  # the merge did change weights


def test_a_subject_lora_scale_multiplies_its_delta_in_every_path_and_is_not_kept(tiny_models, trained):
    from peft.tuners.lora import LoraLayer

    layers = [m for m in tiny_models.unet.modules() if isinstance(m, LoraLayer) and "cat" in m.lora_A]
    before = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    with ha.fused_adapter(tiny_models, "cat", 1.5):
        ours = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    for layer, weight, merged in zip(layers, before, ours):
        assert torch.allclose(merged, weight + 1.5 * layer.get_delta_weight("cat"), atol=1e-6)
    with ha.only_adapter(tiny_models, "cat"), ha._diffusers_fused(tiny_models, "cat", 1.5):
        theirs = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(ours, theirs))
    for layer in layers:  # the batched path: each sample's B carries the scale
        assert torch.allclose(ha._per_sample_weights(layer, ["cat"], 1.5)[1],
                              1.5 * ha._per_sample_weights(layer, ["cat"])[1])
    trained_scaling = [layer.scaling["cat"] for layer in layers]
    with ha.only_adapter(tiny_models, "cat", 1.5):  # the unfused path: peft's own scaling
        assert [layer.scaling["cat"] for layer in layers] == pytest.approx([1.5 * s for s in trained_scaling])
    assert [layer.scaling["cat"] for layer in layers] == pytest.approx(trained_scaling)
    with ha.fused_adapter(tiny_models, "cat"):  # nothing of the scale stayed behind
        again = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    for layer, weight, merged in zip(layers, before, again):
        assert torch.allclose(merged, weight + layer.get_delta_weight("cat"), atol=1e-6)


def test_a_pass_can_name_every_other_known_class_as_negative(tiny_config):
    cat = tiny_config.subject("cat")
    assert hp.pass_negative_prompt(tiny_config, cat) == tiny_config.negative_prompt
    config = tiny_config.replace(pass_negative_classes=True, class_vocabulary=["cat", "mug", "tree"])
    assert hp.pass_negative_prompt(config, cat) == f"{config.negative_prompt}, mug, tree"
    assert hp.pass_negative_prompt(config.replace(negative_prompt=""), cat) == "mug, tree"


def test_a_pass_runs_at_its_crops_size_between_the_floor_and_the_resolution(tiny_models, tiny_config):
    config = tiny_config.replace(resolution=256, subject_pass_min_size=96)
    assert hp.pass_size(tiny_models, config, 200) == 208  # rounded up to what the UNet divides (16 px here)
    assert hp.pass_size(tiny_models, config, 40) == 96  # a small crop is upscaled to the floor
    assert hp.pass_size(tiny_models, config, 256) == 256
    compiled = config.replace(compile_unet=True)  # two shapes, each compiled once: the floor or the resolution
    assert [hp.pass_size(tiny_models, compiled, side) for side in (40, 150, 176, 200, 256)] == [96, 96, 256, 256, 256]


def test_skipping_diffusers_masked_picture_encode_changes_no_latent(tiny_models, tiny_config, result):
    """The placeholder ``inpaint_latents`` hands a 4-channel UNet instead of the masked picture's latents: the same
    latents as diffusers' own call, which VAE-encodes the masked picture (three samples, one call)."""
    from PIL import Image

    images = [result.coarse, result.final, result.coarse.transpose(Image.FLIP_LEFT_RIGHT)]
    mask = Image.fromarray((result.masks.support["cat"] * 255).astype(np.uint8))
    args = dict(strength=0.8, seed=[3, 4, 5], size=64, prompt=["a cat"] * 3, negative_prompt=[""] * 3)
    with ha.only_adapter(tiny_models, None), torch.no_grad():
        ours = hp.inpaint_latents(tiny_models, tiny_config, images, [mask] * 3, **args)
        theirs = tiny_models.inpaint(prompt=args["prompt"], negative_prompt=args["negative_prompt"], image=images,
                                     mask_image=[mask] * 3, strength=0.8, height=64, width=64,
                                     num_inference_steps=tiny_config.steps, guidance_scale=tiny_config.guidance_scale,
                                     generator=[tiny_models.generator(s) for s in (3, 4, 5)],
                                     output_type="latent").images
    assert tiny_models.unet.config.in_channels == 4 and torch.equal(ours, theirs)


def test_resampling_repeats_the_first_steps_and_keeps_each_sample_its_own_seed(tiny_models, tiny_config, result):
    """``inpaint_resample``: the first 30 % of the steps a call runs are each run that many times (RePaint); the
    pipeline's own scheduler is back afterwards; a batch paints what each sample's call alone paints."""
    from PIL import Image

    mask = Image.fromarray((result.masks.support["cat"] * 255).astype(np.uint8))
    config = tiny_config.replace(inpaint_resample=3, steps=10)
    args = dict(strength=0.8, size=64, prompt="a cat", negative_prompt="")
    seen = []
    handle = tiny_models.unet.register_forward_pre_hook(lambda m, a: seen.append(int(a[1].flatten()[0])))
    scheduler = tiny_models.inpaint.scheduler
    try:
        with ha.only_adapter(tiny_models, None), torch.no_grad():
            plain = hp.inpaint_latents(tiny_models, tiny_config.replace(steps=10), result.coarse, mask, seed=3,
                                       **args)
            runs = len(seen)
            resampled = hp.inpaint_latents(tiny_models, config, result.coarse, mask, seed=3, **args)
            batch = hp.inpaint_latents(tiny_models, config, [result.coarse, result.final], [mask] * 2, seed=[3, 4],
                                       **{**args, "prompt": ["a cat"] * 2, "negative_prompt": [""] * 2})
            alone = hp.inpaint_latents(tiny_models, config, result.final, mask, seed=4, **args)
    finally:
        handle.remove()
    assert tiny_models.inpaint.scheduler is scheduler
    assert runs == 8 and seen[8:8 + 12] == seen[:1] * 3 + seen[1:2] * 3 + seen[2:8]  # 8 steps, the first 2 x 3
    assert not torch.equal(plain, resampled)
    # the same noise per sample (batched matmuls differ in the last bits: ~2e-5 here, another seed differs by ~15)
    assert torch.allclose(batch[0], resampled[0], atol=1e-4) and torch.allclose(batch[1], alone[0], atol=1e-4)
    with pytest.raises(ValueError, match="inpaint_resample needs"):
        with hp.resampling(SimpleNamespace(scheduler=object()), 3, 0.8, 10):
            pass


def test_phase0s_ghosts_are_painted_over_with_the_base_model_and_nothing_else_changes(tiny_models, tiny_config,
                                                                                      layout, result, unet_spy,
                                                                                      tmp_path):
    calls = []

    def finder(image, masks_):  # a ghost at the top left the first time, none after the cleanup
        calls.append(np.asarray(image).copy())
        return [(2, 2, 12, 10)] if len(calls) == 1 else []

    cleaned = hp.coarse_to_fine(tiny_models, tiny_config, layout, seed=11, find_ghosts=finder)
    assert cleaned.ghosts_removed == [[2, 2, 12, 10]] and len(calls) == 2
    assert np.array_equal(np.asarray(cleaned.scene), np.asarray(result.coarse))  # Phase 0 as it was drawn
    changed = np.any(np.asarray(cleaned.coarse) != np.asarray(cleaned.scene), axis=-1)
    ys, xs = np.nonzero(changed)
    assert changed.any() and xs.min() >= 0 and xs.max() < 15 and ys.max() < 13  # the box grown by 25 %, no more
    assert outside_mask_max_diff(cleaned.final, cleaned.coarse, cleaned.masks) == 0
    assert unet_spy.calls[:2 * tiny_config.steps] == [()] * (2 * tiny_config.steps)  # Phase 0 and the cleanup:
    # every LoRA off
    loaded = hp.GenerationResult.load(cleaned.save(tmp_path / "r"), tiny_config.effective_feather_px)
    assert loaded.ghosts_removed == [[2, 2, 12, 10]]
    assert np.array_equal(np.asarray(loaded.scene), np.asarray(cleaned.scene))
    untouched = hp.coarse_to_fine(tiny_models, tiny_config, layout, seed=11, find_ghosts=lambda image, masks_: [])
    assert untouched.scene is None and untouched.ghosts_removed == []
    assert np.array_equal(np.asarray(untouched.final), np.asarray(result.final))


# ----------------------------------------------------------------------------------------------------------------
# batched subject passes
# ----------------------------------------------------------------------------------------------------------------
class LoraDeltaSpy:
    """At every LoRA layer call: what the layer added to its base output for each sample, and which adapter's delta
    that is (each adapter's ``lora_B(lora_A(x)) * scaling`` recomputed on the sample's own input): observed on the
    layers' inputs and outputs, whatever the code under test does inside them."""

    def __init__(self, models):
        from peft.tuners.lora import LoraLayer

        self.layers = [m for m in models.unet.modules() if isinstance(m, LoraLayer)]
        self.seen: list[tuple[int, tuple]] = []  # (batch size, per sample: the adapter whose delta was added)
        self.handles = []

    def __enter__(self):
        self.handles = [layer.register_forward_hook(self._record) for layer in self.layers]
        return self

    @torch.no_grad()
    def _record(self, layer, args, output):
        x = args[0]
        added = output - layer.get_base_layer()(x)
        owners = []
        for i in range(len(x)):
            candidates = {name: layer.lora_B[name](layer.lora_A[name](x[i:i + 1])) * layer.scaling[name]
                          for name in layer.lora_A}
            match = [name for name, d in candidates.items() if torch.allclose(added[i:i + 1], d, atol=1e-5)]
            owners.append(match[0] if len(match) == 1 else
                          "none" if torch.allclose(added[i:i + 1], torch.zeros_like(added[i:i + 1])) else "?")
        self.seen.append((len(x), tuple(owners)))

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def test_non_overlapping_crops_make_one_batch_and_overlapping_ones_fall_back(tiny_config, layout, corner_layout):
    corner, default = corner_layout, layout
    jobs = [hp.PassJob(tiny_config.subject(n), 1, 0.85, "p") for n in ("cat", "mug")]
    for mode, lay, sizes in [("disjoint", corner, [2]), ("disjoint", default, [1, 1]), ("all", default, [2]),
                             ("off", corner, [1, 1])]:
        m = masks(lay, 64, 64, tiny_config.effective_feather_px)
        batches = hp.pass_batches(jobs, m, tiny_config.replace(batch_subject_passes=mode))
        assert [len(b) for b in batches] == sizes, mode
    # passes of different strengths never share a call
    mixed = [jobs[0], hp.PassJob(tiny_config.subject("mug"), 1, 0.65, "p")]
    m = masks(corner, 64, 64, tiny_config.effective_feather_px)
    assert [len(b) for b in hp.pass_batches(mixed, m, tiny_config)] == [1, 1]


def test_batched_passes_paint_what_sequential_passes_paint(tiny_models, tiny_config, trained, corner_layout):
    corner = corner_layout
    sequential = hp.coarse_to_fine(tiny_models, tiny_config.replace(batch_subject_passes="off"), corner, seed=5)
    sizes = []
    handle = tiny_models.unet.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        batched = hp.coarse_to_fine(tiny_models, tiny_config.replace(batch_subject_passes="disjoint"), corner, seed=5)
    finally:
        handle.remove()
    passes_steps = int(tiny_config.steps * tiny_config.inpaint_strength)
    assert sizes == [2] * tiny_config.steps + [4] * passes_steps  # Phase 0, then both subjects in one call per step
    assert [p.subject for p in batched.passes] == ["cat", "mug"]
    assert [p.active_adapters for p in batched.passes] == [["cat"], ["mug"]]
    a, b = np.asarray(sequential.final, np.int16), np.asarray(batched.final, np.int16)
    assert np.array_equal(np.asarray(sequential.coarse), np.asarray(batched.coarse))
    assert np.abs(a - b).max() <= 2  # fused (sequential) vs per-sample deltas: fp rounding only
    assert not np.array_equal(np.asarray(batched.final), np.asarray(batched.coarse))
    outside = ~np.logical_or.reduce(list(batched.masks.support.values()))
    assert np.array_equal(np.asarray(batched.final)[outside], np.asarray(batched.coarse)[outside])


def test_inpaint_steps_set_the_schedule_of_every_pass(tiny_models, tiny_config, trained, corner_layout):
    config = tiny_config.replace(batch_subject_passes="disjoint", steps=4, inpaint_steps=8)
    sizes = []
    handle = tiny_models.unet.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        hp.coarse_to_fine(tiny_models, config, corner_layout, seed=5)
    finally:
        handle.remove()
    assert sizes == [2] * 4 + [4] * int(8 * config.inpaint_strength)  # Phase 0's 4 steps, the passes' share of 8


def test_composites_of_several_seeds_in_one_batch_equal_each_seeds_own_run(tiny_models, tiny_config, trained,
                                                                           corner_layout):
    config = tiny_config.replace(batch_subject_passes="disjoint")
    sizes = []
    handle = tiny_models.unet.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        many = hp.coarse_to_fine_many(tiny_models, config, corner_layout, [5, 6, 7])
    finally:
        handle.remove()
    passes_steps = int(config.steps * config.inpaint_strength)
    assert sizes == [6] * config.steps + [12] * passes_steps  # 3 scenes, then 3 composites x 2 subjects, per step
    for seed, result in zip([5, 6, 7], many):
        alone = hp.coarse_to_fine(tiny_models, config, corner_layout, seed=seed)
        assert result.seed == seed and [p.seed for p in result.passes] == [p.seed for p in alone.passes]
        assert [p.active_adapters for p in result.passes] == [["cat"], ["mug"]]
        assert np.abs(np.asarray(result.coarse, np.int16) - np.asarray(alone.coarse, np.int16)).max() <= 2
        assert np.abs(np.asarray(result.final, np.int16) - np.asarray(alone.final, np.int16)).max() <= 2
    assert not np.array_equal(np.asarray(many[0].final), np.asarray(many[1].final))  # each its own seed


def test_inside_a_batched_call_each_sample_gets_only_its_own_subjects_delta(tiny_models, tiny_config, trained,
                                                                           corner_layout):
    corner = corner_layout
    m = masks(corner, 64, 64, tiny_config.effective_feather_px)
    scene = hp.generate_scene(tiny_models, tiny_config, "a scene", 3)
    jobs = [hp.PassJob(tiny_config.subject(n), 7 + i, 0.85, f"a {n}") for i, n in enumerate(("mug", "cat"))]
    with LoraDeltaSpy(tiny_models) as spy:
        hp.batched_pass(tiny_models, tiny_config, scene, m, jobs)
    # samples: [negative mug, negative cat, positive mug, positive cat] (classifier-free guidance)
    assert {owners for _, owners in spy.seen} == {("mug", "cat", "mug", "cat")}
    assert {size for size, _ in spy.seen} == {4}
    assert len(spy.seen) == len(spy.layers) * int(tiny_config.steps * 0.85)  # every layer, every step


def test_per_sample_adapters_route_the_base_model_too_and_leave_peft_as_it_was(tiny_models, trained):
    unet = tiny_models.unet
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([500, 500])
    text = torch.randn(2, 77, unet.config.cross_attention_dim)
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    extra = {"text_embeds": torch.randn(2, pooled), "time_ids": torch.zeros(2, 6)}
    with torch.no_grad(), ha.only_adapter(tiny_models, None):
        before = unet(x, t, text, added_cond_kwargs=extra).sample
        with ha.per_sample_adapters(tiny_models, [None, "cat"]), LoraDeltaSpy(tiny_models) as spy:
            unet(x, t, text, added_cond_kwargs=extra)
        after = unet(x, t, text, added_cond_kwargs=extra).sample
    assert {owners for _, owners in spy.seen} == {("none", "cat")}
    assert torch.equal(before, after)
    assert not any("forward" in vars(m) for m in spy.layers)  # peft's own forward is back on every layer


def test_region_attention_raises_only_the_subjects_words_inside_its_mask_in_the_guided_half():
    mask = torch.zeros(2, 1, 64, 64)
    mask[0, :, :, :32] = 1  # sample 0's region: the left half; sample 1's: the right half
    mask[1, :, :, 32:] = 1
    focus = torch.zeros(2, 77)
    focus[0, 2], focus[1, 3:5] = 1, 1
    bias = hp._RegionCrossAttention(mask, focus, 4.0).bias(16, 77, 4, torch.zeros(1))  # a 4x4 level, guidance batch
    assert bias.shape == (4, 16, 77)
    assert not bias[:2].any()  # the unconditional half is left alone
    grid = bias[2:].reshape(2, 4, 4, 77)
    assert torch.equal(grid[0, :, :2, 2], torch.full((4, 2), 4.0)) and torch.equal(grid[0, :, 2:, 2],
                                                                                      torch.full((4, 2), -4.0))
    assert torch.equal(grid[1, :, 2:, 3:5], torch.full((4, 2, 2), 4.0)) and (grid[1, :, :2, 3:5] == -4).all()
    assert not grid[0, ..., 3:].any() and not grid[1, ..., 2].any()  # every other word is left alone
    assert hp._RegionCrossAttention(mask, focus, 4.0).bias(15, 77, 4, torch.zeros(1)) is None  # not a square level


def test_focus_tokens_find_each_samples_own_words(tiny_models):
    focus = hp.focus_tokens(tiny_models, ["a sks cat on grass", "a zwx mug on grass"], [["sks", "cat"], ["", "mug"]])
    ids = tiny_models.txt2img.tokenizer("a sks cat on grass").input_ids
    assert focus.shape == (2, tiny_models.txt2img.tokenizer.model_max_length)
    assert focus[0].sum() >= 2 and focus[1].sum() >= 1
    assert not focus[0, :1].any() and not focus[0, len(ids):].any()  # not the start token, not the padding


def test_region_attention_changes_only_the_regions_and_puts_the_processors_back(tiny_models, tiny_config, trained,
                                                                                 layout, result):
    before = {name: type(p) for name, p in tiny_models.unet.attn_processors.items()}
    seen = []
    handle = tiny_models.unet.register_forward_pre_hook(
        lambda m, args: seen.append({type(p).__name__ for n, p in m.attn_processors.items() if "attn2" in n}))
    try:
        steered = hp.coarse_to_fine(tiny_models, tiny_config.replace(region_attention=4.0), layout, seed=11)
    finally:
        handle.remove()
    assert {type(p) for p in tiny_models.unet.attn_processors.values()} == set(before.values())
    assert {"_RegionCrossAttention"} in seen and seen[0] != {"_RegionCrossAttention"}  # passes only, not Phase 0
    assert np.array_equal(np.asarray(steered.coarse), np.asarray(result.coarse))
    outside = ~np.logical_or.reduce(list(steered.masks.support.values()))
    assert np.array_equal(np.asarray(steered.final)[outside], np.asarray(result.final)[outside])
    assert not np.array_equal(np.asarray(steered.final), np.asarray(result.final))  # and the bias did change them


def test_batched_passes_with_a_layout_each_paint_what_each_pass_alone_paints(tiny_models, tiny_config, trained):
    """Pictures with layouts of their own in one call (the world's inpainting gate paints its cases so)."""
    size = tiny_config.resolution
    layouts = [Layout([Region("cat", 0.05, 0.3, 0.4, 0.6)], size, size),
               Layout([Region("cat", 0.5, 0.2, 0.45, 0.7)], size, size)]
    mask_sets = [masks(layout, size, size, tiny_config.effective_feather_px) for layout in layouts]
    scene = hp.generate_scene(tiny_models, tiny_config, "a cat on grass", 3)
    subject = tiny_config.subject("cat")
    jobs = [hp.PassJob(subject, seed, tiny_config.inpaint_strength, "a photo of sks cat on grass") for seed in (11, 12)]
    batched = hp.batched_pass(tiny_models, tiny_config, [scene, scene], mask_sets, jobs)
    assert batched[0][1].crop_box != batched[1][1].crop_box
    for (picture, _), mask_set, job in zip(batched, mask_sets, jobs):
        alone, _ = hp.region_pass(tiny_models, tiny_config, scene, mask_set, subject, job.seed, job.strength,
                                  job.prompt)
        assert np.abs(np.asarray(picture, np.int16) - np.asarray(alone, np.int16)).max() <= 2
        outside = ~mask_set.support["cat"]
        assert np.array_equal(np.asarray(picture)[outside], np.asarray(scene)[outside])
        assert not np.array_equal(np.asarray(picture), np.asarray(scene))


def test_generate_takes_one_prompt_per_seed(tiny_models, tiny_config):
    both = ha.generate(tiny_models, tiny_config, ["a cat", "a mug"], [1, 2])
    for picture, prompt, seed in zip(both, ["a cat", "a mug"], [1, 2]):
        alone = ha.generate(tiny_models, tiny_config, prompt, seed)
        assert np.abs(np.asarray(picture, np.int16) - np.asarray(alone, np.int16)).max() <= 2
    assert not np.array_equal(np.asarray(both[1]), np.asarray(ha.generate(tiny_models, tiny_config, "a cat", 2)))
    with pytest.raises(ValueError, match="one prompt or one per seed"):
        ha.generate(tiny_models, tiny_config, ["a cat"], [1, 2])
