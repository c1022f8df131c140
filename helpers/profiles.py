"""Where each profile's weights come from; ``models`` turns them into one bundle of pipelines.

* ``tiny``: SDXL's classes at toy size with seeded random weights, built offline in seconds, saved once with
  ``save_pretrained`` and always loaded back with ``from_pretrained`` (the real loading path).
* ``sdxl``: the Hub weights with the fp16-fixed VAE; checks the cache / the Hub first and fails fast with one line.
* ``world``: SDXL's classes at small size, trained on the procedurally rendered world (``helpers.world.train``) and
  shipped in ``models/world``; loaded with ``from_pretrained`` exactly like a local ``sdxl``.
* ``sdxl-random``: the full-size SDXL architecture with random weights, for speed and memory benchmarks only.
"""
from __future__ import annotations

import gzip
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from .io import set_aside, temp_folder

SDXL_BASE_ID = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_VAE_FP16_FIX_ID = "madebyollin/sdxl-vae-fp16-fix"
TINY_VERSION = "tiny-sdxl-v1"  # bump when the tiny architecture changes, so stale caches are rebuilt
WORLD_DIR = Path(__file__).resolve().parent.parent / "models" / "world"  # trained by helpers.world.train
WORLD_VERSION = "world-v1"  # bump when the shipped world weights change, so LoRAs trained on the old ones retrain
WORLD_SCORER_NAME = "world-clip"
TINY_SEED = 1234
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"

SCHEDULER_CONFIG = dict(  # SDXL base's scheduler_config.json
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    steps_offset=1, timestep_spacing="leading", prediction_type="epsilon", interpolation_type="linear",
    use_karras_sigmas=False,
)


class ModelUnavailableError(RuntimeError):
    """The requested weights cannot be loaded here; the message says what to do."""


def quiet_libraries() -> None:
    """Keep notebook output readable: library progress bars and info chatter off, warnings and errors on."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*torch_dtype.*")


# ----------------------------------------------------------------------------------------------------------------
# tiny profile
# ----------------------------------------------------------------------------------------------------------------
def clip_tokenizer(pad_token: str = EOS_TOKEN):
    """SDXL's CLIP tokenizer rebuilt from the BPE merges that open_clip ships: same vocabulary, same token ids."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        vocab_file.write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), pad_token=pad_token, model_max_length=77)
    return tokenizer


def tiny_components() -> dict:
    """SDXL's classes at toy size; the VAE keeps 4 blocks so the latent is 1/8 of the image, as in SDXL."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    text_kwargs = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                       pad_token_id=49407, projection_dim=32)
    torch.manual_seed(TINY_SEED)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu", **text_kwargs))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_act="gelu", **text_kwargs))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 1), use_linear_projection=True,
        cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
        sample_size=64, scaling_factor=0.13025, force_upcast=False,
    )
    return dict(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, unet=unet,
        tokenizer=clip_tokenizer(EOS_TOKEN), tokenizer_2=clip_tokenizer("!"),  # SDXL pads its 2nd tokenizer with "!"
        scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
    )


def ensure_tiny_pipeline(cache_dir: Path) -> Path:
    """Build the tiny pipeline once and save it with ``save_pretrained``; later calls reuse the folder."""
    from diffusers import StableDiffusionXLPipeline

    folder = Path(cache_dir) / TINY_VERSION
    if (folder / "model_index.json").exists():
        return folder
    # a build that was killed before its rename cannot leave this; a damaged copy can. Checked in this order because
    # another process may rename its finished build into place at any moment (``evaluate`` under accelerate)
    if folder.exists() and not (folder / "model_index.json").exists():
        set_aside(folder, "incomplete tiny-model cache (no model_index.json)")
    quiet_libraries()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with temp_folder(folder) as tmp:  # a killed build leaves a temp folder the next start sweeps
        pipe = StableDiffusionXLPipeline(**tiny_components(), add_watermarker=False)
        pipe.save_pretrained(tmp, safe_serialization=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first: theirs is as good as ours
            pass
    return folder


# ----------------------------------------------------------------------------------------------------------------
# sdxl profile
# ----------------------------------------------------------------------------------------------------------------
def hub_token() -> str | None:
    """HF token from the environment or a Colab secret named HF_TOKEN. Never printed, never logged."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token
    try:  # pragma: no cover - only inside Colab
        from google.colab import userdata  # type: ignore

        return userdata.get("HF_TOKEN")
    except Exception:
        return None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _missing_weights_error(repo_id: str, reason: str) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"cannot load {repo_id!r}: {reason}. Fix: run where huggingface.co is reachable (Colab is), or download it "
        f"once with `hf download {repo_id}` into the HF cache, or use the offline profile "
        f"(HELPERS_PROFILE=world)."
    )


