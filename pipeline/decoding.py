"""The VAE decode as a stage of its own: how many decoder calls (tiles, frame batches) a decode makes, and a
context that reports them while a job runs, whether the decode runs in t2v or inside the pipeline's call."""

from __future__ import annotations

import contextlib


def decoder_calls(vae, latents_shape) -> int | None:
    """How many times the VAE's decoder runs for latents of this shape (one per tile and frame batch), for
    the decoding stage's progress: HunyuanVideo's VAE, by the loops of diffusers 0.42.1's
    `AutoencoderKLHunyuanVideo._decode` and its tiled decoders. None for a VAE whose count is not known."""
    if type(vae).__name__ != "AutoencoderKLHunyuanVideo":
        return None
    frames, height, width = latents_shape[2:]
    space, time_ = vae.spatial_compression_ratio, vae.temporal_compression_ratio
    tile_h, tile_w = vae.tile_sample_min_height // space, vae.tile_sample_min_width // space
    tiles = 1
    if vae.use_tiling and (width > tile_w or height > tile_h):
        tiles = (len(range(0, height, vae.tile_sample_stride_height // space))
                 * len(range(0, width, vae.tile_sample_stride_width // space)))
    if vae.use_framewise_decoding and frames > vae.tile_sample_min_num_frames // time_:
        return tiles * len(range(0, frames, vae.tile_sample_stride_num_frames // time_))
    return tiles


@contextlib.contextmanager
def reported(vae, on_decode):
    """Report the VAE decode, wherever it runs (in t2v or inside the pipeline's call), as `on_decode(done, total)`:
    0/total as it starts, then after each decoder call (a tile or frame batch) where `decoder_calls` knows the
    count, and total/total when it ends."""
    decoder = getattr(vae, "decoder", None)
    if on_decode is None or decoder is None:
        yield
        return
    count = {"done": 0, "total": 1}
    real = vae.decode

    def decode(z, *args, **kwargs):
        count.update(done=0, total=decoder_calls(vae, z.shape) or 1)
        on_decode(0, count["total"])
        result = real(z, *args, **kwargs)
        on_decode(count["total"], count["total"])
        return result

    def counted(module, args):
        count["done"] += 1
        if count["done"] < count["total"]:
            on_decode(count["done"], count["total"])

    handle = decoder.register_forward_pre_hook(counted)
    vae.decode = decode
    try:
        yield
    finally:
        handle.remove()
        del vae.decode
