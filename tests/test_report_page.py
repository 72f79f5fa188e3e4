"""`report`: one offline HTML page of a run and its audit, checked as data (what the page holds,
what it escapes, what it says is missing) and in a real browser (headless Chromium: it loads with
no console errors, the matrix cells open their images, the map's points carry their file names)."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest

import pipeline
from conftest import FAST_LOGREG, THREE_CLASSES, make_image_folder, write_image
from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.pages import browser
from pipeline.pages.page import json_block

HOSTILE = "\"'><img src=x onerror=window.__pwned=1>&amp;<script>window.__pwned=2<script>.png"  # no slash: a file name


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three classes of small images, a third of them unlabelled by a labels table (one with a
    hostile file name among them: shown by the suggestions); a logistic-regression run and an
    audit of the same labels."""
    root = tmp_path_factory.mktemp("report")
    data = make_image_folder(root / "data", per_class=12, classes=tuple(THREE_CLASSES))
    write_image(data / "cats" / HOSTILE, seed=777)
    cache = extract_pretrained(data, root / "features")
    store = pipeline.FeatureStore(cache)
    rows = store.rows_index()
    table = root / "labels.csv"
    with open(table, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows([path, store.class_names[k] if i % 3 and HOSTILE not in path else ""]
                         for i, (path, k) in enumerate(zip(rows.paths, rows.labels)))
    models = root / "models"
    run = pipeline.train_head(cache, labels=table, models=models, name="run", progress=False, **FAST_LOGREG)
    audit = pipeline.audit(cache, labels=table, out=root / "audit", folds=3, c_grid="1.0", progress=False)
    return {"root": root, "data": data, "cache": cache, "models": models, "run": run, "audit": audit.directory,
            "table": table}


def extract_pretrained(data: Path, cache: Path) -> Path:
    """The audit wants pretrained features: EfficientNet-Lite0 (its weights package) at 64 px."""
    return pipeline.extract(data, backbone="efficientnet_lite0", image_size=64, precision="fp32", cache=cache,
                            progress=False).path


def page_data(page: Path) -> dict:
    text = page.read_text(encoding="utf-8")
    block = re.search(r'<script type="application/json" id="page-data">(.*?)</script>', text, re.S).group(1)
    return json.loads(block)


def test_the_page_holds_the_run_and_the_audit(project: dict, tmp_path: Path) -> None:
    found = pipeline.report_page(project["run"], audit=project["audit"], out=tmp_path / "page.html", progress=False)
    assert found.path == tmp_path / "page.html" and found.thumbnails == "embed" and not found.missing
    assert set(found.sections) == {"metrics", "evaluation", "suspects", "pairs", "unknowns", "suggestions", "map"}
    data = page_data(found.path)
    run = project["run"]
    assert data["metrics"]["test"]["accuracy"] == pytest.approx(run.metrics["test"]["accuracy"], abs=1e-4)
    evaluation = data["evaluation"]
    test_paths = sorted(path for path, split in run.split_record.items() if split == "test")
    assert sorted(data["images"][row["i"]]["path"] for row in evaluation["rows"]) == test_paths
    cells = evaluation["matrix"]["cells"]
    assert sum(len(c) for row in cells for c in row) == len(test_paths)
    for t, row in enumerate(cells):  # each cell holds the images given class t and predicted class p
        for p, numbers in enumerate(row):
            for number in numbers:
                assert data["images"][number]["label"] == run.class_names[t]
                assert evaluation["rows"][evaluation["row_of"][str(number)]]["predicted"] == run.class_names[p]
    assert sorted(evaluation["errors"]) == sorted(n for t, row in enumerate(cells) for p, c in enumerate(row)
                                                  if t != p for n in c)
    with open(project["audit"] / "suspects.csv", newline="", encoding="utf-8") as handle:
        suspects = [r["path"] for r in csv.DictReader(handle)]
    assert [data["images"][s["i"]]["path"] for s in data["suspects"]] == suspects
    with open(project["table"], newline="", encoding="utf-8") as handle:
        unlabelled = sum(1 for row in csv.DictReader(handle) if not row["label"])
    assert data["unknowns"]["checked"] == {"test": len(test_paths), "unlabelled": unlabelled} and unlabelled > 0
    assert all(row["score"] > data["unknowns"]["threshold"] for row in data["unknowns"]["rows"])
    assert data["suggestions"]["unlabelled"] == unlabelled
    assert len(data["suggestions"]["rows"]) == min(50, unlabelled)
    assert all(data["images"][row["i"]]["label"] == "" for row in data["suggestions"]["rows"])
    with open(project["audit"] / "map.csv", newline="", encoding="utf-8") as handle:
        mapped = {r["path"] for r in csv.DictReader(handle)}
    assert {data["images"][p[2]]["path"] for p in data["map"]["points"]} == mapped
    assert all(image["src"].startswith("data:image/jpeg;base64,") for image in data["images"])


def test_the_page_runs_no_script_from_data(project: dict, tmp_path: Path) -> None:
    found = pipeline.report_page(project["run"], audit=project["audit"], out=tmp_path / "page.html", progress=False)
    text = found.path.read_text(encoding="utf-8")
    assert "onerror=window" not in text.replace("\\u003e", ">").split("page-data")[0]  # not in the markup
    assert "<img src=x" not in text and "<script>window.__pwned" not in text
    assert HOSTILE in {Path(image["path"]).name for image in page_data(found.path)["images"]}  # read back whole
    policy = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', text).group(1)
    assert "default-src 'none'" in policy and "script-src 'sha256-" in policy and "unsafe-inline" not in policy
    assert len(re.findall(r"<script>", text)) == 1  # the page's own script, the one the policy allows
    assert json.loads(json_block({"a": "</script><!--\u2028&"})) == {"a": "</script><!--\u2028&"}


def test_thumbnails_in_a_folder_beside_the_page(project: dict, tmp_path: Path) -> None:
    found = pipeline.report_page(project["run"], out=tmp_path / "run.html", thumbnails="folder", progress=False)
    assert found.thumbnails == "folder"
    sources = [image["src"] for image in page_data(found.path)["images"]]
    assert all(source.startswith("run_files/") for source in sources)
    assert all((tmp_path / source).is_file() for source in sources)
    assert "map" in found.sections  # without an audit, the run's own map


def test_moved_images_are_listed_as_missing(project: dict, tmp_path: Path) -> None:
    data = project["data"]
    moved = sorted((data / "dogs").glob("*.png"))[:3]
    kept = tmp_path / "kept"
    kept.mkdir()
    try:
        for file in moved:
            shutil.move(file, kept / file.name)
        found = pipeline.report_page(project["run"], audit=project["audit"], out=tmp_path / "page.html",
                                     progress=False)
    finally:
        for file in moved:
            shutil.move(kept / file.name, file)
    page = page_data(found.path)
    shown = {image["path"] for image in page["images"]}
    expected = sorted(f"dogs/{file.name}" for file in moved if f"dogs/{file.name}" in shown)
    assert expected and sorted(found.missing) == expected and sorted(page["missing"]) == expected
    assert all(image["src"] == "" for image in page["images"] if image["path"] in expected)
    assert any("missing" in note for note in page["notes"])


def test_report_from_the_command_line(project: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli.html"
    assert main(["report", "--model", str(project["run"].directory), "--audit", str(project["audit"]),
                 "--out", str(out), "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["path"] == str(out) and out.is_file() and summary["missing"] == []
    assert main(["report", "--audit", str(project["audit"]), "--no-progress"]) == 0  # an audit alone
    assert (project["audit"] / "report.html").is_file()
    assert "report:" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["report"], "needs a run"),
    (["report", "--audit", "{root}"], "not an audit's folder"),
    (["report", "--model", "{run}", "--out", "{root}/page.txt"], "one HTML file"),
    (["report", "--model", "{run}", "--out", "{root}/nowhere/page.html"], "does not exist"),
    (["report", "--model", "{run}", "--split", "holdout"], "--split holdout"),
    (["report", "--model", "{run}", "--screenshot", "{root}/page.jpg"], "PNG"),
])
def test_bad_input_is_one_line(project: dict, capsys: pytest.CaptureFixture, argv: list[str], message: str) -> None:
    argv = [a.format(root=project["root"], run=project["run"].directory) for a in argv]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_an_audit_of_other_images_is_refused(project: dict, tmp_path: Path) -> None:
    other = make_image_folder(tmp_path / "other", per_class=6, classes=tuple(THREE_CLASSES), seed=3)
    cache = extract_pretrained(other, tmp_path / "features")
    audit = pipeline.audit(cache, out=tmp_path / "audit", folds=2, c_grid="1.0", progress=False)
    with pytest.raises(PipelineError, match="give an audit of the run's cache"):
        pipeline.report_page(project["run"], audit=audit.directory, out=tmp_path / "page.html", progress=False)


# --- in a real browser ---------------------------------------------------------------------------

needs_browser = pytest.mark.skipif(browser.unavailable() is not None,
                                   reason=f"no headless browser: {browser.unavailable()}")


@needs_browser
def test_the_page_in_headless_chromium(project: dict, tmp_path: Path) -> None:
    found = pipeline.report_page(project["run"], audit=project["audit"], out=tmp_path / "page.html", progress=False)
    data = page_data(found.path)
    with browser.headless_chromium(1280, 900) as driver:
        driver.get(found.path.resolve().as_uri())
        assert driver.execute_script("return document.body.dataset.ready") == "true"
        assert browser.console_errors(driver) == []
        assert driver.execute_script("return window.__pwned === undefined")
        names = [e.get_attribute("data-path") for e in driver.find_elements("css selector", "figure[data-path]")]
        assert any(Path(name).name == HOSTILE for name in names)  # shown as written
        cells = driver.find_elements("css selector", "#confusion button.cell")
        matrix = data["evaluation"]["matrix"]["cells"]
        assert [int(c.text) for c in cells] == [len(n) for row in matrix for n in row]
        opened = 0
        for cell in cells:
            numbers = matrix[int(cell.get_attribute("data-row"))][int(cell.get_attribute("data-column"))]
            if not numbers:
                continue
            driver.execute_script("arguments[0].click()", cell)
            shown = [e.get_attribute("data-path") for e in driver.find_elements("css selector", "#cell-images figure")]
            assert sorted(shown) == sorted(data["images"][n]["path"] for n in numbers[:60])
            opened += 1
        assert opened >= 2
        points = driver.find_elements("css selector", "#map-points circle")
        assert len(points) == len(data["map"]["points"])
        mapped = {data["images"][p[2]]["path"] for p in data["map"]["points"]}
        assert {p.get_attribute("data-path") for p in points} == mapped
        assert {p.find_element("tag name", "title").get_attribute("textContent") for p in points[:20]} <= mapped
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(driver).move_to_element(points[0]).perform()  # hovering shows the image and its name
        preview = driver.find_element("id", "preview")
        assert preview.is_displayed() and points[0].get_attribute("data-path") in preview.text
        images = driver.execute_script(
            "return [...document.querySelectorAll('#suspects img')].slice(0, 5).map(i => i.complete && i.naturalWidth)")
        assert images and all(width and width > 0 for width in images)
        driver.set_window_size(390, 844)  # a phone: nothing wider than the screen
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
        assert browser.console_errors(driver) == []


@needs_browser
def test_report_writes_a_screenshot(project: dict, tmp_path: Path) -> None:
    found = pipeline.report_page(project["run"], out=tmp_path / "page.html", thumbnails="folder",
                                 screenshot=tmp_path / "page.png", progress=False)
    from PIL import Image

    with Image.open(found.screenshot) as picture:
        assert picture.width == 1280 and picture.height > 600
    assert found.console_errors == []
