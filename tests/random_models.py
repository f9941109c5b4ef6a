"""HunyuanVideo folders beside the tiny one, with another random transformer: wider, or deeper.

They share the tiny folder's text encoders, tokenizers and VAE, so only the transformer's shape
changes; each is a real `save_pretrained` folder that `VideoGenerator` loads like any other.
"""

import shutil
from pathlib import Path

import torch

from pipeline import models, tiny

# The tiny transformer's inputs are fixed by the tiny text encoders and VAE; these stay.
_FIXED = dict(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
              pooled_projection_dim=8)
# Four heads of 32 (rope axes summing to 32), two blocks of each kind and two refiner layers.
WIDE = dict(num_attention_heads=4, attention_head_dim=32, num_layers=2, num_single_layers=4, num_refiner_layers=2,
            rope_axes_dim=(8, 12, 12))
# The tiny widths, but 24 single-stream blocks: one step passes many block boundaries.
DEEP = dict(num_attention_heads=2, attention_head_dim=10, num_layers=1, num_single_layers=24, num_refiner_layers=1,
            rope_axes_dim=(2, 4, 4))

# HunyuanVideo's real attention width (24 heads of 128, rope axes 16/56/56) with one block of each
# kind: the attention kernels see the real head size, at a fraction of the weights.
FULL_WIDTH = dict(num_attention_heads=24, attention_head_dim=128, num_layers=1, num_single_layers=1,
                  num_refiner_layers=1, rope_axes_dim=(16, 56, 56))


def hunyuan_variant(data_dir: Path, name: str, transformer: dict) -> Path:
    """The folder `data_dir/tiny/<name>`, built on first use from the tiny model with this transformer."""
    from diffusers import HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

    folder = Path(data_dir) / "tiny" / name
    if (folder / tiny.FOLDER_CONFIG).exists():
        return folder
    source = models.tiny_model_dir(data_dir)
    base = HunyuanVideoPipeline.from_pretrained(source)
    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(**_FIXED, **transformer)
    pipe = HunyuanVideoPipeline(**{**base.components, "transformer": model})

    def write(tmp: Path):
        pipe.save_pretrained(tmp)
        shutil.copy(source / tiny.FOLDER_CONFIG, tmp / tiny.FOLDER_CONFIG)

    return tiny._write_atomically(folder, write)
