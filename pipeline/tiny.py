"""Tiny random-weight models in the real file formats, for tests and offline smoke runs.

Every model folder (HunyuanVideo, HunyuanVideo-I2V, HunyuanVideo-1.5, Wan 2.1 and 2.2, LTX-2) is written by
`save_pretrained` from the real diffusers and transformers classes (sizes from diffusers' own pipeline
tests, `tests/pipelines/<family>/`), with tokenizers trained offline by the `tokenizers` package.
Each accepts every frame count (4k+1; 8k+1 for LTX-2) and size (its size multiple) that its real model does.
The Real-ESRGAN files are `.pth` state dicts in the release key layout: basicsr RRDBNet names under
`params_ema`, SRVGGNetCompact names under `params`.
Their output is noise: they prove the code paths, not the pictures.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from pipeline.loading import model_construction

# Extra pipeline-call arguments a model folder needs, read by `pipeline.generate`.
# The tiny tokenizer has no system prompt to crop, and short sequences keep it fast.
FOLDER_CONFIG = "t2v.json"
# Written into each tiny folder's t2v.json; a folder of an older build is built again on its next use
# (`models.tiny_model_dir`). 2: the LTX-2 build has the Gemma processor its prompt enhancer needs.
TINY_BUILD = 2
TINY_CALL_DEFAULTS = {"prompt_template": {"template": "{}", "crop_start": 0}, "max_sequence_length": 16}
# HunyuanVideo-I2V's Llava encoder: 16 image tokens (32 px CLIP tower, patch 8) written over positions 5..21.
TINY_HUNYUAN_I2V_CALL_DEFAULTS = {
    "prompt_template": {"template": "{}", "crop_start": 0, "image_emb_len": 16, "image_emb_start": 5,
                        "image_emb_end": 21},
    "max_sequence_length": 32,
}
# HunyuanVideo-1.5 reads its chat template from the tokenizer (Qwen2.5-VL's markers, here as special tokens).
_QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Wan's UMT5 prompt length; the real default is 512 tokens.
TINY_WAN_CALL_DEFAULTS = {"max_sequence_length": 16}
# LTX-2's Gemma prompt length; the real default is 1024 tokens.
TINY_LTX2_CALL_DEFAULTS = {"max_sequence_length": 16}
# Its prompt enhancer's suggestion length, read by `pipeline.families`; the real default is 512 new tokens.
TINY_LTX2_ENHANCE_DEFAULTS = {"max_new_tokens": 24}
# Gemma 3's chat turns, a text or a list of parts (an image's place, a text), as its processor expects them.
_GEMMA_CHAT_TEMPLATE = (
    "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for part in m['content'] %}{% if part['type'] == 'image' %}<start_of_image>{% else %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
WAN_VARIANTS = ("2.1-t2v", "2.2-ti2v", "2.2-t2v-a14b", "2.2-i2v-a14b")
# Sizes shared by the tiny Llama and CLIP text encoders (diffusers' HunyuanVideo tests).
_TINY_LLAMA = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1, vocab_size=1000, intermediate_size=37,
                   layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, hidden_act="gelu")

_CORPUS = (
    "a red fox runs through the snow in a quiet forest at dawn. a cat walks on the grass, realistic. "
    "waves crash on a rocky shore under a purple sky. a city street at night with neon lights and rain. "
    "an astronaut rides a horse on the moon. slow motion of coffee poured into a white cup."
)


@model_construction()
def build_tiny_hunyuan(folder: Path) -> Path:
    """Write a tiny HunyuanVideo diffusers folder to `folder` (atomically) and return it."""
    from diffusers import HunyuanVideoPipeline
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    transformer = _tiny_hunyuan_transformer(guidance_embeds=True)
    vae = _tiny_hunyuan_vae()
    torch.manual_seed(0)
    text_encoder = LlamaModel(LlamaConfig(hidden_size=16, **_TINY_LLAMA))
    torch.manual_seed(0)
    text_encoder_2 = _tiny_clip_text()
    pipe = HunyuanVideoPipeline(
        transformer=transformer, vae=vae, scheduler=_flow_match(shift=7.0),
        text_encoder=text_encoder, tokenizer=_tiny_tokenizer(), text_encoder_2=text_encoder_2,
        tokenizer_2=_tiny_tokenizer(),
    )
    return _save_pipeline(pipe, folder, TINY_CALL_DEFAULTS)


def _tiny_tokenizer(special_tokens=("<s>", "<pad>", "</s>"), chat_template=None, model_max_length=256,
                    named_tokens=None):
    """A byte-level BPE tokenizer of at most 1000 tokens, trained offline on a few sentences.

    The first three special tokens are bos, pad and eos; any others (an image placeholder, chat
    markers) get the ids after them, so plain text never maps to them. `named_tokens`: attributes a
    processor reads (Gemma 3's `boi_token`, ...), each naming one of them.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([_CORPUS], trainer=trainer)
    bos, pad, eos = special_tokens[:3]
    extra = {"chat_template": chat_template} if chat_template else {}
    if named_tokens:
        extra["extra_special_tokens"] = dict(named_tokens)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   model_max_length=model_max_length, **extra)


