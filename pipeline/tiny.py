"""Tiny random-weight models in the real file formats, for tests and offline smoke runs.

The HunyuanVideo folder is written by `save_pretrained` from the real diffusers and transformers
classes (sizes from diffusers' own HunyuanVideo tests), with tokenizers trained offline by the
`tokenizers` package. The Real-ESRGAN files are `.pth` state dicts in the release key layout:
basicsr RRDBNet names under `params_ema`, SRVGGNetCompact names under `params`.
Their output is noise: they prove the code paths, not the pictures.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

# Extra pipeline-call arguments a model folder needs, read by `pipeline.generate`.
# The tiny tokenizer has no system prompt to crop, and short sequences keep it fast.
FOLDER_CONFIG = "t2v.json"
TINY_CALL_DEFAULTS = {"prompt_template": {"template": "{}", "crop_start": 0}, "max_sequence_length": 16}

_CORPUS = (
    "a red fox runs through the snow in a quiet forest at dawn. a cat walks on the grass, realistic. "
    "waves crash on a rocky shore under a purple sky. a city street at night with neon lights and rain. "
    "an astronaut rides a horse on the moon. slow motion of coffee poured into a white cup."
)


def build_tiny_hunyuan(folder: Path) -> Path:
    """Write a tiny HunyuanVideo diffusers folder to `folder` (atomically) and return it."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
        num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1,
        guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    )
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4, up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, act_fn="silu", norm_num_groups=4,
        scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )
    shared = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1, vocab_size=1000, intermediate_size=37,
                  layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, hidden_act="gelu")
    torch.manual_seed(0)
    text_encoder = LlamaModel(LlamaConfig(hidden_size=16, **shared))
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModel(CLIPTextConfig(hidden_size=8, projection_dim=32, **shared))
    pipe = HunyuanVideoPipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder=text_encoder, tokenizer=_tiny_tokenizer(), text_encoder_2=text_encoder_2,
        tokenizer_2=_tiny_tokenizer(),
    )

    def write(tmp: Path):
        pipe.save_pretrained(tmp)
        (tmp / FOLDER_CONFIG).write_text(json.dumps({"tiny": True, "call_defaults": TINY_CALL_DEFAULTS}, indent=2))

    return _write_atomically(folder, write)


def _tiny_tokenizer():
    """A byte-level BPE tokenizer of at most 1000 tokens, trained offline on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<s>", "<pad>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([_CORPUS], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=256)


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


def tiny_model_dir(data_dir: Path) -> Path:
    """The tiny HunyuanVideo folder under `data_dir`, built on first use."""
    folder = Path(data_dir) / "tiny" / "HunyuanVideo"
    if not (folder / FOLDER_CONFIG).exists():
        build_tiny_hunyuan(folder)
    return folder


def tiny_upscaler_path(data_dir: Path) -> Path:
    """The tiny compact 4x upscaler under `data_dir`, built on first use (fast enough for smoke runs)."""
    return build_tiny_upscalers(Path(data_dir) / "tiny")["compact"]


def _write_atomically(folder: Path, write) -> Path:
    """Let `write` fill a temporary sibling folder, then rename it into place: never a half-built model."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        write(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / FOLDER_CONFIG).exists():  # another process did not win the race either
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
