"""The page in a real browser (issue 14): first paint, a 1,000-message conversation, a streamed delta.

Headless Debian Chromium through Playwright's async API, launched as the browser tests launch it
(`tests.browser`); a service of its own on a data directory holding a 1,000-message and a
50-message conversation with Markdown replies (`bench.conversations`, `markdown=True`). Every time
is read inside the page (`performance` entries and `performance.now()` marks), not in Python.

- First contentful paint of `GET /`, in a fresh browser context per sample (cold cache) and on
  one page navigated again (warm: the files revalidate by ETag). Direct: the FCP of a static
  HTML page of the same size as the page's document, with no stylesheet or script, served by
  `python -m http.server` (the service can only serve the files under `static/`, which are the
  product; a plain server gives the floor of "a document on loopback"). Also: the bytes
  transferred and requests made by a cold load of the page, files and API calls apart.
- Opening the 1,000-message conversation: from a click on it in the side list until its last
  message is in the DOM and the frame after it is painted (requestAnimationFrame, then a task).
  Direct: in the same page, fetching the same conversation JSON and inserting its messages as
  plain-text divs into a scrolled box, to the same painted frame.
- A streamed reply in the 50-message conversation (`chunks=N delay=S md` to the fake upstream:
  Markdown in N deltas): a MutationObserver on the transcript counts the mutations that land
  outside the streaming message's element between its first render and its end (target: 0), and
  a wrapper around `requestAnimationFrame` (where the page renders a reply, once per frame) times
  each render with the length of the text it rendered.
"""

from __future__ import annotations

import random
import statistics
import subprocess
import sys
import time
from typing import Any

from playwright.async_api import Browser, BrowserContext, Page, async_playwright

from bench.conversations import make_conversation, put, text_of
from bench.harness import Bench, Scenario
from bench.processes import free_port, wait_ready
from bench.stats import Stats, fmt_ms, spread
from tests.browser import CHROMIUM_ARGS, installed_chromium

REPEATS = 5
RENDER_TARGET_MS = 1000.0  # opening the long conversation, p50 (see BENCHMARKS.md for why 1 s)
FCP_TARGET_RATIO = 2.0  # first paint of / against a plain page of the same size, cold (idem)
SKIPPED = "no `chromium` on PATH; the benchmark installs nothing: `apt-get install -y chromium` as root"
TIMEOUT_MS = 120_000  # a bound on waiting for an event on a busy machine, never a measurement

# FCP of the document in the page: the entry if it is there, else the first one observed.
FCP_JS = """() => new Promise((resolve) => {
  const pick = (entries) => entries.find((e) => e.name === "first-contentful-paint");
  const seen = pick(performance.getEntriesByType("paint"));
  if (seen) return resolve(seen.startTime);
  new PerformanceObserver((list, observer) => {
    const entry = pick(list.getEntries());
    if (entry) { observer.disconnect(); resolve(entry.startTime); }
  }).observe({ type: "paint", buffered: true });
})"""

# What a load transferred: the page's files, and the API calls (with /openapi.json) apart.
BYTES_JS = r"""() => {
  const all = [...performance.getEntriesByType("navigation"), ...performance.getEntriesByType("resource")];
  const isApi = (e) => /^\/(api\/|openapi\.json$)/.test(new URL(e.name).pathname);
  const sum = (list, key) => list.reduce((n, e) => n + e[key], 0);
  const files = all.filter((e) => !isApi(e)), api = all.filter(isApi);
  return {
    files: files.length, fileBytes: sum(files, "transferSize"), fileBody: sum(files, "decodedBodySize"),
    api: api.length, apiBytes: sum(api, "transferSize"),
  };
}"""

# Resolves once the frame after the current task has been painted.
PAINTED = "new Promise((r) => requestAnimationFrame(() => setTimeout(r, 0)))"