def check_hub_weights(repo_id: str, index_file: str) -> bool:
    """True when ``repo_id`` is in the local HF cache (or a local folder); else make sure the Hub answers within
    seconds, or raise ``ModelUnavailableError`` with one line that says what to do."""
    from huggingface_hub import HfApi, try_to_load_from_cache

    if Path(repo_id).is_dir() or isinstance(try_to_load_from_cache(repo_id, index_file), str):
        return True
    if _hub_offline():
        raise _missing_weights_error(repo_id, "HF_HUB_OFFLINE is set and it is not in the local cache")
    try:
        HfApi().model_info(repo_id, timeout=5, token=hub_token())
    except Exception as e:  # no network, DNS failure, timeout, gated repo...
        raise _missing_weights_error(repo_id, f"not cached and the Hub is unreachable ({type(e).__name__})") from None
    return False


def load_sdxl_pipeline(dtype: torch.dtype):
    """SDXL base with the fp16-fix VAE (the original VAE overflows in fp16 and gives black images).

    Both repos are checked (cache, else a reachable Hub) before the pipeline classes are imported, so a machine
    without the weights hears it in seconds; cached repos load with ``local_files_only``."""
    vae_cached = check_hub_weights(SDXL_VAE_FP16_FIX_ID, "config.json")
    base_cached = check_hub_weights(SDXL_BASE_ID, "model_index.json")
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    quiet_libraries()
    common = dict(torch_dtype=dtype, use_safetensors=True, token=hub_token())
    vae = AutoencoderKL.from_pretrained(SDXL_VAE_FP16_FIX_ID, local_files_only=vae_cached or _hub_offline(),
                                        **common)
    return StableDiffusionXLPipeline.from_pretrained(
        SDXL_BASE_ID, vae=vae, variant="fp16" if dtype == torch.float16 else None, add_watermarker=False,
        local_files_only=base_cached or _hub_offline(), **common)


# ----------------------------------------------------------------------------------------------------------------
# sdxl-random profile (benchmarks): full-size architecture, random weights, no download
# ----------------------------------------------------------------------------------------------------------------
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    use_linear_projection=True, norm_num_groups=32,
)
SDXL_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=1024, scaling_factor=0.13025, force_upcast=False,
)
SDXL_TEXT_CONFIGS = (
    dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
         hidden_act="quick_gelu", projection_dim=768),
    dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
         hidden_act="gelu", projection_dim=1280),
)


def _shrink_weights_(module: torch.nn.Module, factor: float) -> None:
    # Random init grows activations through SDXL's deep residual stacks until fp16 overflows; real weights do not.
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d)):
                sub.weight.mul_(factor)


def build_sdxl_random_pipeline(device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The full-size SDXL twin (2.57 B-parameter UNet) with random weights, built directly on ``device``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    quiet_libraries()
    torch.manual_seed(seed)
    common = dict(max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
        vae = AutoencoderKL(**SDXL_VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_CONFIGS[0], **common))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_CONFIGS[1], **common))
    components = dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2)
    for m in components.values():
        _shrink_weights_(m, 0.5)
        m.to(dtype).eval()
    for _ in range(4):  # shrink further until a full-size forward pass stays finite in this dtype
        if _sdxl_random_is_finite(unet, vae, device, dtype):
            break
        for m in components.values():
            _shrink_weights_(m, 0.5)
    return StableDiffusionXLPipeline(
        **components, tokenizer=clip_tokenizer(EOS_TOKEN), tokenizer_2=clip_tokenizer("!"),
        scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG), add_watermarker=False,
    )


