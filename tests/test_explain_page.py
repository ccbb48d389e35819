"""The /explain page in a real headless Chromium (selenium + Debian's chromium and chromium-driver).

A minimal FastAPI app mounts the explain router and runs under uvicorn on a loopback port in a thread.
Skipped only when no Chromium is installed; CI installs it (apt-get install chromium chromium-driver,
pip install selenium).
"""
from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from fastapi import FastAPI

from model.explainer import AttentionExplainer
from server.explain_api import create_explain_router

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed "
                                "(apt-get install -y chromium chromium-driver; pip install selenium)")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1500,1300")
PROMPT = "To be, or not to be, that is the question"


@pytest.fixture(scope="module")
def base_url(tiny_llama_dir):
    import uvicorn

    explainer = AttentionExplainer(tiny_llama_dir)
    app = FastAPI()
    app.include_router(create_explain_router(lambda: explainer))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("Chromium is installed but selenium is not: pip install selenium")
    driver_path = shutil.which("chromedriver")
    if driver_path is None:
        pytest.fail("Chromium is installed but chromedriver is not: apt-get install -y chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout: float = 30.0, what: str = "condition"):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d), message=what)


def distinct_colours(png: Path) -> int:
    from PIL import Image
    with Image.open(png) as image:
        return len(image.convert("RGB").getcolors(maxcolors=1 << 20) or [])


def test_page_draws_heatmaps_and_walks_a_token(browser, base_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(f"{base_url}/explain")
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#kv-heads option")) == 3, what="model info")
    assert "2 layers, 4 query heads" in browser.find_element(By.ID, "model-info").text
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys(PROMPT)
    Select(browser.find_element(By.ID, "layer")).select_by_value("1")
    Select(browser.find_element(By.ID, "compare-kv-heads")).select_by_value("1")
    browser.find_element(By.ID, "run").click()

    # native (2 kv heads) and pooled (1) side by side, 4 head maps each
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "canvas.heatmap")) == 8, what="heatmaps")
    panels = browser.find_elements(By.CSS_SELECTOR, ".panel")
    assert [p.get_attribute("data-kv-heads") for p in panels] == ["2", "1"]
    assert "KV head 1 ← query heads 2, 3" in panels[0].text
    assert "KV head 0 ← query heads 0, 1, 2, 3" in panels[1].text
    colours = browser.execute_script("""
        const c = document.querySelector('canvas.heatmap'), px = c.getContext('2d')
          .getImageData(0, 0, c.width, c.height).data, seen = new Set();
        for (let i = 0; i < px.length; i += 4) seen.add(px[i] + ',' + px[i + 1] + ',' + px[i + 2]);
        return [c.width, seen.size];""")
    assert colours[0] > 100 and colours[1] > 20, colours
    shot = tmp_path / "explain_heatmaps.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 20_000 and distinct_colours(shot) > 200

    # click token 4: each panel walks it through the layer
    tokens = browser.find_elements(By.CSS_SELECTOR, "#tokens .token")
    assert len(tokens) > 6
    tokens[4].click()
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, '.walk[data-query-index="4"]')) == 2,
             what="walkthrough of token 4")
    assert browser.find_element(By.CSS_SELECTOR, ".token.selected").get_attribute("data-index") == "4"
    for walk in browser.find_elements(By.CSS_SELECTOR, ".walk"):
        cards = walk.find_elements(By.CSS_SELECTOR, ".head-step")
        assert [c.get_attribute("data-head") for c in cards] == ["0", "1", "2", "3"]
        for card in cards:
            rows = card.find_elements(By.CSS_SELECTOR, "table.scores tbody tr")
            assert len(rows) == 5  # keys 0..4: the causal mask
            weights = [float(r.find_element(By.CSS_SELECTOR, "td.weight").get_attribute("textContent"))
                       for r in rows]
            assert abs(sum(weights) - 1) < 2e-3
            assert "‖q‖=" in card.text and "‖z‖=" in card.text
        assert "concat" in walk.text and "output projection" in walk.text
    browser.execute_script("document.querySelector('.walk').scrollIntoView()")
    assert browser.save_screenshot(str(tmp_path / "explain_walkthrough.png"))


def test_page_shows_the_field_of_a_bad_request(browser, base_url):
    from selenium.webdriver.common.by import By

    browser.get(f"{base_url}/explain")
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#layer option")) == 2, what="model info")
    browser.find_element(By.ID, "prompt").clear()
    browser.find_element(By.ID, "run").click()
    status = browser.find_element(By.ID, "status")
    wait_for(browser, lambda d: "error" in status.get_attribute("class"), what="error status")
    assert status.text.startswith("prompt:")
