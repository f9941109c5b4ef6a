"""How much GPU memory a job needs, per model family and memory preset, and which preset fits a card.

Pure arithmetic (no torch): the API checks a job against the GPUs of the live workers with it before
queueing, and the worker picks its `auto` preset with it. The peak of a job is the largest of its phases:

- text encoding: the encoders' weights where they sit on the GPU;
- denoising: the transformer's weights where they sit on the GPU, plus its activations, linear in the
  tokens (latent patches plus the text tokens that join the attention), plus for HunyuanVideo-1.5 the
  dense (B, 1, N, N) boolean masks its attention processor builds in every block;
- VAE decode: the VAE's weights plus one tile's working set and the decoded clip.

`none` keeps every weight resident; `model` holds one component at a time; `group` (leaf level, with the
VAE left out and resident) and `sequential` stream the weights, so only activations count. The constants
come from published peaks (cited where they are defined); `bench/gpu.py --random-weights` prints each
estimate next to the measured peak, to check them on a lent GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 10**9
GiB = 2**30
PRESETS = ("none", "model", "group", "sequential")  # fastest first
HEADROOM = 0.9  # plan within 90% of the memory: the allocator's fragmentation and the CUDA workspaces

# Activations per latent token per channel of transformer width (bytes, bf16), fitted to HunyuanVideo's two
# published peaks with model offload (HunyuanVideo README, "Requirements": 60 GB at 720x1280x129f, 45 GB at
# 544x960x129f): 118,800 and 67,320 tokens, so 15 GB / 51,480 tokens = 291 kB a token at width 3072. The
# fit's intercept, 25.4 GB, is the bf16 transformer (12.82e9 parameters x 2 B = 25.6 GB): the line holds.
ACTIVATION_BYTES = 15 * GB / (118_800 - 67_320) / 3072
# HunyuanVideo's VAE peaks near 34 GiB decoding 720x1280x129 untiled (docs/DESIGN.md): bytes per output
# pixel-frame at fp16, used for one tile of the tiled decode (diffusers' default: 256 px, 16 frames).
VAE_BYTES_PER_PIXEL_FRAME = 34 * GiB / (720 * 1280 * 129) / 2
VAE_TILE = (256, 16)  # (pixels a side, frames): AutoencoderKL*.enable_tiling() defaults in diffusers 0.42.1
# A streaming preset still holds a few layers at once (the one running, the one prefetched) and the
# non-offloaded buffers: 1 GB, pending the GPU bench.
STREAMING_RESIDENT = 1 * GB


@dataclass(frozen=True)
class MemoryModel:
    """What the plan needs to know about one model. Parameter counts are the published configs' (counted
    with diffusers 0.42.1 and transformers on the meta device)."""

    transformer_params: float  # one denoiser
    text_params: float  # every text and image encoder
    vae_params: float
    width: int  # transformer hidden size
    tokens_per_side: int  # pixels per latent token a side: the VAE's spatial compression x the patch
    text_tokens: int  # tokens that join the video tokens in attention (0: cross-attention only)
    # The share of the transformer's parameters that fp8 layerwise casting stores in fp8 (diffusers'
    # `_skip_layerwise_casting_patterns` keep the rest, the AdaLN modulation Linears among them, in the compute
    # dtype): measured by bench/fp8_share.py on the full-size configs (BENCHMARKS.md).
    fp8_share: float
    denoisers: int = 1  # Wan 2.2 A14B: a high-noise and a low-noise expert
    frames_per_token: int = 4  # the VAE's temporal compression
    vae_bytes: int = 2  # fp16/bf16; Wan's VAE runs in fp32
    dense_mask: bool = False  # builds (B, 1, N, N) boolean masks in every block (HunyuanVideo-1.5)

    def tokens(self, width: int, height: int, frames: int) -> int:
        latent_frames = (frames - 1) // self.frames_per_token + 1
        side = self.tokens_per_side
        return latent_frames * -(-height // side) * -(-width // side) + self.text_tokens


# HunyuanVideo: 12.82e9 transformer (bench/gpu.py's published config); Llama-3-8B's LlamaModel 7.51e9 and
# CLIP-L's text model 0.12e9; VAE 0.25e9; 8x VAE, patch 2; text padded to 256 tokens.
HUNYUAN_VIDEO = MemoryModel(12.82e9, 7.63e9, 0.25e9, width=3072, tokens_per_side=16, text_tokens=256,
                            fp8_share=0.709)
# The I2V text encoder is LLaVA (Llama-3-8B with CLIP-L vision and the LM head): about 8.4e9 with CLIP-L text.
HUNYUAN_VIDEO_I2V = MemoryModel(12.82e9, 8.5e9, 0.25e9, width=3072, tokens_per_side=16, text_tokens=256,
                                fp8_share=0.709)  # as t2v's: the same blocks
# HunyuanVideo-1.5: 8.33e9 transformer; Qwen2.5-VL-7B's text model 7.07e9, ByT5-small's encoder 0.15e9, SigLIP
# 0.43e9 (image-to-video); VAE 1.26e9; 16x VAE, patch 1; 1000 + 256 + 729 text, glyph and image tokens (its
# pipeline's maxima).
HUNYUAN_VIDEO_15 = MemoryModel(8.33e9, 7.65e9, 1.26e9, width=2048, tokens_per_side=16, text_tokens=1985,
                               fp8_share=0.654, dense_mask=True)
# Wan 2.2 TI2V-5B: 5.00e9 transformer; UMT5-XXL encoder 5.68e9; Wan 2.2 VAE 0.70e9 (fp32); 16x VAE, patch 2.
WAN_TI2V_5B = MemoryModel(5.00e9, 5.68e9, 0.70e9, width=3072, tokens_per_side=32, text_tokens=0,
                          fp8_share=0.982, vae_bytes=4)
# Wan 2.2 A14B: two 14.29e9 experts; UMT5-XXL 5.68e9; Wan 2.1 VAE 0.127e9 (fp32); 8x VAE, patch 2.
WAN_A14B = MemoryModel(14.29e9, 5.68e9, 0.127e9, width=5120, tokens_per_side=16, text_tokens=0,
                       fp8_share=0.984, denoisers=2, vae_bytes=4)
# Wan 2.1 T2V-1.3B: 1.42e9 transformer (width 1536, 30 layers); UMT5-XXL; Wan 2.1 VAE.
WAN_1_3B = MemoryModel(1.42e9, 5.68e9, 0.127e9, width=1536, tokens_per_side=16, text_tokens=0,
                       fp8_share=0.981, vae_bytes=4)
# LTX-2: 18.88e9 transformer (Lightricks/LTX-2's published config, bench/gpu.py; counted on the meta device);
# Gemma 3 12B as its text encoder (12.2e9, its model card); the video VAE 1.22e9 (AutoencoderKLLTX2Video's
# default config; the audio VAE and vocoder are small beside it); 32x VAE, patch 1, 8 frames a latent; text
# by cross-attention only. Its fp8 share: bench/fp8_share.py.
LTX2 = MemoryModel(18.88e9, 12.2e9, 1.22e9, width=4096, tokens_per_side=32, text_tokens=0, fp8_share=1.0,
                   frames_per_token=8)


@dataclass(frozen=True)
class Estimate:
    """A job's planned peak under one preset, in bytes, and the phase that sets it."""

    preset: str
    peak: int
    phase: str  # "text encoding" | "denoising" | "VAE decode"
    tokens: int
    mask: int  # bytes of HunyuanVideo-1.5's dense masks within the denoising peak

    def fits(self, budget: int) -> bool:
        return self.peak <= budget * HEADROOM


