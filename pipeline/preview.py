"""Previews while denoising: the current latents -> a small animated WebP, with no VAE decode and no extra weights.

A preview is a linear map from the latent channels to RGB, one table per latent format, the way ComfyUI's
"Latent2RGB" previews work. ComfyUI publishes a (channels x 3) factor table and an RGB bias per format in
`comfy/latent_formats.py` (github.com/Comfy-Org/ComfyUI, formerly comfyanonymous/ComfyUI; the numbers below
were read at commit 75399d7), and maps the result from [-1, 1] to [0, 255] (`latent_preview.py`). The tables
apply to latents as the denoiser sees them, which is how diffusers' pipelines hold them: HunyuanVideo's
scaled by the VAE's scaling_factor (0.476986), HunyuanVideo-1.5's by 1.03682, Wan's normalized by the VAE's
per-channel mean and std; ComfyUI's `process_in` for each format is that same transform.

The map is applied to every latent frame (ComfyUI shows the first only), so the preview moves: one WebP frame
per latent frame, each shown for its share of the clip. It previews the latents as they are after a step
(noise fading into the picture), not an estimate of the finished video.

Tiny builds have latent widths of their own (4 channels for the tiny HunyuanVideo and HunyuanVideo-1.5) and no
published table: for those, `channel_projection` is a fixed rule of our own (channel c feeds colour c mod 3).
It shows nothing meaningful; it exists so tests exercise the same path as the real models.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

MAX_SIDE = 256  # a preview's longest side, in pixels
WEBP_QUALITY = 60
WEBP_METHOD = 0  # the fastest WebP encoder setting; a preview is replaced a few steps later

# ComfyUI's `HunyuanVideo` latent format (16 channels).
HUNYUAN_VIDEO = (
    [[-0.0395, -0.0331, 0.0445], [0.0696, 0.0795, 0.0518], [0.0135, -0.0945, -0.0282], [0.0108, -0.0250, -0.0765],
     [-0.0209, 0.0032, 0.0224], [-0.0804, -0.0254, -0.0639], [-0.0991, 0.0271, -0.0669], [-0.0646, -0.0422, -0.0400],
     [-0.0696, -0.0595, -0.0894], [-0.0799, -0.0208, -0.0375], [0.1166, 0.1627, 0.0962], [0.1165, 0.0432, 0.0407],
     [-0.2315, -0.1920, -0.1355], [-0.0270, 0.0401, -0.0821], [-0.0616, -0.0997, -0.0727], [0.0249, -0.0469, -0.1703]],
    [0.0259, -0.0192, -0.0761],
)
# ComfyUI's `Wan21` (16 channels): the Wan 2.1 VAE, which Wan 2.1 and the Wan 2.2 A14B models share.
WAN21 = (
    [[-0.1299, -0.1692, 0.2932], [0.0671, 0.0406, 0.0442], [0.3568, 0.2548, 0.1747], [0.0372, 0.2344, 0.1420],
     [0.0313, 0.0189, -0.0328], [0.0296, -0.0956, -0.0665], [-0.3477, -0.4059, -0.2925], [0.0166, 0.1902, 0.1975],
     [-0.0412, 0.0267, -0.1364], [-0.1293, 0.0740, 0.1636], [0.0680, 0.3019, 0.1128], [0.0032, 0.0581, 0.0639],
     [-0.1251, 0.0927, 0.1699], [0.0060, -0.0633, 0.0005], [0.3477, 0.2275, 0.2950], [0.1984, 0.0913, 0.1861]],
    [-0.1835, -0.0868, -0.3360],
)
# ComfyUI's `Wan22` (48 channels): the Wan 2.2 VAE of Wan2.2-TI2V-5B.
WAN22 = (
    [[0.0119, 0.0103, 0.0046], [-0.1062, -0.0504, 0.0165], [0.0140, 0.0409, 0.0491], [-0.0813, -0.0677, 0.0607],
     [0.0656, 0.0851, 0.0808], [0.0264, 0.0463, 0.0912], [0.0295, 0.0326, 0.0590], [-0.0244, -0.0270, 0.0025],
     [0.0443, -0.0102, 0.0288], [-0.0465, -0.0090, -0.0205], [0.0359, 0.0236, 0.0082], [-0.0776, 0.0854, 0.1048],
     [0.0564, 0.0264, 0.0561], [0.0006, 0.0594, 0.0418], [-0.0319, -0.0542, -0.0637], [-0.0268, 0.0024, 0.0260],
     [0.0539, 0.0265, 0.0358], [-0.0359, -0.0312, -0.0287], [-0.0285, -0.1032, -0.1237], [0.1041, 0.0537, 0.0622],
     [-0.0086, -0.0374, -0.0051], [0.0390, 0.0670, 0.2863], [0.0069, 0.0144, 0.0082], [0.0006, -0.0167, 0.0079],
     [0.0313, -0.0574, -0.0232], [-0.1454, -0.0902, -0.0481], [0.0714, 0.0827, 0.0447], [-0.0304, -0.0574, -0.0196],
     [0.0401, 0.0384, 0.0204], [-0.0758, -0.0297, -0.0014], [0.0568, 0.1307, 0.1372], [-0.0055, -0.0310, -0.0380],
     [0.0239, -0.0305, 0.0325], [-0.0663, -0.0673, -0.0140], [-0.0416, -0.0047, -0.0023], [0.0166, 0.0112, -0.0093],
     [-0.0211, 0.0011, 0.0331], [0.1833, 0.1466, 0.2250], [-0.0368, 0.0370, 0.0295], [-0.3441, -0.3543, -0.2008],
     [-0.0479, -0.0489, -0.0420], [-0.0660, -0.0153, 0.0800], [-0.0101, 0.0068, 0.0156], [-0.0690, -0.0452, -0.0927],
     [-0.0145, 0.0041, 0.0015], [0.0421, 0.0451, 0.0373], [0.0504, -0.0483, -0.0356], [-0.0837, 0.0168, 0.0055]],
    [0.0317, -0.0878, -0.1388],
)
# ComfyUI's `HunyuanVideo15` (32 channels).
HUNYUAN_VIDEO_15 = (
    [[0.0568, -0.0521, -0.0131], [0.0014, 0.0735, 0.0326], [0.0186, 0.0531, -0.0138], [-0.0031, 0.0051, 0.0288],
     [0.0110, 0.0556, 0.0432], [-0.0041, -0.0023, -0.0485], [0.0530, 0.0413, 0.0253], [0.0283, 0.0251, 0.0339],
     [0.0277, -0.0372, -0.0093], [0.0393, 0.0944, 0.1131], [0.0020, 0.0251, 0.0037], [-0.0017, 0.0012, 0.0234],
     [0.0468, 0.0436, 0.0203], [0.0354, 0.0439, -0.0233], [0.0090, 0.0123, 0.0346], [0.0382, 0.0029, 0.0217],
     [0.0261, -0.0300, 0.0030], [-0.0088, -0.0220, -0.0283], [-0.0272, -0.0121, -0.0363], [-0.0664, -0.0622, 0.0144],
     [0.0414, 0.0479, 0.0529], [0.0355, 0.0612, -0.0247], [0.0147, 0.0264, 0.0174], [0.0438, 0.0038, 0.0542],
     [0.0431, -0.0573, -0.0033], [-0.0162, -0.0211, -0.0406], [-0.0487, -0.0295, -0.0393], [0.0005, -0.0109, 0.0253],
     [0.0296, 0.0591, 0.0353], [0.0119, 0.0181, -0.0306], [-0.0085, -0.0362, 0.0229], [0.0005, -0.0106, 0.0242]],
    [0.0456, -0.0202, -0.0644],
)
# (registry family, latent channels) -> (factors, bias). Wan's two VAEs differ in width, so the width picks one.
PUBLISHED = {("hunyuanvideo", 16): HUNYUAN_VIDEO, ("wan", 16): WAN21, ("wan", 48): WAN22,
             ("hunyuanvideo15", 32): HUNYUAN_VIDEO_15}


@dataclass(frozen=True)
class Projection:
    weights: torch.Tensor  # (channels, 3)
    bias: torch.Tensor  # (3,)
    published: bool  # ComfyUI's table, or our own rule for a latent width with none (tiny builds)


def projection(family: str, channels: int) -> Projection:
    """The latent-to-RGB map for a family's latents of this width."""
    table = PUBLISHED.get((family, channels))
    if table is None:
        return Projection(channel_projection(channels), torch.zeros(3), published=False)
    factors, bias = table
    return Projection(torch.tensor(factors), torch.tensor(bias), published=True)


