"""The web page in a real browser (Debian's chromium, headless): type, upload, drop, see thumbnails."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest
from conftest import make_image
from serve_helpers import MODEL, build_index

from magic_mm.index.search import RerankerUnavailableError
from magic_mm.serve.app import create_app
from magic_mm.serve.limits import ServeSettings
from magic_mm.serve.runner import ServerThread

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def no_reranker(model: str):
    raise RerankerUnavailableError("reranking is not available in this magic-mm version")


@pytest.fixture(scope="module")
def server(tiny_composed, tmp_path_factory):
    store = build_index(tiny_composed, tmp_path_factory.mktemp("web"))
    with ServerThread(create_app(tiny_composed, MODEL, store, ServeSettings(), no_reranker)) as running:
        yield running.url


@pytest.fixture(scope="module")
def page():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed; `make test` installs it (make chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        tab = browser.new_page(viewport={"width": 1100, "height": 800})
        tab.set_default_timeout(60_000)
        yield tab
        browser.close()


def test_search_page_text_upload_drop_and_rerank_toggle(server, page, tmp_path):
    page.goto(server + "/")
    sync_api.expect(page.locator("#info")).to_contain_text("6 pages indexed")

    page.fill("#query", "a photo of a boat")
    page.click("#go")
    thumbs = page.locator("figure.hit img[src^='data:image/jpeg']")
    sync_api.expect(thumbs).to_have_count(6)  # k=12 but the index holds 6 pages
    sync_api.expect(page.locator("#status")).to_contain_text("6 results")
    assert page.locator("figure.hit .score").first.inner_text().startswith("0.")
    sync_api.expect(page.locator("figure.hit figcaption").filter(has_text="page 2/2")).to_have_count(1)

    query_image = tmp_path / "query.png"
    make_image(64, 48, seed=11).save(query_image)
    page.set_input_files("#file", str(query_image))  # upload through the file picker
    sync_api.expect(page.locator("#preview")).to_be_visible()
    page.locator("#results").evaluate("grid => grid.replaceChildren()")
    page.select_option("#k", "6")
    page.click("#go")
    sync_api.expect(thumbs).to_have_count(6)
    screenshot = tmp_path / "web_page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("MAGIC_MM_SCREENSHOT"):  # keep a copy where the caller asked (e.g. for the docs)
        shutil.copy(screenshot, os.environ["MAGIC_MM_SCREENSHOT"])

    # drag and drop: a file dropped on the zone becomes the query image
    page.click("#clear")
    sync_api.expect(page.locator("#preview")).to_be_hidden()
    png = base64.b64encode(query_image.read_bytes()).decode()
    page.evaluate("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true}));
    }""", png)
    sync_api.expect(page.locator("#droptext")).to_have_text("dropped.png")
    sync_api.expect(page.locator("#preview")).to_be_visible()

    # the rerank toggle reaches the server, which says reranking is not available (no reranker yet)
    page.check("#rerank")
    page.click("#go")
    sync_api.expect(page.locator("#status.error")).to_contain_text("not available")
