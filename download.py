"""Fetch model weights: HunyuanVideo (diffusers format) from the Hugging Face Hub, Real-ESRGAN from its releases.

    python download.py                      # HunyuanVideo + RealESRGAN_x4plus into ./models
    python download.py --list               # what can be fetched, and what is already here
    python download.py --only realesr-animevideov3 --dir /data/models

Release files are checked against their sha256 and get their final name only once verified.
An interrupted download resumes from its `.part` file.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.upscale import RELEASES

HUNYUAN_REPO = "hunyuanvideo-community/HunyuanVideo"
HUNYUAN_NAME = "HunyuanVideo"
# Only what DiffusionPipeline.from_pretrained reads: configs, safetensors shards, tokenizer files.
HUNYUAN_PATTERNS = [
    "model_index.json", "*/config.json", "*/*.safetensors", "*/*.safetensors.index.json",
    "scheduler/*", "tokenizer/*", "tokenizer_2/*",
]
DEFAULT_ITEMS = [HUNYUAN_NAME, "RealESRGAN_x4plus"]
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    pass


def fetch_release(name: str, models_dir: Path, mirror: str | None = None, progress: bool = True) -> Path:
    """Download one Real-ESRGAN release file, resuming a `.part`, and rename it into place once its sha256 matches."""
    release = RELEASES[name]
    if release.sha256 is None:
        raise DownloadError(f"{name}: t2v knows no published sha256 for it; download {release.url} yourself "
                            f"into {models_dir}")
    final = Path(models_dir) / release.filename
    if final.is_file() and _sha256(final) == release.sha256:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    url = f"{mirror.rstrip('/')}/{release.filename}" if mirror else release.url
    _download(url, part, progress)
    actual = _sha256(part)
    if actual != release.sha256:
        part.unlink()
        raise DownloadError(f"{name}: sha256 mismatch for {url} (expected {release.sha256}, got {actual}); "
                            "the file was deleted, try again")
    os.replace(part, final)
    return final


def _download(url: str, part: Path, progress: bool) -> None:
    """Append to `part` from where it stops (HTTP Range); start over if the server ignores the range."""
    from tqdm import tqdm

    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the .part is already complete
            return
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise DownloadError(f"{url}: {exc.reason}") from None
    with response:
        resumed = response.status == 206
        total = int(response.headers.get("Content-Length", 0)) + (have if resumed else 0)
        with open(part, "ab" if resumed else "wb") as f, tqdm(
            total=total or None, initial=have if resumed else 0, unit="B", unit_scale=True,
            desc=part.name.removesuffix(".part"), disable=not progress,
        ) as bar:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))


def fetch_hunyuan(models_dir: Path) -> Path:
    """Download the diffusers-format HunyuanVideo (about 40 GB) with only the files the pipeline loads."""
    from huggingface_hub import snapshot_download

    target = Path(models_dir) / HUNYUAN_NAME
    snapshot_download(HUNYUAN_REPO, local_dir=target, allow_patterns=HUNYUAN_PATTERNS)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def list_items(models_dir: Path) -> list[str]:
    rows = [f"{HUNYUAN_NAME:24} {'here' if (models_dir / HUNYUAN_NAME / 'model_index.json').is_file() else '-':5} "
            f"{HUNYUAN_REPO} (Hugging Face Hub)"]
    for name, release in RELEASES.items():
        here = "here" if (models_dir / release.filename).is_file() else "-"
        note = release.url if release.sha256 else f"{release.url} (no sha256 known: fetch it by hand)"
        rows.append(f"{name:24} {here:5} {note}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch HunyuanVideo and Real-ESRGAN weights.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("models"), help="folder to download into")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help=f"fetch only NAME (repeatable); default: {', '.join(DEFAULT_ITEMS)}")
    parser.add_argument("--list", action="store_true", help="list what can be fetched and what is here")
    parser.add_argument("--mirror", metavar="URL", help="fetch Real-ESRGAN files from URL/<filename> instead")
    args = parser.parse_args(argv)

    if args.list:
        print("\n".join(list_items(args.dir)))
        return 0
    names = args.only or DEFAULT_ITEMS
    unknown = [n for n in names if n != HUNYUAN_NAME and n not in RELEASES]
    if unknown:
        print(f"download.py: error: unknown item {unknown[0]!r}; see --list", file=sys.stderr)
        return 2
    for name in names:
        try:
            path = fetch_hunyuan(args.dir) if name == HUNYUAN_NAME else fetch_release(name, args.dir, args.mirror)
        except DownloadError as exc:
            print(f"download.py: error: {exc}", file=sys.stderr)
            return 1
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