# Open a conversation the way a person does, from the side list; ms until its last message painted.
OPEN_JS = f"""async ([id, lastId]) => {{
  document.getElementById("new-chat").click();
  await {PAINTED};
  const link = document.querySelector(`#conversations li[data-id="${{id}}"] a`);
  if (!link) throw new Error("the conversation is not in the side list");
  const started = performance.now();
  await new Promise((resolve) => {{
    const observer = new MutationObserver(() => {{
      if (document.getElementById(`m-${{lastId}}`)) {{ observer.disconnect(); resolve(); }}
    }});
    observer.observe(document.getElementById("messages"), {{ childList: true }});
    link.click();
  }});
  await {PAINTED};
  const took = performance.now() - started;
  const fetched = performance.getEntriesByType("resource")
    .filter((e) => e.name.endsWith(`/api/conversations/${{id}}`)).at(-1);
  return [took, fetched ? fetched.responseEnd - fetched.startTime : -1];
}}"""

# The baseline: the same JSON, its messages as plain-text divs in a scrolled box over the page.
PLAIN_JS = f"""async (id) => {{
  const box = document.createElement("div");
  const style = {{ position: "fixed", inset: "0", overflow: "auto", background: "Canvas", zIndex: "9" }};
  Object.assign(box.style, style);
  document.body.append(box);
  await {PAINTED};
  const started = performance.now();
  const conversation = await (await fetch(`/api/conversations/${{id}}`)).json();
  const fragment = document.createDocumentFragment();
  for (const m of conversation.messages) {{
    const div = document.createElement("div");
    div.textContent = m.content;
    fragment.append(div);
  }}
  box.append(fragment);
  box.scrollTop = box.scrollHeight;
  await {PAINTED};
  const took = performance.now() - started;
  box.remove();
  return took;
}}"""

# Before the page's scripts: time every requestAnimationFrame callback while `__timing` is on
# (the page renders a streaming reply in one, once per frame), with the reply's length after it.
RENDER_TIMER_JS = """(() => {
  const raf = window.requestAnimationFrame.bind(window);
  window.__timing = false;
  window.__renders = [];
  window.requestAnimationFrame = (callback) => raf((stamp) => {
    if (!window.__timing) return callback(stamp);
    const started = performance.now();
    try { return callback(stamp); } finally {
      const took = performance.now() - started;
      const live = document.querySelector("#messages li.msg.assistant:last-child .content");
      window.__renders.push([took, live ? live.textContent.length : 0]);
    }
  });
})()"""

# A MutationObserver on the transcript: once the streaming message's element is added, every
# mutation from its first render to its end (its data-status changing) is inside it or outside.
WATCH_JS = """() => {
  const w = { live: null, rendering: false, ended: false, changes: 0, inside: 0, outside: 0 };
  w.outsideTargets = [];
  window.__watch = w;
  window.__renders = [];
  window.__timing = true;
  const transcript = document.getElementById("messages");
  new MutationObserver((records) => {
    for (const r of records) {
      if (w.ended) return;
      if (!w.live) {
        for (const node of r.addedNodes) {
          const reply = node.nodeType === 1 && node.matches("li.msg.assistant");
          if (reply && node.dataset.status === "generating") w.live = node;
        }
        continue;
      }
      const content = w.live.querySelector(".content");
      if (!w.rendering) {
        if (r.target !== content) continue;  // before the first delta: the send itself
        w.rendering = true;
      }
      if (r.target === w.live && r.attributeName === "data-status") {
        w.ended = true;
        window.__timing = false;
        return;
      }
      if (r.target === content) w.changes += 1;
      if (w.live.contains(r.target)) w.inside += 1;
      else {
        w.outside += 1;
        if (w.outsideTargets.length < 5) w.outsideTargets.push(`${r.target.nodeName} ${r.type}`);
      }
    }
  }).observe(transcript, { childList: true, subtree: true, attributes: true, characterData: true });
}"""


