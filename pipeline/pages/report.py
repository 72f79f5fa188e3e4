"""`report --model RUN [--audit DIR]`: one offline HTML page of a run (its metrics, the confusion
matrix whose cells open their images, the errors, the unknowns, what to label next, the map) and
of an audit (its suspects, cross-split near-duplicates and map), with every image it shows as a
small thumbnail; no server, nothing fetched from elsewhere."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.pages import collect
from pipeline.pages.page import write_page
from pipeline.pages.thumbnails import make_thumbnails

PAGE_NAME = "report.html"
PAIRS_SHOWN = 200  # the closest cross-split pairs on the page (duplicates.csv has them all)


@dataclass
class ReportSummary:
    """What report wrote: the page, how many images it shows and which of them are missing."""

    path: Path
    images: int
    missing: list[str]
    thumbnails: str  # "embed" or "folder"
    sections: list[str]
    seconds: float
    notes: list[str] = field(default_factory=list)
    screenshot: Path | None = None  # report --screenshot: the page as headless Chromium showed it
    console_errors: list[str] = field(default_factory=list)  # what the browser's console said then


def make_report(run: Any = None, audit: Path | None = None, out: Path | None = None, split: str = "test",
                thumbnails: str = "auto", cache_root: Path = Path("features"), progress: bool = True) -> ReportSummary:
    """The page of `run` (an opened Run) and/or the audit folder `audit`, written to `out` (default:
    report.html in the run's directory, else in the audit's)."""
    started = time.perf_counter()
    if run is None and audit is None:
        raise PipelineError("report needs a run (--model RUN) or an audit (--audit DIR), or both")
    details = collect.read_audit(Path(audit)) if audit is not None else None
    out = Path(out) if out is not None else (run.directory if run is not None else Path(audit)) / PAGE_NAME
    if out.suffix.lower() not in (".html", ".htm"):
        raise PipelineError(f"--out {out}: the report is one HTML file (FILE.html)")
    if not out.parent.is_dir():
        raise PipelineError(f"--out {out}: the folder {out.parent} does not exist")
    title = " + ".join(filter(None, [f"run {run.name}" if run is not None else None,
                                     f"audit {Path(audit).name}" if audit is not None else None]))
    page = collect.PageData(f"Report: {title}", collect.Images())
    opened = collect.run_sections(page, run, split, cache_root, progress) if run is not None else None
    if details is not None:
        audit_root = collect.audit_data_root(Path(audit), details)
        if page.images.root is not None and audit_root is not None and \
                Path(audit_root).resolve() != page.images.root.resolve():
            raise PipelineError(f"--audit {audit} is of the images under {audit_root}, run {run.name} of those under "
                                f"{page.images.root}: give an audit of the run's cache")
        page.images.root = page.images.root or audit_root
        collect.audit_sections(page, Path(audit), details, PAIRS_SHOWN)
    if "map" not in page.sections and opened is not None:
        collect.run_map(page, run, *opened)
    if page.images.root is None:
        page.notes.append("the cache does not record its image folder: no thumbnails")
    kept = make_thumbnails(page.images.files(), page.images.paths, page.images.ids, out, thumbnails, progress)
    if kept.missing:
        page.notes.append(f"{len(kept.missing)} of the {len(page.images.paths)} images shown are missing from "
                          f"{page.images.root} (moved or deleted since): see Missing images")
    write_page(page.as_json(kept.sources, kept.missing), out)
    sections = [name for name in ("metrics", "evaluation", "suspects", "pairs", "unknowns", "suggestions", "map")
                if name in page.sections]
    return ReportSummary(out, len(page.images.paths), kept.missing, kept.mode, sections,
                         time.perf_counter() - started, page.notes)