def mask_bytes(model: MemoryModel, tokens: int, varlen: bool) -> int:
    """HunyuanVideo-1.5's processor builds a repeated (B, 1, N, N) bool mask and its AND with the transpose
    (2 N^2 bytes, in every block). A varlen backend reduces that to sequence lengths; PyTorch's SDPA turns
    it into an additive mask in the query's dtype (its logical_not, 1 byte, and the bf16 mask, 2 bytes)."""
    if not model.dense_mask:
        return 0
    return tokens * tokens * (2 if varlen else 5)


def vae_decode_bytes(model: MemoryModel, width: int, height: int, frames: int, tiled: bool = True) -> int:
    """One tile's working set (the whole clip untiled) and the decoded clip, held in the VAE's dtype and as
    the float32 video the pipeline post-processes."""
    per_pixel_frame = VAE_BYTES_PER_PIXEL_FRAME * model.vae_bytes
    side, tile_frames = VAE_TILE
    work = (min(side, width) * min(side, height) * min(tile_frames, frames) if tiled else width * height * frames)
    clip = width * height * frames * 3 * (model.vae_bytes + 4)
    return int(work * per_pixel_frame + clip)


def transformer_weight_bytes(model: MemoryModel, fp8: bool) -> int:
    """One denoiser in bf16, or with `fp8_share` of it stored in fp8 (1 byte) by layerwise casting."""
    per_param = 2 - model.fp8_share if fp8 else 2
    return int(model.transformer_params * per_param)