@model_construction()
def build_tiny_hunyuan_i2v(folder: Path) -> Path:
    """A tiny HunyuanVideo-I2V folder: Llava (CLIP vision + Llama) prompt encoder, token-replace conditioning.

    `token_replace` is the conditioning of the released HunyuanVideo-I2V weights: the first latent
    frame stays the image's latent through every step.
    """
    from diffusers import HunyuanVideoImageToVideoPipeline
    from transformers import (
        CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
    )

    tokenizer = _tiny_tokenizer(special_tokens=("<s>", "<pad>", "</s>", "<image>"))
    llava = LlavaConfig(
        text_config=LlamaConfig(hidden_size=16, **_TINY_LLAMA),
        vision_config=CLIPVisionConfig(hidden_size=8, intermediate_size=37, projection_dim=32, num_attention_heads=4,
                                       num_hidden_layers=2, image_size=32, patch_size=8),
        pad_token_id=1, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    text_encoder = LlavaForConditionalGeneration(llava)
    torch.manual_seed(0)
    text_encoder_2 = _tiny_clip_text()
    torch.manual_seed(0)
    transformer = _tiny_hunyuan_transformer(guidance_embeds=True, image_condition_type="token_replace", patch_size=2)
    pipe = HunyuanVideoImageToVideoPipeline(
        transformer=transformer, vae=_tiny_hunyuan_vae(), scheduler=_flow_match(shift=7.0),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=_tiny_tokenizer(),
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    )
    return _save_pipeline(pipe, folder, TINY_HUNYUAN_I2V_CALL_DEFAULTS)


@model_construction()
def build_tiny_hunyuan15(folder: Path, i2v: bool = False, target_size: int = 64, guidance_scale: float = 6.0,
                         shift: float = 5.0, use_meanflow: bool = False) -> Path:
    """A tiny HunyuanVideo-1.5 folder (text-to-video, or image-to-video with a SigLIP image encoder).

    The VAE keeps the real 16x spatial and 4x temporal compression (five blocks), so sizes are
    multiples of 16 and frame counts 4k+1. `target_size` is the pixel area the image-to-video pipeline
    sizes its output by (640 for the 480p models, 960 for 720p); the tiny default keeps it small.
    """
    from diffusers import (
        AutoencoderKLHunyuanVideo15, HunyuanVideo15ImageToVideoPipeline, HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=4 * 2 + 1, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=32,
        image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=target_size, task_type="i2v" if i2v else "t2v",
        use_meanflow=use_meanflow,
    )
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo15(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,) * 5, layers_per_block=1,
        spatial_compression_ratio=16, temporal_compression_ratio=4,
        downsample_match_channel=False, upsample_match_channel=False,
    )
    torch.manual_seed(0)
    text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=1000, bos_token_id=0, eos_token_id=2, pad_token_id=1, rope_theta=1e6,
        rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
    ))
    torch.manual_seed(0)
    # ByT5's vocabulary: 256 bytes, 3 specials and 125 extra ids.
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=384, d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2,
                                             relative_attention_num_buckets=8))
    components = dict(
        transformer=transformer, vae=vae, scheduler=_flow_match(shift=shift), text_encoder=text_encoder,
        tokenizer=_tiny_tokenizer(special_tokens=("<s>", "<|endoftext|>", "</s>", "<|im_start|>", "<|im_end|>"),
                                  chat_template=_QWEN_CHAT_TEMPLATE, model_max_length=2048),
        text_encoder_2=text_encoder_2, tokenizer_2=ByT5Tokenizer(),
        guider=ClassifierFreeGuidance(guidance_scale=guidance_scale),
    )
    if not i2v:
        return _save_pipeline(HunyuanVideo15Pipeline(**components), folder)
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    image_encoder = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=12, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
    ))
    feature_extractor = SiglipImageProcessor(size={"height": 32, "width": 32})
    pipe = HunyuanVideo15ImageToVideoPipeline(**components, image_encoder=image_encoder,
                                              feature_extractor=feature_extractor)
    return _save_pipeline(pipe, folder)


