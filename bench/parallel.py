"""One clip on 1 rank against N ranks: context parallel (pipeline/parallel.py) on the CPU, or on N GPUs.

CPU (the default): a random-weight Wan transformer sized so attention dominates (4096 video tokens, model width
128), timed as one forward per denoising step on 1 rank, then on 2 gloo ranks, in one run; each rank is one
process with one thread (one rank stands for one device). Also the cost of the cancel check a group makes before
every transformer block (`Group.agreed`: one gloo broadcast of one byte).

--gpu N: HunyuanVideo's full-size transformer (bf16, the published config, random weights, nothing downloaded)
at 1280x720 and 129 frames, mask-free 32-token prompt, on 1 GPU and on N GPUs (NCCL): seconds per step, and
50 steps projected end to end (the VAE decode is not split: rank 0 decodes, timed once on GPU 0). Compare
with xDiT's published HunyuanVideo figures (1904 s on one H100, 337.6 s on eight with Ulysses).

    python bench/parallel.py                       # CPU, 1 rank against 2
    python bench/parallel.py --gpu 8 --steps 3     # 1 GPU against 8, 3 timed steps each
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from pipeline import parallel  # noqa: E402
from pipeline.generate import _BlockHook  # noqa: E402

# Attention-bound on the CPU: 4 frames x 32 x 32 latent patches of (1, 2, 2) -> 4096 tokens, width 4 x 32 = 128.
CPU_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
               text_dim=64, freq_dim=32, ffn_dim=256, num_layers=2, cross_attn_norm=True, rope_max_seq_len=256)
CPU_LATENT = (1, 16, 4, 64, 64)
GPU_SIZE = (1280, 720, 129)  # width, height, frames: xDiT's published HunyuanVideo row
PROJECTED_STEPS = 50


def cpu_model():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)  # the same weights on every rank
    return WanTransformer3DModel(**CPU_WAN).eval()


def cpu_inputs():
    generator = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(CPU_LATENT, generator=generator),
                timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 32, CPU_WAN["text_dim"], generator=generator), return_dict=False)


def gpu_model(device):
    from diffusers import HunyuanVideoTransformer3DModel
    from gpu import TRANSFORMER, build_random  # bench/gpu.py: the published config, random weights on the GPU

    return build_random(HunyuanVideoTransformer3DModel, TRANSFORMER, device, torch.bfloat16)


def gpu_inputs(device):
    width, height, frames = GPU_SIZE
    generator = torch.Generator(device).manual_seed(1)
    shape = (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
    return dict(hidden_states=torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16),
                timestep=torch.tensor([500], device=device),
                encoder_hidden_states=torch.randn(1, 32, 4096, generator=generator, device=device,
                                                  dtype=torch.bfloat16),
                encoder_attention_mask=torch.ones(1, 32, device=device, dtype=torch.bool),
                pooled_projections=torch.randn(1, 768, generator=generator, device=device, dtype=torch.bfloat16),
                guidance=torch.tensor([6000.0], device=device, dtype=torch.bfloat16), return_dict=False)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rank(rank: int, size: int, init: str, device_kind: str, steps: int, out: str) -> None:
    """One rank: join (when size > 1), build, split, warm up one step, time `steps` steps."""
    torch.set_num_threads(1)
    device = f"cuda:{rank}" if device_kind == "cuda" else "cpu"
    group = parallel.join(rank, size, init, device) if size > 1 else None
    with torch.inference_mode():
        model = gpu_model(torch.device(device)) if device_kind == "cuda" else cpu_model()
        inputs = gpu_inputs(torch.device(device)) if device_kind == "cuda" else cpu_inputs()
        blocks = _BlockHook()  # as the service runs: the all-ones mask of a trimmed prompt never reaches attention
        blocks.install(model)
        blocks.drop_mask = True
        if group:
            parallel.split(model, group, "native", masked=False)
        model(**inputs)  # warm-up
        sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            model(**inputs)
        sync(device)
        per_step = (time.perf_counter() - started) / steps
        check_s = None
        if group:
            check, calls = group.agreed(lambda: False), 2000
            started = time.perf_counter()
            for _ in range(calls):
                check()
            check_s = (time.perf_counter() - started) / calls
    if rank == 0:
        Path(out).write_text(json.dumps({"ranks": size, "s_per_step": per_step, "cancel_check_s": check_s}))
    if group:
        parallel.leave()


def measure(size: int, device_kind: str, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "result.json")
        init = f"file://{Path(folder) / 'rendezvous'}"
        mp.spawn(_rank, args=(size, init, device_kind, steps, out), nprocs=size, join=True)
        return json.loads(Path(out).read_text())


def gpu_decode_s() -> float:
    """One tiled VAE decode of the whole 1280x720x129 latent on GPU 0 (random weights, fp16)."""
    from diffusers import AutoencoderKLHunyuanVideo
    from gpu import VAE, build_random

    device = torch.device("cuda:0")
    vae = build_random(AutoencoderKLHunyuanVideo, VAE, device, torch.float16)
    vae.enable_tiling()
    width, height, frames = GPU_SIZE
    latents = torch.randn(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8, device=device, dtype=torch.float16)
    with torch.inference_mode():
        torch.cuda.synchronize()
        started = time.perf_counter()
        vae.decode(latents)
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", type=int, metavar="N", help="1 GPU against N GPUs (full-size HunyuanVideo)")
    parser.add_argument("--ranks", type=int, default=2, help="CPU: the group's size (default 2)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    kind, size = ("cuda", args.gpu) if args.gpu else ("cpu", args.ranks)
    rows = [measure(1, kind, args.steps)] + ([measure(size, kind, args.steps)] if size > 1 else [])
    decode = gpu_decode_s() if kind == "cuda" else None
    for row in rows:
        row["speed-up"] = round(rows[0]["s_per_step"] / row["s_per_step"], 2)
        if decode is not None:
            row["end_to_end_50_steps_s"] = round(PROJECTED_STEPS * row["s_per_step"] + decode, 1)
        print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps({"device": kind, "rows": rows, "decode_s": decode}, indent=2))


if __name__ == "__main__":
    main()
