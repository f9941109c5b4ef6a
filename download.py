"""Fetch model weights: any registry model (diffusers format) from the Hugging Face Hub, Real-ESRGAN from its releases.

    python download.py                          # hunyuanvideo + RealESRGAN_x4plus into ./models
    python download.py --list                   # what can be fetched, its size, and what is already here
    python download.py --only wan2.2-ti2v-5b    # into ./models/Wan2.2-TI2V-5B-Diffusers
    python download.py --only realesr-animevideov3 --dir /data/models

A model comes with only the files its pipelines load. Release files are checked against their sha256 and get
their final name only once verified. An interrupted download resumes (from its `.part` file for releases).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from config import ConfigError, Settings
from pipeline.cli import ArgumentParser, setting_flag, setting_overrides
from pipeline.models import DEFAULT_MODEL, DOWNLOAD_GB, ENTRIES, MODELS, ModelEntry, local_dir
from pipeline.upscale import RELEASES

DEFAULT_ITEMS = [DEFAULT_MODEL, "RealESRGAN_x4plus"]
OLD_NAMES = {"HunyuanVideo": DEFAULT_MODEL}  # what --list called it before the registry
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    pass


def allow_patterns(entry: ModelEntry) -> list[str]:
    """The files the entry's pipelines load, as Hub patterns: model_index.json; per component its JSON configs
    and safetensors (with their index), or every file of a tokenizer or processor (LTX-2's Gemma processor keeps
    its tokenizer and chat template there). No .bin, no sample videos, no README."""
    import diffusers

    components = set()
    for class_name in entry.pipelines.values():
        cls = getattr(diffusers, class_name)
        components |= {name for name, p in inspect.signature(cls.__init__).parameters.items()
                       if name != "self" and (p.default is inspect.Parameter.empty or name in cls._optional_components)}
    patterns = ["model_index.json"]
    for name in sorted(components):
        whole = name.startswith("tokenizer") or name == "processor"
        patterns += [f"{name}/*"] if whole else [f"{name}/*.json", f"{name}/*.safetensors"]
    return patterns


def fetch_model(entry: ModelEntry, models_dir: Path) -> Path:
    """Download the entry's diffusers folder from the Hub into models_dir/<its Hub folder name>."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    target = local_dir(entry, models_dir)
    try:
        snapshot_download(entry.hub_repo, local_dir=target, allow_patterns=allow_patterns(entry))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise DownloadError(f"{entry.id}: {entry.hub_repo}: {' '.join(str(exc).split())[:300]}") from None
    return target


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


LEGEND = """\
size: the download size where t2v knows it (pipeline/models.py, DOWNLOAD_GB), else the size on disk when
      present; ? where neither is known.
checksum: sha256 = checked against the published sha256 before the file gets its name; none known = no
      published sha256, so download.py will not fetch it: download it from its URL yourself;
      sizes only = huggingface_hub checks each file's size."""


def list_items(models_dir: Path) -> list[str]:
    """A table: every item download.py knows, its size, whether it is here, and how it is checked."""
    rows = [("name", "size", "here", "checksum", "source -> destination")]
    for entry in ENTRIES:
        folder = local_dir(entry, models_dir)
        present = (folder / "model_index.json").is_file()
        rows.append((entry.id, _size(DOWNLOAD_GB.get(entry.id), folder, present), _here(present), "sizes only",
                     f"{entry.hub_repo} (Hugging Face Hub) -> {folder}"))
    for name, release in RELEASES.items():
        path = Path(models_dir) / release.filename
        rows.append((name, _size(None, path, path.is_file()), _here(path.is_file()),
                     "sha256" if release.sha256 else "none known", f"{release.url} -> {path}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    table = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4] for row in rows]
    return [*table, "", LEGEND]


def _here(present: bool) -> str:
    return "present" if present else "missing"


def _size(download_gb: float | None, path: Path, present: bool) -> str:
    if download_gb is not None:
        return f"{download_gb:.1f} GB"
    if not present:
        return "?"
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts]
    total = sum(p.stat().st_size for p in files)
    return f"{total / 1e9:.1f} GB" if total >= 1e9 else f"{total / 1e6:.1f} MB"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="download.py", description="Fetch model weights: any registry model from the Hugging "
                                                       "Face Hub, and Real-ESRGAN release files.",
                       epilog="Models go to <dir>/<Hub folder name>, e.g. ./models/HunyuanVideo, which is "
                              "$T2V_MODEL's default. `--list` shows every name with its size and destination.")
    p.add_argument("--only", action="append", metavar="NAME",
                   help=f"fetch only NAME, repeatable: a model id ({', '.join(list(MODELS)[:2])}, ...) or a "
                        f"Real-ESRGAN release ({', '.join(list(RELEASES)[:2])}, ...) "
                        f"(default: {' and '.join(DEFAULT_ITEMS)})")
    p.add_argument("--list", action="store_true", help="list what can be fetched, its size, and what is here")
    p.add_argument("--mirror", metavar="URL", help="fetch Real-ESRGAN files from URL/<filename> instead of GitHub "
                                                   "(default: the release URLs)")
    setting_flag(p, "models_dir", "folder to download into", "--dir")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = setting_overrides(args)
    try:
        models_dir = Settings.from_env(**overrides).models_dir
    except ConfigError as exc:
        print(f"download.py: error: {parser.explain(exc, overrides)}", file=sys.stderr)
        return 2
    if args.list:
        print("\n".join(list_items(models_dir)))
        return 0
    names = [OLD_NAMES.get(n, n) for n in args.only or DEFAULT_ITEMS]
    unknown = [n for n in names if n not in MODELS and n not in RELEASES]
    if unknown:
        print(f"download.py: error: unknown item {unknown[0]!r}; known: {', '.join([*MODELS, *RELEASES])} "
              "(see --list)", file=sys.stderr)
        return 2
    for name in names:
        try:
            path = fetch_model(MODELS[name], models_dir) if name in MODELS else fetch_release(name, models_dir,
                                                                                              args.mirror)
        except DownloadError as exc:
            print(f"download.py: error: {exc}", file=sys.stderr)
            return 1
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