@model_construction()
def build_tiny_wan(folder: Path, variant: str) -> Path:
    """A tiny Wan folder. `variant` picks what differs between the released models:

    - `2.1-t2v`: one expert, Wan 2.1 VAE (8x spatial), `WanPipeline` (Wan2.1-T2V-1.3B);
    - `2.2-ti2v`: one expert, Wan 2.2 VAE (16x spatial, patchified, 48 latent channels) and
      `expand_timesteps` (the first latent frame may be an image's), `WanPipeline` (Wan2.2-TI2V-5B);
    - `2.2-t2v-a14b` / `2.2-i2v-a14b`: two experts (`transformer` for high noise, `transformer_2`
      below `boundary_ratio`), Wan 2.1 VAE; image-to-video adds a mask and the image latent as
      input channels (16 + 4 + 16), `WanImageToVideoPipeline` without a CLIP image encoder.
    """
    from diffusers import (
        AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    if variant not in WAN_VARIANTS:
        raise ValueError(f"unknown tiny Wan variant {variant!r}; known: {', '.join(WAN_VARIANTS)}")
    ti2v = variant == "2.2-ti2v"
    torch.manual_seed(0)
    if ti2v:
        vae = AutoencoderKLWan(
            base_dim=3, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
            latents_mean=[0.0] * 48, latents_std=[1.0] * 48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
            scale_factor_spatial=16, scale_factor_temporal=4, temperal_downsample=[False, True, True],
        )
    else:
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
    latent = vae.config.z_dim
    in_channels = {"2.2-i2v-a14b": latent + 4 + latent}.get(variant, latent)

    def expert():
        torch.manual_seed(0)
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=in_channels,
            out_channels=latent, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
        )

    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=1000, d_model=32, d_ff=37, d_kv=8, num_heads=4,
                                               num_layers=2, relative_attention_num_buckets=8))
    two_experts = variant in ("2.2-t2v-a14b", "2.2-i2v-a14b")
    components = dict(
        transformer=expert(), transformer_2=expert() if two_experts else None, vae=vae, text_encoder=text_encoder,
        tokenizer=_tiny_tokenizer(),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        boundary_ratio={"2.2-t2v-a14b": 0.875, "2.2-i2v-a14b": 0.9}.get(variant), expand_timesteps=ti2v,
    )
    if variant == "2.2-i2v-a14b":
        pipe = WanImageToVideoPipeline(**components, image_encoder=None, image_processor=None)
    else:
        pipe = WanPipeline(**components)
    return _save_pipeline(pipe, folder, TINY_WAN_CALL_DEFAULTS)


def _tiny_hunyuan_transformer(guidance_embeds: bool, image_condition_type: str | None = None, patch_size: int = 1):
    from diffusers import HunyuanVideoTransformer3DModel

    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
        num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=patch_size, patch_size_t=1,
        guidance_embeds=guidance_embeds, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
        image_condition_type=image_condition_type,
    )


def _tiny_hunyuan_vae():
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(0)
    return AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4, up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, act_fn="silu", norm_num_groups=4,
        scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )


def _tiny_clip_text():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(hidden_size=8, projection_dim=32, **_TINY_LLAMA))


def _flow_match(shift: float):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=shift)


def _save_pipeline(pipe, folder: Path, call_defaults: dict | None = None, enhance_defaults: dict | None = None) -> Path:
    """`save_pretrained` into `folder` atomically, with the t2v.json that marks it tiny."""

    def write(tmp: Path):
        pipe.save_pretrained(tmp)
        config = {"tiny": True, "build": TINY_BUILD, **({"call_defaults": call_defaults} if call_defaults else {}),
                  **({"enhance_defaults": enhance_defaults} if enhance_defaults else {})}
        (tmp / FOLDER_CONFIG).write_text(json.dumps(config, indent=2))

    return _write_atomically(folder, write)


