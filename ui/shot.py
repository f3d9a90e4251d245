"""Drive the page in a real headless Chromium: the browser tests and ``make ui-shot`` use this.

The browser is the distro's ``chromium`` with its matching ``chromium-driver`` (same Debian
version, so they always agree; nothing is downloaded at run time). ``make ui-tools`` installs
them with apt-get when missing.

``python -m ui.shot --out docs/ui.png`` starts TorchServe (config.properties, free ports, a
temporary work dir) and the page (``python -m ui``), segments a sample in the browser, saves a
screenshot and stops both.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from serving.server import free_port

# Debian's package names: the browser and the driver built from the same source.
BROWSER_PACKAGES = {"chromium": "chromium", "chromedriver": "chromium-driver"}
PAGE_START_TIMEOUT_S = 120.0
RESULT_TIMEOUT_S = 150.0


class BrowserError(RuntimeError):
    """The browser or the page could not be driven; the message says what to do."""


def ensure_browser() -> None:
    """chromium and chromedriver on PATH, installed with apt-get when missing (root only)."""
    missing = [pkg for tool, pkg in BROWSER_PACKAGES.items() if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        packages = " ".join(missing)
        raise BrowserError(f"{packages} missing: `sudo apt-get install {packages}`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
        if subprocess.run(cmd, env=env, check=False).returncode != 0:
            raise BrowserError(f"`{' '.join(cmd)}` failed: install {' '.join(missing)} by hand")


def open_browser(width: int = 1400, height: int = 1700, fake_camera: bool = False):
    """A headless Chromium under selenium; ``fake_camera`` feeds the webcam a test pattern."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver is None:
        raise BrowserError("chromium/chromedriver not found: run `make ui-tools`")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    # --no-sandbox: CI and containers run as root, where Chromium's sandbox refuses to start.
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--hide-scrollbars"):  # fmt: skip
        options.add_argument(arg)
    if fake_camera:
        options.add_argument("--use-fake-device-for-media-stream")
        options.add_argument("--use-fake-ui-for-media-stream")
    return webdriver.Chrome(service=Service(driver), options=options)


@dataclass
class RunningPage:
    """A ``python -m ui`` process; ``url`` answers once it is ready."""

    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-4000:]


@contextmanager
def run_page(args: Sequence[str], log_path: Path, port: int | None = None) -> Iterator[RunningPage]:
    """Start the page with ``args`` (``python -m ui`` flags) and stop it afterwards."""
    port = port or free_port()
    log_file = log_path.open("w", encoding="utf-8")
    process = subprocess.Popen(
        [sys.executable, "-m", "ui", "--port", str(port), *args],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
    )
    page = RunningPage(f"http://127.0.0.1:{port}/", process, log_path)
    try:
        _wait_healthy(page)
        yield page
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log_file.close()