def channel_projection(channels: int) -> torch.Tensor:
    """Our own fixed rule for latents with no published table: channel c feeds colour c mod 3, averaged."""
    weights = torch.zeros(channels, 3)
    weights[torch.arange(channels), torch.arange(channels) % 3] = 1.0
    return weights / weights.sum(0).clamp(min=1.0)


def preview_frames(latents: torch.Tensor, family: str, max_side: int = MAX_SIDE) -> np.ndarray:
    """Latents (batch, channels, frames, height, width) -> uint8 RGB frames (frames, h, w, 3) of the first video,
    at the latents' own size, or smaller so that the longest side is at most `max_side`.

    The projection and the resize run where the latents are (the GPU), so only the small frames are copied."""
    video = latents[0].float()  # (C, F, H, W)
    proj = projection(family, video.shape[0])
    rgb = torch.einsum("cfhw,cr->frhw", video, proj.weights.to(video.device))
    rgb.add_(proj.bias.to(video.device)[None, :, None, None])
    height, width = rgb.shape[-2:]
    scale = min(1.0, max_side / max(height, width))
    if scale < 1.0:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        rgb = torch.nn.functional.interpolate(rgb, size=size, mode="area")
    pixels = rgb.add_(1).mul_(127.5).clamp_(0, 255).round_().to(torch.uint8)  # [-1, 1] -> [0, 255]
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def encode_webp(frames: np.ndarray, frame_ms: int) -> bytes:
    """Frames (F, H, W, 3) uint8 -> an animated WebP that loops, each frame shown `frame_ms`."""
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    out = io.BytesIO()
    images[0].save(out, format="WEBP", save_all=True, append_images=images[1:], duration=max(int(frame_ms), 1),
                   loop=0, quality=WEBP_QUALITY, method=WEBP_METHOD)
    return out.getvalue()


def every_n_steps(every: int, family: str, on_preview: Callable[[int, int, np.ndarray], None]):
    """A step callback (step, total, latents) that hands `on_preview(step, total, frames)` a preview every
    `every` steps."""
    def on_latents(step: int, total: int, latents: torch.Tensor) -> None:
        if step % every == 0:
            on_preview(step, total, preview_frames(latents, family))

    return on_latents
