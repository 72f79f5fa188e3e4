"""Export the ELPV solar-cell dataset (PyPI `elpv-dataset`) into DIR/<class>/ folders.

The images are licensed CC BY-NC-SA 4.0: the package is installed by `make setup` and the
exported folder is never committed.
"""

from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path

from pipeline import tables
from pipeline.errors import PipelineError, from_a_clone

ELPV_PACKAGE = "elpv-dataset"
CLASSINGS = ("binary", "4class")


def elpv_data_dir() -> Path:
    try:
        dist = importlib.metadata.distribution(ELPV_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise PipelineError(f"the demo data needs the package {ELPV_PACKAGE}: `pip install {ELPV_PACKAGE}`"
                            + (" (make setup installs it)" if from_a_clone() else "")) from None
    data = Path(str(dist.locate_file("elpv_dataset/data")))
    if not (data / "labels.csv").is_file():
        raise PipelineError(f"{data}/labels.csv is missing: reinstall {ELPV_PACKAGE}")
    return data


def elpv_labels(data: Path) -> list[tuple[str, float, str]]:
    """(image path relative to data, defect probability, cell type mono|poly) per image."""
    rows = []
    with open(data / "labels.csv") as handle:
        for line in handle:
            fields = line.split()
            if fields:
                rows.append((fields[0], float(fields[1]), fields[2]))
    return rows


def class_of(probability: float, classing: str) -> str:
    """Binary as in Deitsch et al. 2019: functional (p < 0.5) vs defective (p >= 0.5);
    4-class: the four annotated probabilities 0, 1/3, 2/3, 1."""
    if classing == "binary":
        return "defective" if probability >= 0.5 else "functional"
    if classing == "4class":
        return f"defect-{probability:.2f}"
    raise PipelineError(f"unknown classing {classing!r}: choose one of {', '.join(CLASSINGS)}")


def export_elpv(destination: Path, classing: str = "binary") -> dict[str, int]:
    """Copy the 2,624 ELPV images into destination/<class>/; files already there are kept.
    Also writes destination/elpv_labels.csv (file, class, probability, type). Returns class counts."""
    data = elpv_data_dir()
    destination = Path(destination)
    counts: dict[str, int] = {}
    table = []
    for relative, probability, cell_type in elpv_labels(data):
        name = class_of(probability, classing)
        source = data / relative
        target = destination / name / Path(relative).name
        if not target.exists() or target.stat().st_size != source.stat().st_size:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        counts[name] = counts.get(name, 0) + 1
        table.append((f"{name}/{target.name}", name, probability, cell_type))
    with open(destination / "elpv_labels.csv", "w", newline="") as handle:
        writer = tables.writer(handle)
        writer.writerow(["file", "class", "defect_probability", "cell_type"])
        writer.writerows(table)
    return dict(sorted(counts.items()))
