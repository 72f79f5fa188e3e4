"""The report page in a real browser: headless Chromium driven by Selenium, pointed at the
system's browser and driver (Debian's chromium and chromium-driver; `make setup` installs them
where it can), never downloading one. Used by `report --screenshot` and by the page's tests."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
DRIVERS = ("chromedriver",)
TALLEST = 6000  # px: a full-page screenshot is cut here


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) executables: $CHROME_BINARY / $CHROMEDRIVER, else the first on PATH (or
    Debian's /usr/lib/chromium/chromedriver); None where either is missing."""
    browser = os.environ.get("CHROME_BINARY") or next(filter(None, map(shutil.which, BROWSERS)), None)
    driver = os.environ.get("CHROMEDRIVER") or next(filter(None, map(shutil.which, DRIVERS)), None)
    if driver is None and Path("/usr/lib/chromium/chromedriver").is_file():
        driver = "/usr/lib/chromium/chromedriver"
    return (browser, driver) if browser and driver else None


def unavailable() -> str | None:
    """Why a headless Chromium cannot be driven here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install 'bottleneck-pipeline[browser]')"
    if find_chromium() is None:
        return ("no Chromium with its driver on PATH (Debian: apt-get install chromium chromium-driver; or set "
                "CHROME_BINARY and CHROMEDRIVER)")
    return None


@contextmanager
def headless_chromium(width: int = 1280, height: int = 1000) -> Iterator[Any]:
    """A Selenium WebDriver on a headless Chromium of this size, its console kept (get_log("browser"))."""
    reason = unavailable()
    if reason is not None:
        raise PipelineError(f"a headless browser is needed: {reason}")
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = find_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--allow-file-access-from-files", f"--window-size={width},{height}", "--hide-scrollbars"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
    except WebDriverException as error:
        first = str(error.msg or error).strip().splitlines()[0] if str(error.msg or error).strip() else type(error)
        raise PipelineError(f"{browser} with {driver_path} did not start ({first})") from None
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver: Any) -> list[str]:
    """The browser console's errors since the last call (a failed image, a script error, a blocked load)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]


def screenshot(page: Path, out: Path, width: int = 1280) -> list[str]:
    """A PNG of the page as a browser shows it, `width` px wide and as tall as the page (up to
    TALLEST); returns the console's errors."""
    from pipeline import atomic

    with headless_chromium(width, 1000) as driver:
        driver.get(Path(page).resolve().as_uri())
        height = int(driver.execute_script("return document.documentElement.scrollHeight"))
        driver.set_window_size(width, min(max(height, 600), TALLEST))
        with atomic.replacing(Path(out), suffix=".png") as temporary:
            if not driver.save_screenshot(str(temporary)):
                raise PipelineError(f"the browser wrote no screenshot of {page}")
        return console_errors(driver)
