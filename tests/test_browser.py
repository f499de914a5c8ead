"""The built book as a reader sees it: every page of ``_build/html`` in headless Chromium, network off.

For each page, served from 127.0.0.1 with every other request blocked (a blocked request is a
failure: the page needs the network), the test checks that

- every request the page makes succeeds: nothing blocked, failed or answered 4xx/5xx;
- every image has loaded (``<img>`` complete with a non-zero natural size);
- every formula is typeset: each MathJax math element holds MathJax's output, MathJax reports no
  TeX error, and no raw TeX delimiters (``\\(``, ``\\[``, ``$$``, ``$x$``) are left in the text;
- nothing sticks out of the main column at a 1,400 px wide window (wide content must sit in its
  own scroll box), the page never scrolls sideways, and code cells wrap instead of scrolling;
- the console shows no errors and no script throws;
- every interactive figure (``adnb.interactive``: controls over precomputed frames) works without a
  kernel: each view shows one loaded frame, and moving each control programmatically to its next
  position shows another frame and updates the value it displays; every chapter has at least one.

The first screen of each chapter and page of the book is saved as ``_build/screens/<name>.png``
(e.g. ``02_fair_frequency_filters.png``) for a person to look at.

It needs a built book (``make book PRESET=ci``), Chromium and Playwright's Python package (which
drives the system Chromium; no browser is downloaded). ``make check-book`` runs it (``.ci/run`` does,
after building the book) with ``ADNB_BROWSER_CHECK=require``, which turns a missing book or browser into
a failure; ``make test`` leaves it out (marker ``browser``), and a plain ``pytest`` skips it when any of
them is missing.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from urllib.parse import urljoin

import pytest

ROOT = Path(__file__).resolve().parents[1]
# ADNB_BOOK_HTML checks a book built elsewhere (e.g. a downloaded CI artifact); screenshots go beside it.
BUILD = Path(os.environ.get("ADNB_BOOK_HTML") or ROOT / "_build" / "html").resolve()
SCREENS = BUILD.parent / "screens"
REQUIRED = os.environ.get("ADNB_BROWSER_CHECK", "") == "require"
WIDTH, HEIGHT = 1400, 900  # the width at which the issue saw code and tables run past the column
# Flags for a closed network: without the background-networking ones Chromium keeps trying to
# reach Google's services (updates, sync, safe browsing) and floods it.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
# Sphinx's own pages: checked like the others, but they are no chapter, so no screenshot.
NOT_CHAPTERS = {"genindex.html", "search.html", "py-modindex.html"}
pytestmark = pytest.mark.browser
REDIRECT = re.compile(r'<meta http-equiv="refresh" content="\d+;\s*url=([^"]+)"', re.IGNORECASE)


def _missing(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"browser check required (ADNB_BROWSER_CHECK=require) but {reason}", pytrace=False)
    pytest.skip(reason)


def _pages() -> list[str]:
    if not (BUILD / "index.html").is_file():
        return []
    skip = {"_static", "_sources", "_images", "_sphinx_design_static"}
    return sorted(p.relative_to(BUILD).as_posix() for p in BUILD.rglob("*.html") if not skip & set(p.relative_to(BUILD).parts))


def _chromium() -> str | None:
    for name in (os.environ.get("ADNB_CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    return None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


@pytest.fixture(scope="module")
def server():
    """The book over HTTP on 127.0.0.1 (as a reader's server would serve it; file:// hides CORS and font rules)."""
    handler = functools.partial(_QuietHandler, directory=str(BUILD))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser_context(server):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright's Python package is not installed (pip install -r requirements.txt)")
    chromium = _chromium()
    if chromium is None:
        _missing("no Chromium found (apt-get install chromium, or set ADNB_CHROMIUM)")
    with sync_playwright() as playwright, tempfile.TemporaryDirectory(prefix="adnb-chromium-") as profile:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=chromium, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": WIDTH, "height": HEIGHT}, service_workers="block")
        blocked: list[str] = []  # the "network off": anything not served by our local server is refused

        def route(route):
            if route.request.url.startswith(server):
                route.continue_()
            else:
                blocked.append(route.request.url)
                route.abort("blockedbyclient")

        context.route("**/*", route)
        yield context, blocked
        context.close()


# Runs in the page once it has loaded, MathJax has typeset and the fonts are in. Returns the
# problems found, one string each. Helpers describe an element by tag, id/class and some text.
CHECKS_JS = r"""
async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
  await document.fonts.ready;
  const problems = [];
  const describe = (el) => {
    const cls = typeof el.className === "string" && el.className.trim() ? "." + el.className.trim().split(/\s+/).join(".") : "";
    const text = (el.innerText || el.textContent || "").trim().replace(/\s+/g, " ").slice(0, 70);
    return `<${el.tagName.toLowerCase()}${el.id ? "#" + el.id : ""}${cls}> "${text}"`;
  };

  for (const img of document.images) {
    if (!img.complete || img.naturalWidth === 0) problems.push(`image did not load: ${img.getAttribute("src")}`);
  }

  // Formulas. Sphinx marks every formula span.math / div.math; MathJax replaces its TeX by an
  // <mjx-container>. A formula MathJax could not parse shows as <mjx-merror>.
  for (const el of document.querySelectorAll(".math")) {
    if (!el.querySelector("mjx-container")) problems.push(`formula not typeset: ${el.textContent.trim().slice(0, 80)}`);
  }
  for (const el of document.querySelectorAll("mjx-merror")) {
    problems.push(`MathJax error: ${el.getAttribute("data-mjx-error") || el.textContent.slice(0, 80)}`);
  }
  const article = document.querySelector("article.bd-article") || document.querySelector("main") || document.body;
  const walker = document.createTreeWalker(article, NodeFilter.SHOW_TEXT, {
    acceptNode: (node) => node.parentElement.closest("pre, code, script, style, mjx-container, .math, .highlight, textarea")
      ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT,
  });
  const rawTex = /\\\(|\\\[|\$\$|\$[^$\s][^$\n]*\$/;
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (rawTex.test(node.textContent)) problems.push(`raw TeX in the text: "${node.textContent.trim().slice(0, 80)}"`);
  }

  // Layout. Readers open the collapsed cells, so open them (the screenshot is already taken).
  for (const d of document.querySelectorAll("details")) d.open = true;
  await new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));
  if (document.documentElement.scrollWidth > window.innerWidth + 1) {
    problems.push(`the page scrolls sideways: ${document.documentElement.scrollWidth} px wide in a ${window.innerWidth} px window`);
  }
  const column = article.getBoundingClientRect();
  const reported = [];
  for (const el of article.querySelectorAll("*")) {
    const box = el.getBoundingClientRect();
    if (box.width === 0 || box.height === 0) continue;
    // MathJax's copy of each formula for screen readers is clipped to 1 px on purpose.
    if (el.closest("mjx-assistive-mml")) continue;
    if (box.right <= column.right + 1 && box.left >= column.left - 1) continue;
    if (reported.some((r) => r.contains(el))) continue;
    // Inside a box that scrolls (or clips) within the article? Then that box is what a reader
    // sees; it is checked itself. A clipping box that hides content is reported as such.
    let scroller = null;
    for (let a = el.parentElement; a && a !== article; a = a.parentElement) {
      if (getComputedStyle(a).overflowX !== "visible") { scroller = a; break; }
    }
    if (scroller) {
      const ox = getComputedStyle(scroller).overflowX;
      if (ox === "hidden" || ox === "clip") { reported.push(el); problems.push(`cut off by its container (overflow ${ox}): ${describe(el)}`); }
      continue;
    }
    reported.push(el);
    problems.push(`sticks out of the main column (${Math.round(box.left)}–${Math.round(box.right)} px, column ${Math.round(column.left)}–${Math.round(column.right)} px): ${describe(el)}`);
  }
  // Code is wrapped, not scrolled: a reader should not have to scroll a cell sideways to read it.
  for (const pre of article.querySelectorAll("div.cell_input pre, div.highlight pre")) {
    if (pre.closest(".cell_output")) continue;  // printed output keeps its columns and may scroll
    if (pre.scrollWidth > pre.clientWidth + 1) problems.push(`code scrolls sideways (${pre.scrollWidth} px in ${pre.clientWidth} px): ${describe(pre)}`);
  }
  return problems;
}
"""


# Runs after CHECKS_JS: moves every control of every interactive figure (adnb.interactive, switched by
# _static/adnb-explore.js) one position on, and checks that a new frame shows. Returns the number of
# figures and the problems found.
EXPLORE_JS = r"""
async () => {
  const problems = [];
  const figures = Array.from(document.querySelectorAll("figure.adnb-explore"));
  const painted = () => new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));
  const shown = (figure) => Array.from(figure.querySelectorAll(".adnb-explore-view"))
    .map((view) => Array.from(view.querySelectorAll("img[data-keys]")).filter((img) => !img.hidden));
  const check = (figure, when) => {
    shown(figure).forEach((frames, i) => {
      if (frames.length !== 1) problems.push(`${figure.dataset.name}, view ${i} ${when}: ${frames.length} frames shown, not 1`);
      else if (!frames[0].complete || frames[0].naturalWidth === 0) problems.push(`${figure.dataset.name}, view ${i} ${when}: its frame did not load`);
    });
  };
  for (const figure of figures) {
    check(figure, "at load");
    for (const control of figure.querySelectorAll(".adnb-explore-controls input, .adnb-explore-controls select")) {
      const count = control.tagName === "SELECT" ? control.options.length : Number(control.max) + 1;
      if (count < 2) continue;
      const before = shown(figure).map((frames) => frames[0]);
      const next = (Number(control.value) + 1) % count;
      if (control.tagName === "SELECT") control.selectedIndex = next;
      else control.value = String(next);
      control.dispatchEvent(new Event("input", { bubbles: true }));
      control.dispatchEvent(new Event("change", { bubbles: true }));
      await painted();
      const when = `after moving ${control.name} to position ${next}`;
      check(figure, when);
      if (!shown(figure).some((frames, i) => frames[0] && frames[0] !== before[i] && frames[0].src !== (before[i] || {}).src)) {
        problems.push(`${figure.dataset.name} ${when}: no view shows another frame`);
      }
      const output = figure.querySelector(`output[for="${control.id}"]`);
      const label = JSON.parse(control.dataset.labels)[next];
      if (output && output.value !== label) problems.push(`${figure.dataset.name} ${when}: it reads "${output.value}", not "${label}"`);
    }
  }
  return { figures: figures.length, problems };
}
"""


@pytest.mark.parametrize("page_path", _pages() or [None], ids=lambda p: p or "no-book")
def test_page_offline(browser_context, server, page_path):
    if page_path is None:
        _missing(f"no built book at {BUILD} (make book PRESET=ci)")
    context, blocked = browser_context
    page = context.new_page()
    problems: list[str] = []
    failed: set[str] = set()
    blocked.clear()

    def on_failed(request):
        failed.add(request.url)
        if "ERR_BLOCKED_BY_CLIENT" not in (request.failure or ""):
            problems.append(f"request failed ({request.failure}): {request.url}")

    def on_response(response):
        if response.status >= 400:
            failed.add(response.url)
            problems.append(f"HTTP {response.status}: {response.url}")

    def on_console(message):
        location = (message.location or {}).get("url", "")
        # "Failed to load resource" repeats a failure already reported above with its URL.
        if message.type == "error" and not (message.text.startswith("Failed to load resource") and location in failed):
            problems.append(f"console error: {message.text} ({location})")

    page.on("requestfailed", on_failed)
    page.on("response", on_response)
    page.on("console", on_console)
    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    redirect = REDIRECT.search((BUILD / page_path).read_text(errors="replace")[:2000])
    try:
        page.goto(server + page_path, wait_until="load")
        if redirect:  # Jupyter Book's index.html only forwards to the root page: it must arrive there
            target = urljoin(server + page_path, redirect.group(1))
            page.wait_for_url(target, wait_until="load", timeout=10_000)
        # First screen for a person to look at, taken after typesetting and before any checks change the page.
        page.evaluate("async () => { if (window.MathJax && MathJax.startup) await MathJax.startup.promise;"
                      " await document.fonts.ready; }")
        if Path(page_path).name not in NOT_CHAPTERS and not redirect:
            SCREENS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENS / f"{Path(page_path).stem}.png"))
        problems.extend(page.evaluate(CHECKS_JS))
        explored = page.evaluate(EXPLORE_JS)
        problems.extend(explored["problems"])
        if page_path.startswith("book/chapters/") and not explored["figures"]:
            problems.append("a chapter without an interactive figure (adnb.interactive.explore)")
        page.wait_for_load_state("networkidle")  # late requests (lazy images, MathJax extensions) count too
    finally:
        page.close()
    problems[:0] = [f"needs the network (blocked): {url}" for url in dict.fromkeys(blocked)]
    if problems:
        pytest.fail(f"{page_path}: {len(problems)} problem(s)\n  " + "\n  ".join(problems), pytrace=False)
