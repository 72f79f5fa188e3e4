"""What the ELPV benchmarks share, defined once: the dataset exported into a class-folder layout,
the score of always answering the largest class, and the resumable rows (a JSON file rewritten
whole as each row ends, so a second run resumes where the first stopped)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.data.demo import export_elpv


def export(task: str, work: Path) -> Path:
    """ELPV's images for `task` (binary or 4class) in WORK/data/elpv-TASK/<class>/."""
    data = work / "data" / f"elpv-{task}"
    export_elpv(data, task)
    return data


def majority(data: Path) -> float:
    """The largest class's share of the images (what always answering it scores)."""
    counts = [sum(1 for p in folder.iterdir() if p.is_file()) for folder in data.iterdir() if folder.is_dir()]
    return max(counts) / sum(counts)


def load(out: Path) -> dict:
    if out.is_file():
        return json.loads(out.read_text())
    return {"rows": []}


def save(out: Path, state: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.tmp")
    temporary.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(temporary, out)
