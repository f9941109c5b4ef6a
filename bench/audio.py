"""What LTX-2's sound costs beside its video on the CPU: the audio path (decode + mux) against the video path.

Each figure is the median of --repeats runs, after one untimed warm-up.

- tiny: the tiny LTX-2 build (pipeline/tiny.py) at --tiny-size, --frames frames, through the service's own
  functions, from the latents of one denoise: the video path is `decode_ltx2_video` + `encode_stream` (H.264),
  the audio path `decode_ltx2_audio` + `mux_waveform` (AAC beside a copy of the video's packets).
- full-size audio: AutoencoderKLLTX2Audio and LTX2Vocoder at their default configs (LTX-2's: 16 kHz mel at
  hop 160, 64 mel bins, 8 latent channels; a 240x vocoder to 24 kHz stereo), random weights, decoding the audio
  latents of a --frames clip at 24 fps, then the AAC mux; against the H.264 encode of --frames synthetic frames
  at --size. The full-size video VAE decode is left out (minutes a clip on a CPU), so this ratio is the audio
  path against the video encode alone: an upper bound of the share sound adds to the video path.

    python bench/audio.py                          # 121 frames (5 s at 24 fps), 768x512
    python bench/audio.py --frames 49 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.families import decode_ltx2_audio, decode_ltx2_video  # noqa: E402
from pipeline.generate import to_uint8_frames  # noqa: E402
from pipeline.models import tiny_model_dir  # noqa: E402
from pipeline.run import encode_stream  # noqa: E402
from pipeline.video import Audio, mux_waveform  # noqa: E402

FPS = 24


def median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def tiny_row(folder: Path, frames: int, size: int, repeats: int) -> dict:
    from diffusers import LTX2Pipeline

    pipe = LTX2Pipeline.from_pretrained(tiny_model_dir(folder, "ltx-2.3"))
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        out = pipe(prompt="a red fox barks", width=size, height=size, num_frames=frames, frame_rate=float(FPS),
                   num_inference_steps=2, max_sequence_length=16, output_type="latent",
                   generator=torch.Generator().manual_seed(0))
    video_mp4, with_sound = folder / "tiny.mp4", folder / "tiny-sound.mp4"

    def video_path():
        with torch.inference_mode():
            clip = to_uint8_frames(decode_ltx2_video(pipe, out.frames))
        encode_stream(iter(clip), video_mp4, FPS, 18)

    def audio_path():
        with torch.inference_mode():
            sound = decode_ltx2_audio(pipe, out.audio).fitted(frames, FPS)
        mux_waveform(video_mp4, sound, with_sound)

    video_s = median_s(video_path, repeats)
    audio_s = median_s(audio_path, repeats)
    return dict(row="tiny build", clip=f"{size}x{size}, {frames} frames", video_s=video_s, audio_s=audio_s)


def full_audio_row(folder: Path, frames: int, width: int, height: int, repeats: int) -> dict:
    from diffusers import AutoencoderKLLTX2Audio
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    torch.manual_seed(0)
    audio_vae, vocoder = AutoencoderKLLTX2Audio().eval(), LTX2Vocoder().eval()
    cfg = audio_vae.config
    per_second = cfg.sample_rate / cfg.mel_hop_length / audio_vae.temporal_compression_ratio
    length = round(frames / FPS * per_second)  # as LTX2Pipeline sizes its audio latents
    latents = torch.randn(1, cfg.latent_channels, length, cfg.mel_bins // audio_vae.mel_compression_ratio)
    y, x = np.mgrid[0:height, 0:width]
    clip = np.stack([np.stack([(x + 3 * i) % 256, (y + i) % 256, (x + y) % 256], -1).astype(np.uint8)
                     for i in range(frames)])
    video_mp4, with_sound = folder / "full.mp4", folder / "full-sound.mp4"

    def video_encode():
        encode_stream(iter(clip), video_mp4, FPS, 18)

    def audio_path():
        with torch.inference_mode():
            mel = audio_vae.decode(latents, return_dict=False)[0]
            waveform = vocoder(mel)[0]
        sound = Audio(waveform.float().numpy(), vocoder.config.output_sampling_rate).fitted(frames, FPS)
        mux_waveform(video_mp4, sound, with_sound)

    video_s = median_s(video_encode, repeats)
    audio_s = median_s(audio_path, repeats)
    return dict(row="full-size audio, video encode only", clip=f"{width}x{height}, {frames} frames",
                video_s=video_s, audio_s=audio_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--frames", type=int, default=121, help="clip length, 8k+1")
    parser.add_argument("--size", default="768x512", help="full-size row: WxH of the encoded video")
    parser.add_argument("--tiny-size", type=int, default=64, help="tiny row: side, a multiple of 32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    width, height = map(int, args.size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        rows = [tiny_row(Path(tmp), args.frames, args.tiny_size, args.repeats),
                full_audio_row(Path(tmp), args.frames, width, height, args.repeats)]
    print(f"torch threads: {torch.get_num_threads()}")
    print("| row | clip | video path (s) | audio path (s) | audio / video |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['clip']} | {r['video_s']:.3f} | {r['audio_s']:.3f} | "
              f"{r['audio_s'] / r['video_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
