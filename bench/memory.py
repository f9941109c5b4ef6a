"""Peak memory of one job as the frame count grows: does streaming keep it flat?

Each frame count runs in a fresh subprocess (so peaks do not carry over) with the tiny models:
generate at WxH, upscale 4x, encode. A sampler thread reads the process RSS every 5 ms and keeps
the peak of each stage: generation (denoise + VAE decode) and upscale+encode. For scale, it also
prints what holding the whole upscaled clip as uint8 would cost.

    python bench/memory.py                       # 17, 65 and 129 frames at 256x256 -> 1024x1024
    python bench/memory.py --frames 17 129 --size 64
"""

import argparse
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class StagePeaks:
    """Samples this process's RSS in a thread and keeps the peak per stage."""

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.stage = "load"
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.wait(0.005):
            rss = self.process.memory_info().rss / 2**20
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), rss)

    def stop(self):
        self._stop.set()
        self._thread.join()


def one_run(frames: int, size: int, data_dir: str, out_dir: str) -> dict:
    """Run one job in this process and return its memory figures."""
    from config import Settings
    from pipeline.run import Models, run_job
    from pipeline.spec import JobParams

    peaks = StagePeaks()
    settings = Settings.from_env(env={}, model="tiny", upscaler="tiny", data_dir=Path(data_dir))
    models = Models(settings)
    assert models.generator and models.upscaler  # load both before the job starts
    peaks.stage = "generate"

    def on_progress(stage, done, total):
        peaks.stage = "generate" if stage == "denoising" else "upscale+encode"

    params = JobParams.from_dict({"prompt": "a red fox", "width": size, "height": size, "num_frames": frames,
                                  "num_inference_steps": 2, "seed": 0})
    result = run_job(params, settings, on_progress, models=models, output=Path(out_dir) / f"m{frames}.mp4")
    peaks.stop()
    return {
        "frames": frames, "generated": f"{size}x{size}", "output": f"{result.width}x{result.height}",
        "peak_rss_loaded_mb": round(peaks.peaks["load"]),
        "peak_rss_generate_mb": round(peaks.peaks["generate"]),
        "peak_rss_upscale_encode_mb": round(peaks.peaks["upscale+encode"]),
        "whole_upscaled_clip_uint8_mb": round(frames * result.width * result.height * 3 / 2**20),
        "seconds": result.timings_s["total"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[17, 65, 129])
    parser.add_argument("--size", type=int, default=256, help="generated width and height")
    parser.add_argument("--child", metavar="DATA_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.child:
            print(json.dumps(one_run(args.frames[0], args.size, args.child, tmp)))
            return
        data_dir = Path(tmp) / "data"
        rows = []
        for frames in args.frames:
            out = subprocess.run([sys.executable, __file__, "--child", str(data_dir), "--frames", str(frames),
                                  "--size", str(args.size)], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    keys = list(rows[0])
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