def rrdbnet_state(num_feat=64, num_block=23, num_grow_ch=32, scale=4, seed=0) -> dict[str, torch.Tensor]:
    """Random RRDBNet weights under basicsr's names, as in RealESRGAN_x4plus/x2plus.pth.

    The defaults are the x4plus sizes (spandrel reads every size from the shapes but the growth
    channels, which it takes as 32, as in every release). basicsr feeds x2 models a pixel-unshuffled input (12 channels).
    """
    gen = torch.Generator().manual_seed(seed)
    in_ch = {4: 3, 2: 12, 1: 48}[scale]
    state = {}

    def conv(name, cout, cin, gain=1.0):
        std = gain * (2.0 / (cin * 9)) ** 0.5
        state[f"{name}.weight"] = torch.randn(cout, cin, 3, 3, generator=gen) * std
        state[f"{name}.bias"] = torch.zeros(cout)

    conv("conv_first", num_feat, in_ch)
    for b in range(num_block):
        for r in (1, 2, 3):
            for i in range(1, 6):
                cout = num_grow_ch if i < 5 else num_feat
                conv(f"body.{b}.rdb{r}.conv{i}", cout, num_feat + (i - 1) * num_grow_ch, gain=0.1)
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        conv(name, num_feat, num_feat, gain=0.5)
    conv("conv_last", 3, num_feat, gain=0.5)
    return state


def compact_state(num_feat=64, num_conv=16, scale=4, seed=0) -> dict[str, torch.Tensor]:
    """Random SRVGGNetCompact weights under its release names, as in realesr-animevideov3.pth.

    The defaults are general-x4v3's sizes; animevideov3 uses num_conv=16 too, with 64 features.
    """
    gen = torch.Generator().manual_seed(seed)
    state = {}
    idx = 0
    for cin, cout in [(3, num_feat)] + [(num_feat, num_feat)] * num_conv:
        state[f"body.{idx}.weight"] = torch.randn(cout, cin, 3, 3, generator=gen) * (1.0 / (cin * 9)) ** 0.5
        state[f"body.{idx}.bias"] = torch.zeros(cout)
        state[f"body.{idx + 1}.weight"] = torch.full((cout,), 0.25)  # PReLU slopes
        idx += 2
    out = 3 * scale * scale
    state[f"body.{idx}.weight"] = torch.randn(out, num_feat, 3, 3, generator=gen) * (0.5 / (num_feat * 9)) ** 0.5
    state[f"body.{idx}.bias"] = torch.zeros(out)
    return state


def write_release_pth(path: Path, state: dict[str, torch.Tensor], key: str) -> Path:
    """Save `state` the way the Real-ESRGAN releases do: `{key: state_dict}` in a torch `.pth`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({key: state}, path)
    return path


def build_tiny_upscalers(folder: Path) -> dict[str, Path]:
    """Write tiny 4x RRDB (`params_ema`) and compact (`params`) files; return {'rrdb': path, 'compact': path}."""
    folder = Path(folder)
    paths = {"rrdb": folder / "tiny_RealESRGAN_x4plus.pth", "compact": folder / "tiny_realesr-compact-x4.pth"}
    if not paths["rrdb"].exists():
        write_release_pth(paths["rrdb"], rrdbnet_state(num_feat=8, num_block=1), "params_ema")
    if not paths["compact"].exists():
        write_release_pth(paths["compact"], compact_state(num_feat=8, num_conv=2), "params")
    return paths


def tiny_upscaler_path(data_dir: Path) -> Path:
    """The tiny compact 4x upscaler under `data_dir`, built on first use (fast enough for smoke runs)."""
    return build_tiny_upscalers(Path(data_dir) / "tiny")["compact"]


RANK_ZERO_BUILD_WAIT_S = 600.0


def _write_atomically(folder: Path, write) -> Path:
    """Let `write` fill a temporary sibling folder, then rename it into place: never a half-built model.
    In a torch.distributed group only rank 0 writes: transformers' `save_pretrained` writes no weights on any other
    rank (`should_save_on_this_rank`), so a folder a rank 1 renamed into place would hold an empty text encoder.
    The other ranks wait for rank 0's folder (they load the model rank 0 loads, as worker groups do)."""
    folder = Path(folder)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return _built_by_rank_zero(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    stale = folder.with_name(f"{tmp.name}-stale")
    try:
        write(tmp)
        if folder.exists() and tiny_build(folder) < TINY_BUILD:  # an older build: moved aside, then deleted
            with contextlib.suppress(OSError):  # another process may have moved it already
                folder.rename(stale)
        try:
            os.replace(tmp, folder)
        except OSError:
            if tiny_build(folder) < TINY_BUILD:  # another process did not win the race either
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
    return folder


def tiny_build(folder: Path) -> int:
    """The TINY_BUILD a tiny folder was written by (1: before builds were numbered; 0: no t2v.json)."""
    try:
        return json.loads((Path(folder) / FOLDER_CONFIG).read_text()).get("build", 1)
    except (OSError, ValueError):
        return 0


def _built_by_rank_zero(folder: Path) -> Path:
    deadline = time.monotonic() + RANK_ZERO_BUILD_WAIT_S
    while tiny_build(folder) < TINY_BUILD:
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {torch.distributed.get_rank()} waited {RANK_ZERO_BUILD_WAIT_S:.0f} s for rank 0 "
                               f"to build the tiny model {folder.name}")
        time.sleep(0.1)
    return folder


