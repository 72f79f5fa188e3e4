"""The report page's thumbnails: every image it shows, small (JPEG, THUMBNAIL_SIZE px on the long
side), embedded in the page as data URIs or written beside it into a folder and linked relative
to it. An image that is gone (moved, deleted, unreadable) gets no thumbnail and is listed instead:
the page says which are missing rather than breaking."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import PipelineError

THUMBNAIL_SIZE = 96  # px on the long side: a gallery cell, and about 3 KB of JPEG
QUALITY = 80
EMBED_AT_MOST = 2000  # thumbnails embedded by default ("auto"); above, a folder beside the page
MODES = ("auto", "embed", "folder")


@dataclass
class Thumbnails:
    """What the page links: each image's thumbnail source (a data URI, or a path relative to the
    page), "" where the image is missing; the missing images' paths; how they were kept."""

    sources: list[str]
    missing: list[str] = field(default_factory=list)
    mode: str = "embed"
    folder: Path | None = None


def _thumbnail_bytes(file: Path) -> bytes | None:
    from PIL import Image

    try:
        with Image.open(file) as image:
            image.draft("RGB", (THUMBNAIL_SIZE, THUMBNAIL_SIZE))  # JPEG: decoded at a fraction of its size
            small = image.convert("RGB")
            small.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
            out = io.BytesIO()
            small.save(out, format="JPEG", quality=QUALITY)
            return out.getvalue()
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def make_thumbnails(files: Sequence[Path], names: Sequence[str], ids: Sequence[str], page: Path,
                    mode: str = "auto", progress: bool = True) -> Thumbnails:
    """Thumbnails of `files` (shown under their `names`, cache-relative paths) for the page at
    `page`: embedded, or written to `<page stem>_files/<id>.jpg` (`ids`: content sha256, so one
    image shown twice is one file)."""
    if mode not in MODES:
        raise PipelineError(f"--thumbnails {mode}: choose from {', '.join(MODES)}")
    embed = mode == "embed" or (mode == "auto" and len(files) <= EMBED_AT_MOST)
    folder = None if embed else page.parent / f"{page.stem}_files"
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(8, (os.cpu_count() or 1) * 2))  # Pillow decodes with the GIL released
    with ThreadPoolExecutor(workers) as pool:
        encoded = pool.map(_thumbnail_bytes, [Path(f) for f in files])
        if progress:
            from tqdm import tqdm

            encoded = tqdm(encoded, total=len(files), desc="report: thumbnails", unit="image", leave=False)
        sources, missing = [], []
        for data, name, digest in zip(encoded, names, ids):
            if data is None:
                sources.append("")
                missing.append(name)
            elif folder is None:
                sources.append("data:image/jpeg;base64," + base64.b64encode(data).decode("ascii"))
            else:
                target = folder / f"{digest}.jpg"
                target.write_bytes(data)
                sources.append(f"{folder.name}/{target.name}")
    return Thumbnails(sources, missing, "embed" if embed else "folder", folder)