@torch.no_grad()
def _sdxl_random_is_finite(unet, vae, device: torch.device, dtype: torch.dtype) -> bool:
    g = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(1, 4, 128, 128, generator=g).to(device, dtype)
    cond = {"text_embeds": torch.randn(1, 1280, generator=g).to(device, dtype),
            "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]], device=device, dtype=dtype)}
    hidden = torch.randn(1, 77, 2048, generator=g).to(device, dtype)
    out = unet(latents, torch.tensor([999], device=device), hidden, added_cond_kwargs=cond).sample
    image = vae.decode(latents / vae.config.scaling_factor).sample
    return bool(torch.isfinite(out).all() and torch.isfinite(image).all())


def world_pipeline_folder() -> Path:
    folder = WORLD_DIR / "pipeline"
    if not (folder / "model_index.json").exists():
        raise ModelUnavailableError(f"the world models are missing from {WORLD_DIR}; restore them from git "
                                    f"(git checkout -- models/world) or retrain with `python -m helpers.world.train "
                                    f"--out models/world` on a GPU")
    return folder


def load_tiny_pipeline(cache_dir: Path, dtype: torch.dtype):
    """The tiny pipeline from its cache; a cache that no longer loads is set aside and built again."""
    from safetensors import SafetensorError

    folder = ensure_tiny_pipeline(cache_dir)
    try:
        return load_pipeline_folder(folder, dtype), folder
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        set_aside(folder, f"tiny-model cache does not load ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
        return load_pipeline_folder(ensure_tiny_pipeline(cache_dir), dtype), folder


def load_pipeline_folder(folder: Path, dtype: torch.dtype):
    """A pipeline saved with ``save_pretrained`` (safetensors only, nothing fetched)."""
    from diffusers import StableDiffusionXLPipeline

    quiet_libraries()
    return StableDiffusionXLPipeline.from_pretrained(
        folder, torch_dtype=dtype, use_safetensors=True, local_files_only=True, add_watermarker=False)


# ----------------------------------------------------------------------------------------------------------------
# subject tokens, as every profile's tokenizer sees them (all use CLIP's BPE vocabulary)
# ----------------------------------------------------------------------------------------------------------------
# CLIP's BPE ids past the 512 byte symbols follow the merge order, i.e. how often the piece occurred in CLIP's
# training text: a whole word merged among the first ~20,000 is one the model knows well ("toy" 5988, "rocket" 8383),
# a rare one ("sks" 48136, "ohwx" 47993) carries little meaning a LoRA has to fight.
COMMON_WORD_MAX_ID = 20_000


def subject_token_problem(config) -> str | None:
    """One line naming the first subject token that would not work as a rare identifier, or None: two tokens the
    tokenizer reads the same, a token that is a common word, or one that already occurs in a prompt of the scene."""
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer()
    ids = {s.name: tokenizer.encode(s.token) for s in config.subjects}
    seen: dict[tuple[int, ...], str] = {}
    for s in config.subjects:
        key = tuple(ids[s.name])
        if key in seen:
            other = config.subject(seen[key])
            return (f"subjects {other.name!r} and {s.name!r}: tokens {other.token!r} and {s.token!r} are the same to "
                    f"the tokenizer (it ignores case and spacing); give each its own rare token")
        seen[key] = s.name
    for s in config.subjects:
        piece = ids[s.name]
        if len(piece) == 1 and piece[0] < COMMON_WORD_MAX_ID and tokenizer.decoder[piece[0]].endswith("</w>"):
            return (f"subject {s.name!r}: token {s.token!r} is a common word the model already knows (CLIP id "
                    f"{piece[0]}); use a rare token such as 'sks', 'ohwx' or a made-up 3-4 letter word")
    prompts = {"scene_prompt": config.scene_prompt,
               **{f"extra_scene_prompts[{i}]": p for i, p in enumerate(config.extra_scene_prompts)}}
    encoded = {field_name: tokenizer.encode(prompt) for field_name, prompt in prompts.items()}
    for s in config.subjects:
        for field_name, prompt in prompts.items():
            words = encoded[field_name]
            n = len(ids[s.name])
            if any(words[i:i + n] == ids[s.name] for i in range(len(words) - n + 1)):
                return (f"subject {s.name!r}: token {s.token!r} already occurs in {field_name} ({prompt!r}); the "
                        f"subject pass and the QA loop's emphasis would hit it there too. Pick another token.")
    return None


# ----------------------------------------------------------------------------------------------------------------
# what a profile knows of its subjects beyond their photos
# ----------------------------------------------------------------------------------------------------------------
def light_judge(config):
    """The world's judge of a subject's light (it knows its personal subjects' true colours and the lights it
    renders); None on profiles whose subjects' colours nobody knows, where light error is not measured."""
    if config.profile != "world":
        return None
    from .world import light_judge as world_light_judge

    return world_light_judge(config.subject_names)
