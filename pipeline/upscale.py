"""Real-ESRGAN-family upscaling on spandrel: load release weights, batch frames, tile, survive OOM.

spandrel reads the official release files as they are (RRDBNet under `params_ema`, SRVGGNetCompact
under `params`) and detects the architecture and scale from the weights. This module adds what a
video needs: device and dtype choice, batches of frames, tiles with padding, a retry with smaller
tiles on CUDA out-of-memory, resizing to a non-native output scale, and the memory format
(channels_last or not) that is faster on the device (measured in BENCHMARKS.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import tiny
from pipeline.loading import model_construction

log = logging.getLogger(__name__)

MIN_TILE = 32
WEIGHT_SUFFIXES = (".pth", ".safetensors")


@dataclass(frozen=True)
class Release:
    filename: str
    url: str
    sha256: str | None  # None: no published checksum known to t2v, so download.py will not fetch it


_BASE = "https://github.com/xinntao/Real-ESRGAN/releases/download"
RELEASES = {
    "RealESRGAN_x4plus": Release(
        "RealESRGAN_x4plus.pth", f"{_BASE}/v0.1.0/RealESRGAN_x4plus.pth",
        "4fa0d38905f75ac06eb49a7951b426670021be3018265fd191d2125df9d682f1"),
    "RealESRGAN_x2plus": Release(
        "RealESRGAN_x2plus.pth", f"{_BASE}/v0.2.1/RealESRGAN_x2plus.pth", None),
    "realesr-animevideov3": Release(
        "realesr-animevideov3.pth", f"{_BASE}/v0.2.5.0/realesr-animevideov3.pth",
        "b8a8376811077954d82ca3fcf476f1ac3da3e8a68a4f4d71363008000a18b75d"),
    "realesr-general-x4v3": Release(
        "realesr-general-x4v3.pth", f"{_BASE}/v0.2.5.0/realesr-general-x4v3.pth",
        "8dc7edb9ac80ccdc30c3a5dca6616509367f05fbc184ad95b731f05bece96292"),
}


# Whether weights and frames go channels_last (NHWC), per device type: the faster of the two as
# measured by `bench/upscale.py --formats` (BENCHMARKS.md). CUDA: cuDNN's fp16 convolutions run on
# tensor cores in NHWC, and NCHW costs a transpose around each.
CHANNELS_LAST = {"cpu": True, "cuda": True}


class UpscalerLoadError(ValueError):
    """The weight file is missing, corrupt or of an unknown architecture. The message names the file."""


def resolve_upscaler(name_or_path: str, models_dir: Path, data_dir: Path, none_ok: bool = True) -> Path | None:
    """`none` -> None; `tiny` -> the tiny weights; a known release name -> its file in `models_dir`; else a path.
    `none_ok=False` where upscaling is the whole job."""
    if name_or_path == "none" and none_ok:
        return None
    if name_or_path == "tiny":
        return tiny.tiny_upscaler_path(data_dir)
    release = RELEASES.get(name_or_path)
    path = Path(models_dir) / release.filename if release else Path(name_or_path)
    if path.is_file() and name_or_path != "none":
        return path
    raise UpscalerLoadError(_not_found(name_or_path, path, models_dir, none_ok))


def _not_found(name: str, path: Path, models_dir: Path, none_ok: bool) -> str:
    """What to do about missing weights: the download.py command where it can check the release file, the
    release URL where it cannot, else the names accepted."""
    release_name = next((n for n, r in RELEASES.items() if name == n or path.name == r.filename), None)
    release = RELEASES.get(release_name)
    if release and release.sha256:
        folder = "" if path.parent == Path(models_dir) else f" --dir {path.parent}"
        return f"upscaler weights {path} not found; run `python download.py --only {release_name}{folder}`"
    if release:
        return (f"upscaler weights {path} not found; download.py cannot fetch {release_name} (no published sha256 "
                f"to check it against): download {release.url} yourself and save it as {path}")
    accepted = (f"accepted: a .pth or .safetensors file, a release name ({', '.join(RELEASES)}) in {models_dir} "
                "(`python download.py --list` shows which are there), tiny" + (", none" if none_ok else ""))
    if name == "none":
        return f"upscaler none leaves nothing to do here; {accepted}"
    if path.suffix.lower() not in WEIGHT_SUFFIXES and len(path.parts) == 1:
        return f"upscaler {name!r} is neither a weight file nor a name t2v knows; {accepted}"
    return f"upscaler weights {path} not found; {accepted}"


class Upscaler:
    """A loaded upscaler. `upscale()` takes a batch of uint8 frames; `stream()` takes an iterable of them."""

    def __init__(self, path: Path, device: str = "cpu", half: bool | None = None, tile: int = 0,
                 tile_pad: int = 16, batch: int = 4, channels_last: bool | None = None):
        import spandrel

        path = Path(path)
        if path.suffix.lower() not in WEIGHT_SUFFIXES:
            # spandrel would load a .pt as TorchScript, which can carry code; .pth goes through its
            # allow-listed unpickler, and .safetensors holds tensors only.
            raise UpscalerLoadError(f"upscaler weights {path}: only .pth and .safetensors files are loaded")
        try:
            with model_construction():  # built while another thread's load patched torch.nn, it would be on meta
                descriptor = spandrel.ModelLoader().load_from_file(path)
        except FileNotFoundError:
            raise UpscalerLoadError(f"upscaler weights {path} not found") from None
        except spandrel.UnsupportedModelError:
            raise UpscalerLoadError(f"upscaler weights {path}: architecture not recognised by spandrel") from None
        except Exception as exc:  # torch.load and safetensors raise many kinds on a damaged file
            raise UpscalerLoadError(f"upscaler weights {path} could not be read ({type(exc).__name__}: {exc})") from None
        if not isinstance(descriptor, spandrel.ImageModelDescriptor):
            raise UpscalerLoadError(f"upscaler weights {path} are a {descriptor.architecture.name} model, not an upscaler")

        if half is None:  # fp16 where it pays and the architecture supports it
            half = device.startswith("cuda") and descriptor.supports_half
        self.dtype = torch.float16 if half else torch.float32
        self.device = device
        if channels_last is None:
            channels_last = CHANNELS_LAST.get(torch.device(device).type, False)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = descriptor.to(device).to(self.dtype).eval()
        self.model.model.to(memory_format=self.memory_format)
        self.scale = descriptor.scale
        self.architecture = descriptor.architecture.name
        self.path = path
        self.tile = tile
        self.tile_pad = tile_pad
        self.batch = batch

    def upscale(self, frames: np.ndarray, outscale: int | None = None) -> np.ndarray:
        """uint8 (N, H, W, 3) -> uint8 (N, H*outscale, W*outscale, 3). Every frame comes back, in order."""
        outscale = outscale or self.scale
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)
        x = x.permute(0, 3, 1, 2).to(self.dtype).div_(255).contiguous(memory_format=self.memory_format)
        with torch.inference_mode():
            y = self._run_with_oom_retry(x)
            h, w = frames.shape[1] * outscale, frames.shape[2] * outscale
            if y.shape[-2:] != (h, w):
                y = F.interpolate(y.float(), size=(h, w), mode="bicubic", antialias=True, align_corners=False)
            y = y.float().clamp_(0, 1).mul_(255).round_().to(torch.uint8)
        return y.permute(0, 2, 3, 1).contiguous().cpu().numpy()

    def stream(self, frames: Iterable[np.ndarray], outscale: int | None = None) -> Iterator[np.ndarray]:
        """Upscale an iterable of uint8 (H, W, 3) frames in batches, yielding them one by one."""
        pending = []
        for frame in frames:
            pending.append(frame)
            if len(pending) == self.batch:
                yield from self.upscale(np.stack(pending), outscale)
                pending.clear()
        if pending:
            yield from self.upscale(np.stack(pending), outscale)

    def _run_with_oom_retry(self, x: torch.Tensor) -> torch.Tensor:
        """Run the batch; on CUDA OOM halve the tile (starting from the frame size) and retry the same batch."""
        tile, side = self.tile, max(x.shape[-2:])
        while True:
            try:
                return self._run(x, tile)
            except torch.OutOfMemoryError:
                if x.is_cuda:
                    torch.cuda.empty_cache()
                tile = min(tile or side, side) // 2  # a tile larger than the frame was a whole-frame run
                if tile < MIN_TILE:
                    raise
                log.warning("out of GPU memory while upscaling; retrying the same batch with %dpx tiles", tile)
                self.tile = tile  # later batches start from the size that fitted

    def _run(self, x: torch.Tensor, tile: int) -> torch.Tensor:
        if not tile or (x.shape[-2] <= tile and x.shape[-1] <= tile):
            return self.model(x)
        return self._run_tiled(x, tile)

    def _run_tiled(self, x: torch.Tensor, tile: int) -> torch.Tensor:
        """Upscale tile by tile; each tile sees `tile_pad` extra pixels of context, cropped off after."""
        n, c, h, w = x.shape
        s, pad = self.scale, self.tile_pad
        out = torch.empty((n, c, h * s, w * s), dtype=x.dtype, device=x.device, memory_format=self.memory_format)
        for top in range(0, h, tile):
            for left in range(0, w, tile):
                bottom, right = min(top + tile, h), min(left + tile, w)
                t0, l0 = max(top - pad, 0), max(left - pad, 0)
                b0, r0 = min(bottom + pad, h), min(right + pad, w)
                y = self.model(x[:, :, t0:b0, l0:r0].contiguous(memory_format=self.memory_format))
                out[:, :, top * s:bottom * s, left * s:right * s] = y[
                    :, :, (top - t0) * s:(bottom - t0) * s, (left - l0) * s:(right - l0) * s]
        return out
