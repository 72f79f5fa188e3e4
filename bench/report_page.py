"""The report page at size: how long `report` takes, how heavy the page is, and how fast headless
Chromium shows it, on ELPV (2,624 images) and on 10,496 (ELPV four times: each image also mirrored,
flipped and turned, so every file differs).

    .venv/bin/python -m bench.report_page [--sizes 2624 10496] [--screenshot docs/report.png]

For each size: a Lite0 cache (224 px, the demo's), a logistic-regression run, an audit, then
`report --model RUN --audit DIR` (thumbnails auto: embedded up to 2,000 images, a folder beyond);
in the browser, the time from navigation to the page's sections built (`data-ready`), the
document's nodes, the script heap, and the time to open the largest cell of the confusion matrix.
Rows are written as they end into bench/results/report_page.json (a second run resumes).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.common import machine_line, markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "report_page.json"
WORK = ROOT / "bench" / "work" / "report_page"
FAST = {"c_grid": "1e-3:1e2:6"}


def _save(results: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))


def image_folder(size: int) -> Path:
    """ELPV's binary folder (2,624) or, for more, ELPV with each image also mirrored, flipped and
    turned (up to four times as many), written once under bench/work."""
    from PIL import Image, ImageOps

    from pipeline.data.demo import export_elpv

    elpv = ROOT / "data" / "elpv"
    if not elpv.is_dir():
        export_elpv(elpv, "binary")
    originals = sorted(p for p in elpv.rglob("*.png"))
    if size <= len(originals):
        return elpv
    target = WORK / f"elpv-x{size}"
    done = target / ".complete"
    if done.is_file():
        return target
    changes = [lambda i: i, ImageOps.mirror, ImageOps.flip, lambda i: i.transpose(Image.Transpose.ROTATE_90)]
    count = 0
    for k, change in enumerate(changes):
        for original in originals:
            if count >= size:
                break
            out = target / original.parent.name / f"{original.stem}-v{k}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(original) as image:
                change(image).save(out)
            count += 1
    done.write_text(str(count))
    return target


def in_the_browser(page: Path, screenshot: Path | None) -> dict:
    from pipeline.pages.browser import console_errors, headless_chromium

    with headless_chromium(1280, 1000) as driver:
        started = time.perf_counter()
        driver.get(page.resolve().as_uri())
        loaded = time.perf_counter() - started  # get() returns after the load event: the script has run
        ready = driver.execute_script("return document.body.dataset.ready") == "true"
        timing = driver.execute_script("const t = performance.getEntriesByType('navigation')[0]; "
                                       "return [t.domContentLoadedEventEnd, t.loadEventEnd]")
        nodes = driver.execute_script("return document.getElementsByTagName('*').length")
        heap = driver.execute_script("return performance.memory ? performance.memory.usedJSHeapSize : null")
        cells = driver.find_elements("css selector", "#confusion button.cell")
        largest = max(cells, key=lambda c: int(c.get_attribute("data-count")))
        largest_count = int(largest.get_attribute("data-count"))
        started = time.perf_counter()
        driver.execute_script("arguments[0].click()", largest)
        shown = len(driver.find_elements("css selector", "#cell-images figure"))
        opened = time.perf_counter() - started
        if screenshot is not None:  # the top of the page, an error cell of the matrix opened
            wrong = [c for c in cells if c.get_attribute("data-row") != c.get_attribute("data-column")]
            driver.execute_script("arguments[0].click(); window.scrollTo(0, 0)",
                                  max(wrong, key=lambda c: int(c.get_attribute("data-count"))))
            driver.set_window_size(1280, 1500)
            driver.save_screenshot(str(screenshot))
        errors = console_errors(driver)
    return {"ready": ready, "load_s": round(loaded, 3), "dom_content_loaded_ms": round(timing[0]),
            "load_event_ms": round(timing[1]), "nodes": nodes,
            "js_heap_mb": None if heap is None else round(heap / 2**20, 1),
            "largest_cell": largest_count, "cell_shown": shown,
            "cell_open_s": round(opened, 3), "console_errors": errors}


def one_size(size: int, screenshot: Path | None) -> dict:
    import pipeline

    data = image_folder(size)
    timings = {}
    started = time.perf_counter()
    store = pipeline.extract(data, backbone="efficientnet_lite0", cache=ROOT / "features", progress=False)
    timings["extract_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    run = pipeline.train_head(store, models=WORK / "models", name=f"run-{size}", progress=False, **FAST)
    timings["train_head_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    audit = pipeline.audit(store, out=WORK / f"audit-{size}", progress=False)
    timings["audit_s"] = round(time.perf_counter() - started, 1)
    page = WORK / f"report-{size}.html"
    found = pipeline.report_page(run, audit=audit.directory, out=page, progress=False)
    files = page.parent / f"{page.stem}_files"
    row = {"images": len(store.rows_index()), **timings, "report_s": round(found.seconds, 1),
           "page_mb": round(page.stat().st_size / 2**20, 2), "thumbnails": found.thumbnails,
           "thumbnail_files_mb": round(sum(f.stat().st_size for f in files.glob("*")) / 2**20, 1)
           if files.is_dir() else 0.0, "shown": found.images, "sections": found.sections}
    row |= in_the_browser(page, screenshot)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2624, 10496])
    parser.add_argument("--screenshot", type=Path, default=None, help="a PNG of the first size's page (for the docs)")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results["machine"] = machine_line()
    print(results["machine"])
    for number, size in enumerate(args.sizes):
        key = str(size)
        if key not in results.get("rows", {}):
            results.setdefault("rows", {})[key] = one_size(size, args.screenshot if number == 0 else None)
            _save(results)
        print(json.dumps(results["rows"][key]))
    rows = [[r["images"], r["report_s"], r["page_mb"], f"{r['thumbnails']} ({r['thumbnail_files_mb']} MB)",
             r["load_event_ms"], r["nodes"], r["js_heap_mb"], f"{r['largest_cell']} ({r['cell_open_s']} s)",
             len(r["console_errors"])] for r in results["rows"].values()]
    print(markdown_table(["images", "report (s)", "page (MB)", "thumbnails", "page loaded (ms)", "DOM nodes",
                          "JS heap (MB)", "largest cell opened", "console errors"], rows))


if __name__ == "__main__":
    main()