async def run(bench: Bench) -> None:
    executable = installed_chromium()
    if executable is None:
        print(f"  page: skipped: {SKIPPED}", file=sys.stderr, flush=True)
        bench.row("skipped", {}, SKIPPED)
        return
    rng = random.Random(14)
    data_dir = bench.run_dir / "page-data"
    long = make_conversation(1000, 600, rng, markdown=True)
    medium = make_conversation(50, 600, rng, markdown=True)
    for conversation in (long, medium):
        put(data_dir, conversation)
    service = await bench.launch(data_dir)
    plain_url = await plain_server(bench, len((await bench.client.get(service.url + "/")).content))
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_ARGS, headless=True
        )
        try:
            await first_paint(bench, browser, service.url, plain_url)
            await open_long(bench, browser, service.url, long["id"], long["messages"][-1]["id"])
            await stream_reply(bench, browser, service.url, medium["id"])
        finally:
            await browser.close()
            bench.stop(service)


async def plain_server(bench: Bench, size: int) -> str:
    """`python -m http.server` on a directory holding one static HTML page of `size` bytes."""
    folder = bench.run_dir / "plain-page"
    folder.mkdir(exist_ok=True)
    head = (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>Plain</title>\n</head>\n'
    )
    body = "<body>\n<h1>A plain page</h1>\n"
    rng = random.Random(1)
    while len(head) + len(body) < size - 200:
        body += f"<p>{text_of(150, rng)}</p>\n"
    html = (head + body + "</body>\n</html>\n").encode()
    (folder / "index.html").write_bytes(html + b" " * max(0, size - len(html)))
    port = free_port()
    log = bench.run_dir / "plain-server.log"
    started = time.perf_counter()
    proc = bench.children.spawn(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(folder)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    url = f"http://127.0.0.1:{port}/"
    await wait_ready(proc, url, log, started)
    return url


async def fcp(page: Page, url: str) -> float:
    """Navigate `page` to `url`; its first contentful paint in seconds after navigation start."""
    await page.goto(url, timeout=TIMEOUT_MS)
    ms: float = await page.evaluate(FCP_JS)
    return ms / 1000


async def first_paint(bench: Bench, browser: Browser, page_url: str, plain_url: str) -> None:
    async def cold(url: str) -> float:
        context = await browser.new_context()
        try:
            return await fcp(await context.new_page(), url)
        finally:
            await context.close()

    async def cold_page() -> float:
        return await cold(page_url + "/")

    async def cold_plain() -> float:
        return await cold(plain_url)

    per_repeat = bench.count(6, 1)
    measured = await bench.measure({"direct": cold_plain, "service": cold_page}, REPEATS, per_repeat)
    cold_fcp = measured.compare("service")
    note = "a fresh browser context per sample; direct: a static page of the same size, no CSS or JS"
    bench.compared("first contentful paint of /, cold cache", cold_fcp, note, label="page")

    contexts: list[BrowserContext] = []
    try:
        pages = []
        for _ in range(2):
            contexts.append(await browser.new_context())
            pages.append(await contexts[-1].new_page())

        async def warm_page() -> float:
            return await fcp(pages[0], page_url + "/")

        async def warm_plain() -> float:
            return await fcp(pages[1], plain_url)

        measured = await bench.measure({"direct": warm_plain, "service": warm_page}, REPEATS, per_repeat)
        warm_fcp = measured.compare("service")
        note = "the same page navigated again: the files revalidate by ETag (304)"
        bench.compared("first contentful paint of /, warm cache", warm_fcp, note, label="page")

        fresh = await browser.new_context()
        contexts.append(fresh)
        page = await fresh.new_page()
        await page.goto(page_url + "/", timeout=TIMEOUT_MS)
        await page.wait_for_selector("body[data-ready=true]", state="attached", timeout=TIMEOUT_MS)
        sizes: dict[str, int] = await page.evaluate(BYTES_JS)
    finally:
        for context in contexts:
            await context.close()
    bench.row(
        "what a cold load of / transfers",
        {"page p50 / p99": f"{sizes['fileBytes'] / 1024:.0f} KB in {sizes['files']} requests"},
        f"files (document, scripts, styles, icon; {sizes['fileBody'] / 1024:.0f} KB of bodies, "
        f"uncompressed); then {sizes['api']} API calls (the schema, for the page's capabilities; models; "
        f"the list), {sizes['apiBytes'] / 1024:.1f} KB",
    )
    bench.results["page_fcp"] = {"cold": vars(cold_fcp), "warm": vars(warm_fcp), "transfer": sizes}
    ratio = statistics.median(cold_fcp.ratios) if cold_fcp.ratios else float("nan")
    bench.target(
        "Page: first contentful paint of /, cold cache",
        f"<= {FCP_TARGET_RATIO:.0f}x a plain page's (p50)",
        f"{fmt_ms(cold_fcp.other.p50)} vs {fmt_ms(cold_fcp.baseline.p50)} ms, "
        f"{spread(cold_fcp.ratios, 'x', 2)}",
        ratio <= FCP_TARGET_RATIO,
    )


async def open_long(bench: Bench, browser: Browser, url: str, cid: str, last_id: str) -> None:
    context = await browser.new_context()
    try:
        page = await context.new_page()
        await page.goto(url + "/", timeout=TIMEOUT_MS)
        await page.wait_for_selector(
            f'#conversations li[data-id="{cid}"]', state="attached", timeout=TIMEOUT_MS
        )
        fetches: list[float] = []
        spent: dict[str, list[float]] = {"LayoutDuration": [], "RecalcStyleDuration": []}
        cdp = await context.new_cdp_session(page)  # the renderer's own counters of time spent
        await cdp.send("Performance.enable")

        async def counters() -> dict[str, float]:
            metrics = (await cdp.send("Performance.getMetrics"))["metrics"]
            return {m["name"]: float(m["value"]) for m in metrics if m["name"] in spent}

        async def open_it() -> float:
            before = await counters()
            took, fetched = await page.evaluate(OPEN_JS, [cid, last_id])
            after = await counters()
            for name in spent:
                spent[name].append(after[name] - before[name])
            fetches.append(fetched)
            return float(took) / 1000

        async def plain() -> float:
            took: float = await page.evaluate(PLAIN_JS, cid)
            return took / 1000

        measured = await bench.measure({"direct": plain, "service": open_it}, REPEATS, bench.count(4, 1), 1)
        shown = await page.locator("#messages > li").count()
    finally:
        await context.close()
    comparison = measured.compare("service")
    size = len((await bench.client.get(f"{url}/api/conversations/{cid}")).content) // 1024
    fetch = Stats.of([f / 1000 for f in fetches if f >= 0])
    layout, style = (Stats.of(spent[name]) for name in ("LayoutDuration", "RecalcStyleDuration"))
    note = (
        f"{shown} messages shown, {size} KB of JSON; from a click in the side list to the last message "
        f"painted; of which p50: the GET {fmt_ms(fetch.p50)} ms, layout {fmt_ms(layout.p50)} ms, "
        f"style {fmt_ms(style.p50)} ms (the rest: script); direct: the same JSON as plain-text divs"
    )
    bench.compared("open a 1,000-message conversation", comparison, note, label="page")
    bench.results["page_open_1000"] = vars(comparison)
    p50 = comparison.other.p50
    bench.target(
        "Page: open a 1,000-message conversation (p50)",
        f"< {RENDER_TARGET_MS:.0f} ms",
        f"{fmt_ms(p50)} ms (p99 {fmt_ms(comparison.other.p99)}); "
        f"plain divs {fmt_ms(comparison.baseline.p50)} ms",
        p50 < RENDER_TARGET_MS,
    )


async def stream_reply(bench: Bench, browser: Browser, url: str, cid: str) -> None:
    chunks = bench.count(1000, 200)
    replies = bench.count(2, 1)
    context = await browser.new_context()
    watches: list[dict[str, Any]] = []
    renders: list[tuple[float, int]] = []
    try:
        await context.add_init_script(RENDER_TIMER_JS)
        page = await context.new_page()
        await page.goto(f"{url}/#c={cid}", timeout=TIMEOUT_MS)
        await page.wait_for_selector("body[data-ready=true]", state="attached", timeout=TIMEOUT_MS)
        for _ in range(replies):
            before = await page.locator("#messages > li.msg.assistant").count()
            await page.evaluate(WATCH_JS)
            await page.locator("#input").fill(f"chunks={chunks} delay=0.02 md")
            await page.locator("#input").press("Enter")
            # done: the reply is saved and shown again with its buttons (the page's refresh after a turn)
            await page.wait_for_selector(
                f"#messages > li.msg.assistant >> nth={before} >> .meta button", timeout=TIMEOUT_MS
            )
            watches.append(await page.evaluate("() => ({ ...window.__watch, live: null })"))
            renders += [(float(d), int(n)) for d, n in await page.evaluate("() => window.__renders")]
    finally:
        await context.close()
    report_stream(bench, chunks, watches, renders)


def report_stream(
    bench: Bench, chunks: int, watches: list[dict[str, Any]], renders: list[tuple[float, int]]
) -> None:
    outside = sum(int(w["outside"]) for w in watches)
    frames = len(renders)  # the page's render callbacks while the replies streamed
    ended = all(w["ended"] for w in watches)
    durations = [d for d, _ in renders]
    stats = Stats.of([d / 1000 for d in durations])
    quarter = max(1, len(renders) // 4)
    ordered = sorted(renders, key=lambda r: r[1])
    early, late = ordered[:quarter], ordered[-quarter:]
    lengths = [n for _, n in renders]
    slope = statistics.linear_regression(lengths, durations).slope if len(set(lengths)) > 1 else 0.0
    short, long = statistics.median(d for d, _ in early), statistics.median(d for d, _ in late)
    growth = (
        f"median {fmt_ms(short)} ms at {early[-1][1]:,} chars or fewer, {fmt_ms(long)} ms at "
        f"{late[0][1]:,}-{late[-1][1]:,} chars; slope {slope * 1000 * 1000:.0f} µs per 1,000 chars"
    )
    bench.row(
        "streamed reply: render per frame",
        {"page p50 / p99": stats.cell()},
        f"{len(watches)} replies of {chunks} deltas (Markdown, 20 ms apart) in a 50-message conversation; "
        f"{frames} renders; by the reply's length so far: {growth}",
    )
    bench.row(
        "streamed reply: mutations outside its message",
        {"page p50 / p99": f"{outside} of {outside + sum(int(w['inside']) for w in watches)}"},
        "MutationObserver on the transcript, from the reply's first render to its end"
        + ("; outside: " + ", ".join(t for w in watches for t in w["outsideTargets"]) if outside else "")
        + ("" if ended else "; NOT every reply was seen to end"),
    )
    bench.results["page_stream"] = {"watches": watches, "renders": renders, "per_frame": vars(stats)}
    bench.target(
        "Page: render per frame stays flat as a streamed reply grows",
        "median, longest quarter <= 1.5x shortest",
        f"{fmt_ms(short)} -> {fmt_ms(long)} ms ({long / short:.2f}x)",
        long <= 1.5 * short,
    )
    bench.target(
        "Page: a streamed delta re-renders only its message",
        "0 mutations outside it",
        f"{outside} in {frames} renders",
        outside == 0 and ended and frames > 0 and all(int(w["changes"]) > 0 for w in watches),
    )


SCENARIO = Scenario(
    "page", "the page in headless Chromium: first paint, 1,000 messages, a streamed delta", run
)
