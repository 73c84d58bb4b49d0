"""Write the HTML report of an output folder and save a headless-Chromium screenshot of it.

    .venv/bin/python scripts/screenshot_report.py [OUT_DIR] [--png docs/report.png]

OUT_DIR may be the root of a side-by-side run (`--model A --model B`): then the page
is the comparison grid. OUT_DIR defaults to output/example; when it has no ledger yet, the demo
(scripts/demo.sh: the example manifest against the local emulator) creates it
first. Needs `chromium` and `chromedriver` on PATH (Debian: apt-get install
chromium chromium-driver); selenium is given both paths so it never downloads
a browser of its own.
"""

from __future__ import annotations

import argparse
import base64
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402

from batch.cli import model_folders  # noqa: E402
from batch.compare import write_comparison  # noqa: E402
from batch.ledger import ledger_paths  # noqa: E402
from batch.report import write_report  # noqa: E402

WIDTH = 1280
# The report shows one page of rows at a time; past this the PNG is cut.
MAX_HEIGHT = 2400

CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def chrome(profile: Path) -> webdriver.Chrome:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        sys.exit(
            "needs chromium and chromedriver on PATH (apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = binary  # with both paths given, selenium-manager stays idle
    for flag in (*CHROME_FLAGS, f"--user-data-dir={profile}", f"--window-size={WIDTH},900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def screenshot(report: Path, png: Path, full_page: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="wsbatch-chrome-") as profile:
        browser = chrome(Path(profile))
        try:
            browser.get(report.resolve().as_uri())
            ready = time.monotonic() + 10  # the script renders the first page of rows
            while time.monotonic() < ready and not browser.execute_script(
                "return document.body.getAttribute('data-ready') === '1'"
            ):
                time.sleep(0.05)
            height = int(browser.execute_script("return document.documentElement.scrollHeight"))
            height = min(height, MAX_HEIGHT) if full_page else 900
            # An exact viewport: every lazy thumbnail in it loads, and the PNG is WIDTH wide.
            browser.execute_cdp_cmd(
                "Emulation.setDeviceMetricsOverride",
                {"width": WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": False},
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not browser.execute_script(
                "return [...document.querySelectorAll('#groups img, #lines img')]"
                " .every(i => i.complete)"
                " && document.readyState === 'complete'"
            ):
                time.sleep(0.05)
            shot = browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
        finally:
            browser.quit()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.write_bytes(base64.b64decode(shot["data"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", type=Path, default=ROOT / "output" / "example")
    parser.add_argument("--png", type=Path, default=ROOT / "docs" / "report.png")
    parser.add_argument("--first-screen", action="store_true", help="only the first 900 px")
    args = parser.parse_args()
    folders = model_folders(args.out_dir)
    if not ledger_paths(args.out_dir) and not folders:
        if args.out_dir.resolve() != (ROOT / "output" / "example").resolve():
            sys.exit(f"{args.out_dir} has no ledger")
        subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], check=True)
    report = write_comparison(args.out_dir, folders) if folders else write_report(args.out_dir)
    screenshot(report, args.png, full_page=not args.first_screen)
    print(f"report: {report}\nscreenshot: {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
