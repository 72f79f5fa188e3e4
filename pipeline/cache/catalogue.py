"""The caches under a cache root, listed and chosen by a short name.

A cache's directory name is `DATA-BACKBONE-SIZE-POOLING-PRECISION-KEY` (fingerprint.py); the
layers it holds and the image folder it came from are in its manifest. `caches` lists them
(`cache_rows`), and `--features` takes, besides a directory or a name under the cache root, a
short form (`find_cache`):

- `BACKBONE[:SIZE[:LAYER+LAYER...]]`, e.g. `vgg16`, `vgg16:64`, `vgg16:64:block4_pool`; the
  EfficientNet-Lite backbones also as `lite0`, `lite1`, `lite2`;
- the start of a cache's directory name (as git takes the start of a commit's hash).

A short form that matches several caches is refused with the candidates, never guessed at.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline.cache.store import find_caches
from pipeline.errors import PipelineError, command

LITE_PREFIX = "efficientnet_"


def cache_rows(cache_root: Path) -> list[dict[str, Any]]:
    """Every cache under `cache_root`, newest first, as a row: its name and directory, backbone,
    size, layers, pooling, precision, image folder, image count per split and when it was last
    written."""
    rows = []
    for directory, manifest in find_caches(cache_root):
        fingerprint = manifest["fingerprint"]
        counts = manifest.get("counts") if isinstance(manifest.get("counts"), dict) else {}
        dataset = manifest.get("dataset") if isinstance(manifest.get("dataset"), dict) else {}
        rows.append({
            "name": directory.name,
            "directory": str(directory),
            "backbone": fingerprint.get("backbone"),
            "image_size": fingerprint.get("image_size"),
            "layers": list(fingerprint.get("layers") or []),
            "pooling": fingerprint.get("pooling"),
            "precision": fingerprint.get("precision"),
            "data": dataset.get("root"),
            "images": {split: n for split, n in counts.items() if isinstance(n, int)},
            "updated": time.strftime("%Y-%m-%d %H:%M", time.localtime((directory / "manifest.json").stat().st_mtime)),
        })
    return rows


def _backbone_matches(token: str, backbone: str | None) -> bool:
    return backbone is not None and token in (backbone, backbone.removeprefix(LITE_PREFIX))


def _short_form_matches(selector: str, row: dict[str, Any]) -> bool | None:
    """Whether a cache matches BACKBONE[:SIZE[:LAYERS]]; None when `selector` is not of that form."""
    backbone, *rest = selector.split(":")
    if len(rest) > 2 or (rest and not rest[0].isdigit()):
        return None
    if not _backbone_matches(backbone, row["backbone"]):
        return False
    if rest and int(rest[0]) != row["image_size"]:
        return False
    return not (len(rest) == 2 and rest[1].split("+") != row["layers"])


def describe(row: dict[str, Any]) -> str:
    return (f"{row['name']} ({row['backbone']} {row['image_size']} px, {'+'.join(row['layers'])}, {row['pooling']}, "
            f"{row['precision']}, from {row['data']})")


def find_cache(selector: str, cache_root: Path) -> Path | None:
    """The one cache a short form names, None when nothing looks like it; refuses one that names
    several caches, listing them."""
    rows = cache_rows(cache_root)
    short = [row for row in rows if _short_form_matches(selector, row)]
    matched = short or [row for row in rows if row["name"].startswith(selector)]
    if not matched:
        return None
    if len(matched) > 1:
        shown = "; ".join(describe(row) for row in matched[:4]) + ("; ..." if len(matched) > 4 else "")
        raise PipelineError(f"--features {selector} matches {len(matched)} caches: {shown}: name one "
                            "(BACKBONE:SIZE:LAYER, or the start of its name; `caches` lists them)")
    return Path(matched[0]["directory"])


def caches_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return f"no caches yet: make one with `{command()} extract --data DIR`"
    columns = [("name", "name"), ("backbone", "backbone"), ("image_size", "size"), ("layers", "layers"),
               ("pooling", "pooling"), ("precision", "precision"), ("images", "images"), ("data", "data"),
               ("updated", "updated")]

    def cell(row: dict[str, Any], key: str) -> str:
        value = row.get(key)
        if key == "layers":
            return ",".join(value)
        if key == "images":
            return "/".join(str(value.get(split, 0)) for split in ("train", "validation", "test"))
        if key == "data":
            return Path(value).name if value else "-"
        return "-" if value is None else str(value)

    table = [[title for _, title in columns]] + [[cell(row, key) for key, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip() for line in table]
    lines.append("images: train/validation/test. Newest first: train-head without --features takes the first. "
                 "--features takes a name, its start, or BACKBONE[:SIZE[:LAYER]] (e.g. vgg16:64:block4_pool, lite0)")
    return "\n".join(lines)