def _wait_healthy(page: RunningPage) -> None:
    deadline = time.monotonic() + PAGE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if page.process.poll() is not None:
            raise BrowserError(f"the page exited ({page.process.returncode}):\n{page.log()}")
        try:
            if requests.get(page.url + "healthz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise BrowserError(f"the page did not answer {page.url}healthz in time:\n{page.log()}")


class PageDriver:
    """What a person does on the page, as browser actions; element ids are ui/app.py's."""

    def __init__(self, driver, url: str) -> None:
        self.driver = driver
        self.url = url

    def load(self) -> None:
        self.driver.get(self.url)
        self._wait(lambda: self._find("#segserve-upload input[type=file]"), "the upload box")

    def _find(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def _wait(self, condition, what: str, timeout: float = RESULT_TIMEOUT_S):
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout).until(lambda _: condition())
        except TimeoutException:
            raise BrowserError(f"waited {timeout:g}s for {what} on {self.url}") from None

    def upload(self, path: Path) -> str:
        """Upload ``path``; returns ``"ok"`` or ``"error"`` once the page shows either."""
        if not self._find("#segserve-upload input[type=file]"):
            # A file is loaded: its box shows the name instead of the input until cleared.
            self._find("#segserve-upload button[aria-label='Clear']")[0].click()
            self._wait(lambda: self._find("#segserve-upload input[type=file]"), "the upload box")
        self._clear_status()
        self._find("#segserve-upload input[type=file]")[0].send_keys(str(path.resolve()))
        return self.wait_result()

    def pick_sample(self, name: str) -> str:
        """Click the sample button named ``name``; ``"ok"``/``"error"`` as for upload."""
        from selenium.webdriver.common.by import By

        self._clear_status()
        buttons = self.driver.find_elements(By.XPATH, f"//button[normalize-space()='{name}']")
        if not buttons:
            raise BrowserError(f"no sample button {name!r} on the page")
        buttons[0].click()
        return self.wait_result()

    def _clear_status(self) -> None:
        # A result of the previous upload must not count as this one's.
        self.driver.execute_script(
            "for (const id of ['segserve-ok', 'segserve-error']) {"
            "  const e = document.getElementById(id); if (e) e.id = id + '-old'; }"
        )

    def wait_result(self) -> str:
        found = self._wait(lambda: self._find("#segserve-ok, #segserve-error"), "a result")
        if found[0].get_attribute("id") == "segserve-error":
            return "error"
        self._wait(lambda: self._find("#segserve-legend") and self._loaded("segserve-overlay"),
                   "the legend and the overlay")  # fmt: skip
        return "ok"

    def _loaded(self, elem_id: str) -> bool:
        return self.image_size(elem_id) is not None

    def error_text(self) -> str:
        return self._find("#segserve-error")[0].text

    def legend(self) -> list[tuple[str, float]]:
        """``(class name, pixel fraction)`` per legend row, exact values from data-."""
        rows = self._find("#segserve-legend tr[data-class-id]")
        return [(r.get_attribute("data-class-name"), float(r.get_attribute("data-fraction")))
                for r in rows]  # fmt: skip

    def summary(self) -> dict[str, str]:
        element = self._find("#segserve-summary")[0]
        keys = ("model", "version", "latency-ms", "mean-confidence")
        return {k: element.get_attribute(f"data-{k}") for k in keys} | {"text": element.text}

    def image_size(self, elem_id: str) -> tuple[int, int] | None:
        """The natural (width, height) of the image shown in ``#elem_id``, None if none.

        One script reads "loaded" and the size together: a webcam stream replaces the image
        between two calls, and the newer one may not be decoded yet (size 0 x 0)."""
        from selenium.common.exceptions import StaleElementReferenceException

        images = self._find(f"#{elem_id} img")
        if not images:
            return None
        try:
            size = self.driver.execute_script(
                "const i = arguments[0];"
                "if (!i.complete || i.naturalWidth === 0) return null;"
                "return [i.naturalWidth, i.naturalHeight]",
                images[0],
            )
        except StaleElementReferenceException:  # replaced by a newer frame/answer: not yet
            return None
        return (int(size[0]), int(size[1])) if size else None

    def image_bytes(self, elem_id: str) -> bytes:
        """The file behind the image shown in ``#elem_id``, fetched as the browser would."""
        src = self._find(f"#{elem_id} img")[0].get_attribute("src")
        return requests.get(src, timeout=10).content

    def download_bytes(self) -> bytes:
        """The mask PNG offered in the download box."""
        self._wait(lambda: self._find("#segserve-download a[href]"), "the download link")
        href = self._find("#segserve-download a[href]")[0].get_attribute("href")
        return requests.get(href, timeout=10).content

    def set_opacity(self, value: float) -> None:
        from selenium.webdriver.common.keys import Keys

        box = self._find("#segserve-opacity input[type=number]")[0]
        box.clear()
        box.send_keys(f"{value:g}", Keys.ENTER)

    def _click_button(self, scope: str, *names: str) -> None:
        def button():
            for candidate in self._find(f"{scope} button"):
                label = f"{candidate.get_attribute('aria-label') or ''} {candidate.text}".lower()
                if any(name in label for name in names) and candidate.is_displayed():
                    return candidate
            return None

        from selenium.common.exceptions import WebDriverException

        def clicked() -> bool:
            # The box re-renders while the camera starts: a button found a moment ago may be
            # gone or covered; look again rather than fail.
            try:
                found = button()
                if found is None:
                    return False
                found.click()
                return True
            except WebDriverException:
                return False

        self._wait(clicked, f"a button {names} in {scope}")

    def start_webcam(self) -> None:
        """Open the Webcam tab, grant the camera, start streaming frames."""
        from selenium.webdriver.common.by import By

        tab = "//button[@role='tab'][normalize-space()='Webcam']"
        self.driver.find_element(By.XPATH, tab).click()
        self._click_button("#segserve-webcam", "access webcam")
        self._click_button("#segserve-webcam", "record", "start")

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))
        return path


def take_screenshot(config: Path, image: Path, samples: Path, out: Path) -> Path:
    """TorchServe + the page on free ports, ``image`` segmented in the browser, ``out`` saved."""
    from serving.server import Ports, start, stop

    ensure_browser()
    with tempfile.TemporaryDirectory(prefix="segserve-ui-shot-") as tmp:
        workdir = Path(tmp)
        info = start(config, workdir=workdir, ports=Ports.free(), timeout_s=240)
        try:
            token_file = workdir / "inference-token"
            token_file.write_text(info.inference_key)
            args = ["--inference-url", info.inference_url, "--token-file", str(token_file),
                    "--samples", str(samples), "--model-name", info.model_name]  # fmt: skip
            with run_page(args, workdir / "page.log") as page:
                driver = open_browser()
                try:
                    browser = PageDriver(driver, page.url)
                    browser.load()
                    if browser.upload(image) != "ok":
                        raise BrowserError(f"the page refused {image}: {browser.error_text()}")
                    time.sleep(1.0)  # let the bar chart finish its transition
                    return browser.screenshot(out)
                finally:
                    driver.quit()
        finally:
            stop(workdir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ui.shot", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=Path("config.properties"))
    parser.add_argument("--samples", type=Path, default=Path("runs/default/samples"))
    parser.add_argument("--image", type=Path, help="image to segment (default: first sample)")
    parser.add_argument("--out", type=Path, default=Path("docs/ui.png"))
    args = parser.parse_args(argv)
    image = args.image or next(iter(sorted(args.samples.glob("*.png"))), None)
    if image is None:
        print(f"python -m ui.shot: no --image and no PNG in {args.samples}", file=sys.stderr)
        return 2
    try:
        path = take_screenshot(args.config, image, args.samples, args.out)
    except BrowserError as exc:
        print(f"python -m ui.shot: {exc}", file=sys.stderr)
        return 1
    print(f"screenshot: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