def estimate(model: MemoryModel, preset: str, width: int, height: int, frames: int, *, fp8: bool = False,
             varlen: bool = True, tiled: bool = True) -> Estimate:
    """The planned peak of one job (batch 1) under `preset`. `varlen`: a masked model runs a varlen attention
    backend (flash_varlen) rather than PyTorch's SDPA."""
    if preset not in PRESETS:
        raise ValueError(f"unknown memory preset {preset!r}")
    tokens = model.tokens(width, height, frames)
    mask = mask_bytes(model, tokens, varlen)
    activations = int(tokens * model.width * ACTIVATION_BYTES) + mask
    decode = vae_decode_bytes(model, width, height, frames, tiled)
    one_denoiser = transformer_weight_bytes(model, fp8)
    text, vae = int(model.text_params * 2), int(model.vae_params * model.vae_bytes)
    if preset == "none":
        resident = one_denoiser * model.denoisers + text + vae
        phases = {"text encoding": resident, "denoising": resident + activations, "VAE decode": resident + decode}
    elif preset == "model":
        phases = {"text encoding": text, "denoising": one_denoiser + activations, "VAE decode": vae + decode}
    else:  # group keeps the VAE resident (it is left out of group offload); sequential streams it too
        kept = vae if preset == "group" else 0
        phases = {"text encoding": kept + STREAMING_RESIDENT, "denoising": kept + STREAMING_RESIDENT + activations,
                  "VAE decode": (kept or STREAMING_RESIDENT) + decode}
    phase = max(phases, key=phases.get)
    return Estimate(preset, phases[phase], phase, tokens, mask)


def choose_preset(model: MemoryModel, width: int, height: int, frames: int, budget: int | None,
                  **options) -> str | None:
    """The fastest preset whose plan fits `budget` bytes (a card's free memory); None when none fits.
    Without a budget (no GPU, or none reported) every job fits and the fastest preset is named."""
    if budget is None:
        return PRESETS[0]
    return next((p for p in PRESETS if estimate(model, p, width, height, frames, **options).fits(budget)), None)


def what_fits(entry, width: int, height: int, frames: int, budget: int) -> str:
    """For a refusal: the smallest preset's plan, and what would fit `budget` instead (fewer frames at this
    size, or a smaller one of the entry's size presets at these frames), each with the preset it would get."""
    model, last = entry.memory, PRESETS[-1]
    need = estimate(model, last, width, height, frames)
    hints = []
    valid = range(frames - entry.frame_multiple, 0, -entry.frame_multiple)  # frame_multiple * k + 1, descending
    fewer = next((f for f in valid if choose_preset(model, width, height, f, budget)), None)
    if fewer:
        hints.append(f"{fewer} frames at {width}x{height} ({choose_preset(model, width, height, fewer, budget)})")
    smaller = [p for p in sorted(entry.presets, key=lambda p: p.width * p.height, reverse=True)
               if p.width * p.height < width * height and choose_preset(model, p.width, p.height, frames, budget)]
    if smaller:
        p = smaller[0]
        preset = choose_preset(model, p.width, p.height, frames, budget)
        hints.append(f"{p.width}x{p.height} at {frames} frames ({preset})")
    fits = "; it would fit with " + " or ".join(hints) if hints else "; no size or length of this model fits"
    return (f"{entry.id} at {width}x{height}, {frames} frames needs about {need.peak / GB:.0f} GB of GPU memory "
            f"even with the {last} preset (peak in {need.phase}), and the largest GPU of a live worker has "
            f"{budget / GB:.0f} GB{fits}")


def gpu_total_bytes(settings) -> int | None:
    """The memory of a worker's GPU, which it reports with `worker_seen` so the API can refuse a job that fits
    no live worker's GPU. None on the CPU, and for tiny builds, which the plan of their full model does not
    describe (torch is imported only for a CUDA device)."""
    device = settings.device
    if not device.startswith("cuda") or settings.model.split(":")[0] == "tiny":
        return None
    import torch

    return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
