"""Headless Chromium (Debian's `chromium` + `chromium-driver`, driven by selenium) for the UI checks.

Used by tests/test_browser.py and benchmarks/ui_screenshots.py. `missing()` says why a browser
cannot run here (the tests skip with that reason).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver",)


def missing() -> Optional[str]:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if not any(shutil.which(b) for b in BROWSERS):
        return "no chromium binary on PATH (apt-get install -y chromium chromium-driver)"
    if not any(shutil.which(d) for d in DRIVERS):
        return "no chromedriver on PATH (apt-get install -y chromium-driver)"
    return None


def start(width: int = 1600, height: int = 1000):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    binary = next(shutil.which(b) for b in BROWSERS if shutil.which(b))
    options.binary_location = binary
    driver = shutil.which("chromedriver")
    return webdriver.Chrome(options=options, service=Service(driver))


def wait_for(check: Callable[[], object], what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except Exception:  # noqa: BLE001 - the page is still rendering; elements come and go
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


def cell_text(driver, run_id: str, column: str) -> str:
    from selenium.webdriver.common.by import By

    cells = driver.find_elements(By.CSS_SELECTOR, f'[row-id="{run_id}"] [col-id="{column}"]')
    return " ".join((c.get_attribute("textContent") or "") for c in cells).strip()


def open_sweep_view(driver, url: str, parent_id: str, child_ids: List[str], metric: str) -> Dict[str, str]:
    """Open the sweep's view, expand the parent run, wait for every child's `metric` cell; return them."""
    from selenium.webdriver.common.by import By

    driver.get(url)
    name_col = "attributes.`Run Name`"
    toggle = wait_for(lambda: driver.find_element(By.CSS_SELECTOR, f'[row-id="{parent_id}"] [col-id="{name_col}"] button'),
                      "the sweep's parent run row")
    column = f"metrics.`{metric}`"
    if not cell_text(driver, child_ids[0], column):  # children are folded under their parent at first
        toggle.click()
    values = wait_for(lambda: {c: t for c in child_ids if (t := cell_text(driver, c, column)) and t != "-"}
                      if all(cell_text(driver, c, column) not in ("", "-") for c in child_ids) else None,
                      f"the {len(child_ids)} child runs with {metric}")
    for label in ("Close", "Hide banner"):  # the assistant side panel and the shared-view banner, for a clean page
        for button in driver.find_elements(By.CSS_SELECTOR, f'button[aria-label="{label}"]'):
            try:
                button.click()
            except Exception:  # noqa: BLE001 - not clickable in this layout: leave it
                pass
    time.sleep(1)
    return values


def open_report(driver, path: Path) -> Dict[str, int]:
    """Open the HTML report; return each figure's title → rendered width in pixels (0 = not rendered)."""
    from selenium.webdriver.common.by import By

    driver.get(path.resolve().as_uri())
    wait_for(lambda: driver.find_elements(By.TAG_NAME, "img"), "the report's figures")
    return {img.get_attribute("alt"): int(driver.execute_script(
        "return arguments[0].complete ? arguments[0].naturalWidth : 0", img))
        for img in driver.find_elements(By.TAG_NAME, "img")}