def build_tiny_ltx2(folder: Path) -> Path:
    """A tiny LTX-2 folder (`LTX2Pipeline`; `LTX2ImageToVideoPipeline` shares its modules): the video transformer
    with its audio branch, the video VAE, the audio VAE (mel spectrogram latents), the vocoder (mel -> waveform),
    a Gemma 3 text encoder and the text connectors. Sizes from diffusers' tests (`tests/pipelines/ltx2/`); the
    Gemma 3 is built here (theirs is downloaded). The VAE keeps the real 32x spatial and 8x temporal compression, so
    sizes are multiples of 32 and frame counts 8k+1, as for the real models. The vocoder writes stereo at 16 kHz
    (100 mel frames a second, upsampled 160x). The Gemma 3 processor (its tokenizer with a chat template, and a
    32 px image processor) lets the text encoder suggest prompts, as the real one does (`enhance_prompt`)."""
    from diffusers import (
        AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, FlowMatchEulerDiscreteScheduler, LTX2Pipeline,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    text = dict(vocab_size=1000, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, max_position_embeddings=256, sliding_window=64,
                bos_token_id=0, pad_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    text_encoder = Gemma3ForConditionalGeneration(Gemma3Config(
        text_config=text, mm_tokens_per_image=4, boi_token_index=3, eoi_token_index=4, image_token_index=5,
        vision_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
    ))
    torch.manual_seed(0)
    transformer = LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2, qk_norm="rms_norm_across_heads",
        caption_channels=32, rope_double_precision=False, rope_type="split",
    )
    torch.manual_seed(0)
    connectors = LTX2TextConnectors(
        caption_channels=32, text_proj_in_factor=text["num_hidden_layers"] + 1,
        video_connector_num_attention_heads=4, video_connector_attention_head_dim=8, video_connector_num_layers=1,
        video_connector_num_learnable_registers=None, audio_connector_num_attention_heads=4,
        audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None, connector_rope_base_seq_len=32, rope_theta=10000.0,
        rope_double_precision=False, causal_temporal_positioning=False, rope_type="split",
    )
    torch.manual_seed(0)
    vae = AutoencoderKLLTX2Video(  # three space-time downsamples after a 4x4 patchify: 32x in space, 8x in time
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8),
        decoder_block_out_channels=(8, 8, 8), layers_per_block=(1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
        spatio_temporal_scaling=(True,) * 3, decoder_spatio_temporal_scaling=(True,) * 3,
        decoder_inject_noise=(False,) * 4, downsample_type=("spatiotemporal",) * 3,
        upsample_type=("spatiotemporal",) * 3, upsample_residual=(False,) * 3, upsample_factor=(1,) * 3,
        timestep_conditioning=False, patch_size=4, patch_size_t=1, encoder_causal=True, decoder_causal=False,
    )
    torch.manual_seed(0)
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None, in_channels=2,
        resolution=32, latent_channels=2, norm_type="pixel", causality_axis="height", dropout=0.0,
        mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=8,
    )
    torch.manual_seed(0)
    vocoder = LTX2Vocoder(
        in_channels=2 * 8, hidden_channels=32, out_channels=2, upsample_kernel_sizes=[20, 16, 4],
        upsample_factors=[10, 8, 2],
        resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]], leaky_relu_negative_slope=0.1,
        output_sampling_rate=16000,
    )
    gemma_tokenizer = _tiny_tokenizer(  # ids 3, 4, 5: the config's boi, eoi and image tokens
        special_tokens=("<s>", "<pad>", "</s>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"),
        chat_template=_GEMMA_CHAT_TEMPLATE, model_max_length=8192,  # the enhancer's system prompt is 3k tokens
        named_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": 32, "width": 32}),
                                tokenizer=gemma_tokenizer, image_seq_length=4)
    pipe = LTX2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, audio_vae=audio_vae, text_encoder=text_encoder,
        tokenizer=gemma_tokenizer, connectors=connectors, transformer=transformer, vocoder=vocoder,
        processor=processor,
    )
    return _save_pipeline(pipe, folder, TINY_LTX2_CALL_DEFAULTS, TINY_LTX2_ENHANCE_DEFAULTS)
