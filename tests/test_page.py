"""The page in a real headless Chromium (Playwright driving Debian's `chromium`) against the service
on a loopback port, with the fake upstream standing in for the providers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import Browser, Page, expect, sync_playwright

import main
import page as page_module
from tests import exports
from tests.browser import CHROMIUM_ARGS, Served, Watch, browser_context, chromium_path
from tests.conftest import TOKEN, settings_for
from tests.fake_upstream import FakeUpstream, Reply

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "docs" / "screenshots"
# Waits are for events, not time: generous bounds for a busy 2-core machine (SDK imports, CI).
expect.set_options(timeout=30_000)


# --- the page's headers, without a browser --------------------------------------------------------


def test_page_and_files_carry_the_strict_headers(client: TestClient) -> None:
    for path in ("/", "/static/app.js", "/static/vendor/purify.es.mjs", "/static/nope.js"):
        response = client.get(path)
        assert response.status_code == (404 if "nope" in path else 200), path
        csp = response.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
    assert client.get("/").headers["content-type"] == "text/html; charset=utf-8"
    assert client.get("/static/app.js").headers["content-type"] == "text/javascript; charset=utf-8"
    assert client.get("/static/nope.js").json()["type"] == "not_found"


def test_files_are_revalidated_by_etag(client: TestClient) -> None:
    first = client.get("/static/style.css")
    again = client.get("/static/style.css", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


def test_no_path_outside_static_is_served(client: TestClient) -> None:
    for path in ("/static/../main.py", "/static/%2e%2e/main.py", "/static/vendor/../../SPEC.md", "/static/"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert b"def " not in response.content


def test_page_needs_no_token_but_the_api_does(make_client: Callable[..., TestClient]) -> None:
    client = make_client(CHAT_API_TOKEN=TOKEN)
    assert client.get("/").status_code == 200
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/api/conversations").status_code == 401
    assert client.get("/api/conversations", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_the_page_loads_nothing_from_another_host() -> None:
    for name, file in page_module.FILES.items():
        if name.endswith((".html", ".css")) or name in ("app.js", "api.js", "render.js"):
            text = file.body.decode()
            assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), name
            assert not re.search(r"""url\(\s*["']?(https?:)?//""", text), name
            assert not re.search(r"""import[^;]*from\s*["'](https?:)?//""", text), name
    html = page_module.FILES["index.html"].body.decode()
    assert "<script>" not in html, "inline script in index.html"
    assert not re.search(r"<[^>]+\son[a-z]+=", html), "inline event handler in index.html"


# --- browser fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = chromium_path()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        yield launched
        launched.close()


@dataclass
class App:
    """The service, one browser tab on it, and an HTTP client for checking what reached the disk."""

    served: Served
    page: Page
    watch: Watch
    http: httpx2.Client
    upstream: FakeUpstream
    context: Any
    data_dir: Path

    def goto(self, fragment: str = "", *, ready: bool = True) -> None:
        self.page.goto(self.served.url + "/" + fragment)
        if ready:
            expect(self.page.locator("body")).to_have_attribute("data-ready", "true")

    def send(self, text: str) -> None:
        self.page.locator("#input").fill(text)
        self.page.locator("#input").press("Enter")

    def wait_reply_done(self, count: int = 1) -> None:
        replies = self.page.locator("#messages .msg.assistant")
        expect(replies).to_have_count(count)
        expect(replies.nth(count - 1)).not_to_have_attribute("data-status", "generating")
        expect(self.page.locator("#send")).to_be_visible()

    def conversations(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.http.get("/api/conversations").json()["items"]
        return items

    def on_disk(self, conversation_id: str) -> dict[str, Any]:
        """The conversation's file itself: every message of every branch, as stored."""
        stored: dict[str, Any] = json.loads(
            (self.data_dir / "conversations" / f"{conversation_id}.json").read_text()
        )
        return stored


@pytest.fixture
def open_app(browser: Browser, upstream: FakeUpstream, data_dir: Path) -> Iterator[Callable[..., App]]:
    """open_app(context options..., settings=...) -> an App with the page loaded (not yet ready)."""
    opened: list[tuple[Served, Any, httpx2.Client]] = []

    def open_(settings: dict[str, Any] | None = None, **options: Any) -> App:
        settings = settings or {}
        served = Served(main.create_app(settings_for(upstream, data_dir, **settings))).__enter__()
        token = settings.get("CHAT_API_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        http = httpx2.Client(base_url=served.url, headers=headers, timeout=30)
        manager = browser_context(browser, served.url, **options)
        context, watch = manager.__enter__()
        opened.append((served, manager, http))
        return App(served, context.new_page(), watch, http, upstream, context, data_dir)

    yield open_
    for served, manager, http in reversed(opened):
        manager.__exit__(None, None, None)
        http.close()
        served.__exit__()


@pytest.fixture
def app(open_app: Callable[..., App]) -> App:
    opened = open_app()
    opened.goto()
    return opened


# --- chat -----------------------------------------------------------------------------------------

MARKDOWN_REPLY = (
    "Here is **bold** and a list:\n\n- one\n- two\n\n```python\ndef hello():\n    return 'hi'\n```\n\nDone."
)


def test_chat_streams_renders_markdown_and_saves(app: App) -> None:
    app.upstream.script(Reply(text=MARKDOWN_REPLY, chunks=8, chunk_delay=0.15))
    app.send("Show me some code")
    reply = app.page.locator("#messages .msg.assistant").first
    # while it streams: part of the text is on screen and the Stop button is offered
    expect(app.page.locator("#stop")).to_be_visible()
    expect(reply.locator(".content")).to_contain_text("Here is")
    app.wait_reply_done()
    expect(reply.locator(".content strong")).to_have_text("bold")
    expect(reply.locator(".content li")).to_have_count(2)
    code = reply.locator(".code pre code")
    expect(code).to_have_class(re.compile(r"\bhljs\b"))
    expect(code.locator(".hljs-keyword").first).to_have_text("def")
    expect(reply.locator(".meta")).to_contain_text("out tokens")
    expect(app.page.locator("#messages .msg.user .content")).to_have_text("Show me some code")
    # on disk, and in the side list, and the address names the conversation
    (item,) = app.conversations()
    saved = app.http.get(f"/api/conversations/{item['id']}").json()
    assert [m["content"] for m in saved["messages"]] == ["Show me some code", MARKDOWN_REPLY]
    expect(app.page.locator("#conversations li")).to_have_count(1)
    expect(app.page).to_have_url(re.compile(f"#c={item['id']}$"))
    expect(app.page.locator("#title")).to_have_text(item["title"])
    app.watch.assert_clean()


KEEP_WATCH_JS = """() => {
  const li = document.querySelector("#messages .msg.assistant");
  const content = li.querySelector(".content");
  const paragraph = content.querySelector(":scope > p");
  const watch = { generating: li.dataset.status === "generating", ended: false, renders: 0, removed: false };
  window.__keep = watch;
  new MutationObserver((records) => {
    for (const r of records) {
      if (watch.ended) return;
      if (r.target === li && r.attributeName === "data-status") watch.ended = true;
      else if (r.target === content) watch.renders += 1;
      if ([...r.removedNodes].includes(paragraph)) watch.removed = true;
    }
  }).observe(li, { subtree: true, childList: true, attributes: true });
  return watch.generating;
}"""


def test_a_streaming_reply_renders_its_finished_blocks_once(app: App) -> None:
    paragraphs = [f"Paragraph {i} with **bold** " + "word " * 15 for i in range(6)]
    app.upstream.script(Reply(text="\n\n".join(paragraphs), chunks=60, chunk_delay=0.1))
    app.send("several paragraphs")
    reply = app.page.locator("#messages .msg.assistant").first
    expect(reply.locator(".content")).to_contain_text("Paragraph 2")
    # paragraph 0 is settled once paragraph 1 is complete: the frames after it leave it alone
    assert app.page.evaluate(KEEP_WATCH_JS), "the reply ended before it could be watched"
    app.wait_reply_done()
    watch = app.page.evaluate("window.__keep")
    assert watch["ended"] and watch["renders"] > 0
    assert not watch["removed"], "a finished paragraph was rendered again while the reply streamed"
    # and the reply as a whole is rendered as one at the end
    expect(reply.locator(".content > p")).to_have_count(6)
    expect(reply.locator(".content strong")).to_have_count(6)
    app.watch.assert_clean()


def test_copy_button_copies_the_code(app: App) -> None:
    app.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=app.served.url)
    app.upstream.script(Reply(text="```\nprint('copied')\n```"))
    app.send("code please")
    app.wait_reply_done()
    app.page.locator(".code .copy").click()
    expect(app.page.locator(".code .copy")).to_have_text("Copied")
    assert app.page.evaluate("navigator.clipboard.readText()") == "print('copied')\n"
    app.watch.assert_clean()


def test_a_reload_shows_the_conversation_from_the_address(app: App) -> None:
    app.send("remember me")
    app.wait_reply_done()
    app.page.reload()
    expect(app.page.locator("body")).to_have_attribute("data-ready", "true")
    expect(app.page.locator("#messages .msg")).to_have_count(2)
    expect(app.page.locator("#messages .msg.assistant .content")).to_have_text("You said: remember me")
    app.watch.assert_clean()


def test_stop_ends_the_reply_and_keeps_what_was_written(app: App) -> None:
    app.upstream.script(Reply(text=" ".join(f"w{i}" for i in range(200)), chunk_delay=0.05))
    app.send("a long one")
    reply = app.page.locator("#messages .msg.assistant").first
    expect(reply.locator(".content")).to_contain_text("w3")
    app.page.locator("#stop").click()
    expect(app.page.locator("#send")).to_be_visible()
    assert app.upstream.wait_closed(0, timeout=30) is not None  # the upstream stream was closed
    expect(reply.locator(".meta")).to_contain_text(re.compile("stopped|incomplete"))
    (item,) = app.conversations()

    def saved_reply() -> dict[str, Any]:
        message: dict[str, Any] = app.http.get(f"/api/conversations/{item['id']}").json()["messages"][-1]
        return message

    expect_eventually(lambda: saved_reply()["status"] == "incomplete" and saved_reply()["content"] != "")
    text = saved_reply()["content"]
    assert text.startswith("w0 w1 w2 w3") and not text.endswith("w199")


def expect_eventually(check: Callable[[], bool], attempts: int = 300) -> None:
    """Poll a condition that another thread makes true (the save after a disconnect)."""
    import time

    for _ in range(attempts):
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("condition never became true")


def test_keyboard_only_send_with_shift_enter_for_a_new_line(app: App) -> None:
    page = app.page
    expect(page.locator("#input")).to_be_focused()
    page.keyboard.type("first line")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("second line")
    page.keyboard.press("Enter")
    app.wait_reply_done()
    expect(page.locator("#messages .msg.user .content")).to_have_text("first line\nsecond line")
    # and the side list's entry can be reached and opened with the keyboard
    page.locator("#new-chat").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#messages .msg")).to_have_count(0)
    expect(page.locator("#input")).to_be_focused()
    page.locator("#conversations a").first.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#messages .msg")).to_have_count(2)
    app.watch.assert_clean()


# --- models, settings, errors -------------------------------------------------------------------


def test_model_picker_lists_models_and_says_what_to_set(open_app: Callable[..., App]) -> None:
    app = open_app(settings={"ANTHROPIC_API_KEY": None})
    app.goto()
    picker = app.page.locator("#model")
    expect(picker).to_have_value("openai/fake-gpt-1")
    options = picker.locator("option")
    texts = options.all_text_contents()
    assert "openai/fake-gpt-1" in texts and "lmstudio/fake-gpt-1" in texts
    unconfigured = picker.locator("option", has_text="set ANTHROPIC_API_KEY")
    expect(unconfigured).to_have_count(1)
    expect(unconfigured).to_be_disabled()
    app.page.locator("#settings-toggle").click()
    expect(app.page.locator("#model-hint")).to_contain_text(
        "anthropic: set ANTHROPIC_API_KEY to use anthropic"
    )
    # choosing another model: the new chat goes to it
    picker.select_option("lmstudio/fake-gpt-2")
    app.send("which model?")
    app.wait_reply_done()
    (item,) = app.conversations()
    assert item["model"] == "lmstudio/fake-gpt-2"
    app.watch.assert_clean()


def test_system_prompt_and_temperature_per_conversation(app: App) -> None:
    page = app.page
    page.locator("#settings-toggle").click()
    page.locator("#system").fill("Answer like a pirate.")
    page.locator("#temperature").fill("0.3")
    page.locator("#settings-save").click()
    app.send("hello")
    app.wait_reply_done()
    body = app.upstream.requests[-1].body
    assert body["temperature"] == 0.3
    assert body["messages"][0] == {"role": "system", "content": "Answer like a pirate."}
    (item,) = app.conversations()
    # change them on the open conversation: stored on it, and used by the next turn
    page.locator("#system").fill("Answer briefly.")
    page.locator("#temperature").fill("1.1")
    page.locator("#settings-save").click()
    expect(page.locator("#settings-status")).to_have_text("Saved.")
    stored = app.http.get(f"/api/conversations/{item['id']}").json()
    assert stored["system"] == "Answer briefly." and stored["params"]["temperature"] == 1.1
    app.send("again")
    app.wait_reply_done(2)
    body = app.upstream.requests[-1].body
    assert body["temperature"] == 1.1 and body["messages"][0]["content"] == "Answer briefly."
    app.watch.assert_clean()


def test_an_unconfigured_provider_says_what_to_set_and_keeps_the_message(
    open_app: Callable[..., App],
) -> None:
    app = open_app(settings={"OPENAI_API_KEY": None})
    app.goto()
    app.send("hello there")
    notice = app.page.locator("#notice")
    expect(notice).to_be_visible()
    expect(notice).to_contain_text("This provider is not configured")
    expect(notice).to_contain_text("OPENAI_API_KEY")
    expect(app.page.locator("#input")).to_have_value("hello there")
    expect(app.page.locator("#messages .msg")).to_have_count(0)
    assert app.conversations() == []


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (Reply(status=429, headers={"retry-after": "7"}), "The provider is rate limiting"),
        (Reply(status=401), "The provider refused the API key"),
        (Reply(mode="midstream_error", text="half of it then"), "Something went wrong|provider"),
    ],
    ids=["rate_limited", "auth_failed", "midstream"],
)
def test_each_error_type_gets_a_clear_message(app: App, reply: Reply, expected: str) -> None:
    app.upstream.script(reply, reply, reply)
    app.send("trouble")
    notice = app.page.locator("#notice")
    expect(notice).to_be_visible()
    expect(notice).to_contain_text(re.compile(expected))
    expect(app.page.locator("#send")).to_be_visible()
    expect(app.page.locator("#messages .msg.assistant .msg-error")).to_have_count(1)


# --- branches: regenerate, edit, versions ---------------------------------------------------------


def chat_requests(app: App) -> list[Any]:
    """What reached the upstream as a chat (the model listings left out)."""
    return [r for r in app.upstream.requests if r.method == "POST"]


def test_regenerate_and_switch_versions_with_the_arrows(app: App) -> None:
    page = app.page
    app.upstream.script(Reply(text="The first answer."), Reply(text="The second answer."))
    app.send("a question worth two answers")
    app.wait_reply_done()
    reply = page.locator("#messages .msg.assistant")
    expect(reply.locator(".content")).to_have_text("The first answer.")
    expect(reply.locator(".versions")).to_have_count(0)  # one version: no arrows
    reply.get_by_role("button", name="Regenerate").click()
    expect(reply.locator(".content")).to_have_text("The second answer.")
    app.wait_reply_done()
    expect(reply.locator(".version-label")).to_have_text("2 / 2")
    expect(reply.get_by_role("button", name="Next version")).to_be_disabled()
    expect(page.locator("#messages .msg")).to_have_count(2)
    # both versions are on disk, siblings under the same question
    (item,) = app.conversations()
    stored = app.on_disk(item["id"])
    answers = [m for m in stored["messages"] if m["role"] == "assistant"]
    assert [m["content"] for m in answers] == ["The first answer.", "The second answer."]
    assert answers[0]["parent_id"] == answers[1]["parent_id"] is not None
    assert stored["current_id"] == answers[1]["id"]
    # the arrows switch what is shown, and the choice is stored
    reply.get_by_role("button", name="Previous version").click()
    expect(reply.locator(".version-label")).to_have_text("1 / 2")
    expect(reply.locator(".content")).to_have_text("The first answer.")
    expect(reply.get_by_role("button", name="Previous version")).to_be_disabled()
    assert app.on_disk(item["id"])["current_id"] == answers[0]["id"]
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(reply.locator(".content")).to_have_text("The first answer.")
    reply.get_by_role("button", name="Next version").click()
    expect(reply.locator(".version-label")).to_have_text("2 / 2")
    expect(reply.locator(".content")).to_have_text("The second answer.")
    assert app.on_disk(item["id"])["current_id"] == answers[1]["id"]
    # a third version: "3 / 3", and the middle one is still reachable
    app.upstream.script(Reply(text="The third answer."))
    reply.get_by_role("button", name="Regenerate").click()
    expect(reply.locator(".content")).to_have_text("The third answer.")
    app.wait_reply_done()
    expect(reply.locator(".version-label")).to_have_text("3 / 3")
    reply.get_by_role("button", name="Previous version").click()
    expect(reply.locator(".version-label")).to_have_text("2 / 3")
    expect(reply.locator(".content")).to_have_text("The second answer.")
    stored = app.on_disk(item["id"])
    assert [m["content"] for m in stored["messages"] if m["role"] == "assistant"] == [
        "The first answer.",
        "The second answer.",
        "The third answer.",
    ]
    assert len(chat_requests(app)) == 3
    app.watch.assert_clean()


def test_edit_a_question_into_a_new_branch(app: App) -> None:
    page = app.page
    app.send("the original question")
    app.wait_reply_done()
    app.send("a follow-up")
    app.wait_reply_done(2)
    first = page.locator("#messages .msg.user").first
    first.get_by_role("button", name="Edit").click()
    editor = first.get_by_role("textbox", name="Edit message")
    expect(editor).to_have_value("the original question")
    editor.fill("the edited question")
    editor.press("Enter")
    expect(page.locator("#messages .msg.assistant .content")).to_have_text(["You said: the edited question"])
    app.wait_reply_done()
    expect(page.locator("#messages .msg")).to_have_count(2)
    question = page.locator("#messages .msg.user")
    expect(question.locator(".content")).to_have_text("the edited question")
    expect(question.locator(".version-label")).to_have_text("2 / 2")
    # on disk: the old branch is intact beside the new one
    (item,) = app.conversations()
    stored = app.on_disk(item["id"])
    by_id = {m["id"]: m for m in stored["messages"]}
    contents = [m["content"] for m in stored["messages"]]
    assert contents == [
        "the original question",
        "You said: the original question",
        "a follow-up",
        "You said: a follow-up",
        "the edited question",
        "You said: the edited question",
    ]
    old, new = stored["messages"][0], stored["messages"][4]
    assert old["parent_id"] == new["parent_id"]
    assert by_id[stored["current_id"]]["content"] == "You said: the edited question"
    # back to the old branch: all of it is shown again
    question.get_by_role("button", name="Previous version").click()
    expect(page.locator("#messages .msg .content")).to_have_text(
        ["the original question", "You said: the original question", "a follow-up", "You said: a follow-up"]
    )
    expect(page.locator("#messages .msg.user").first.locator(".version-label")).to_have_text("1 / 2")
    assert app.on_disk(item["id"])["current_id"] == stored["messages"][3]["id"]
    app.watch.assert_clean()


def test_a_reload_mid_reply_reattaches_and_the_reply_completes(app: App) -> None:
    words = " ".join(f"w{i}" for i in range(150))
    app.upstream.script(Reply(text=words, chunk_delay=0.05))
    app.send("a long one to survive a reload")
    reply = app.page.locator("#messages .msg.assistant")
    expect(reply.locator(".content")).to_contain_text("w3")
    expect(app.page).to_have_url(re.compile(r"#c=[0-9a-f]{32}$"))
    with app.page.expect_request(re.compile(r"/messages/[0-9a-f]{32}/stream$")) as reattached:
        app.page.reload()
    assert reattached.value.method == "GET"
    expect(app.page.locator("body")).to_have_attribute("data-ready", "true")
    # the page re-attached to the reply still being written and shows it to the end
    expect(reply.locator(".content")).to_have_text(words)
    app.wait_reply_done()
    expect(reply.locator(".meta")).not_to_contain_text("incomplete")
    (item,) = app.conversations()
    saved = app.on_disk(item["id"])["messages"][-1]
    assert saved["content"] == words and saved["status"] == "complete"
    (asked,) = chat_requests(app)  # re-attached, not asked again
    assert asked.closed_at is not None
    assert app.watch.page_errors == [] and app.watch.foreign_requests == []


# --- search, import, export -----------------------------------------------------------------------

SEARCH_PAYLOAD = "Where do <b>zebras</b> sleep? <img src=x onerror=\"window.__xss='search'\">"


def chat_turn(app: App, message: str, conversation_id: str | None = None) -> str:
    """One turn through the API (not the page): returns the conversation id."""
    body: dict[str, Any] = {"message": message, "stream": False}
    if conversation_id:
        body["conversation_id"] = conversation_id
    response = app.http.post("/api/chat", json=body)
    assert response.status_code == 200, response.text
    found: str = response.json()["conversation_id"]
    return found


def test_search_opens_the_conversation_at_the_message(open_app: Callable[..., App]) -> None:
    app = open_app(viewport={"width": 1000, "height": 600})
    other = chat_turn(app, "nothing to find here")
    target = chat_turn(app, "filler 0 " + "lorem ipsum " * 60)
    for n in range(1, 4):
        chat_turn(app, f"filler {n} " + "lorem ipsum " * 60, target)
    chat_turn(app, SEARCH_PAYLOAD, target)
    for n in range(4, 9):
        chat_turn(app, f"filler {n} " + "lorem ipsum " * 60, target)
    hits = app.http.get("/api/search", params={"q": "zebras"}).json()["items"]
    assert {h["conversation_id"] for h in hits} == {target} and hits[0]["message_id"]
    app.goto(f"#c={other}")
    page = app.page
    page.locator("#search").fill("zebras")
    results = page.locator("#search-results .hit")
    expect(results).to_have_count(len(hits))
    expect(page.locator("#conversations")).to_be_hidden()
    first = results.first
    expect(first.locator("mark").first).to_have_text(re.compile("^zebras$", re.IGNORECASE))
    expect(first.locator(".snippet")).to_contain_text("<b>zebras</b>")  # the markup is shown as text
    assert page.locator("#search-results b, #search-results img").count() == 0
    first.click()
    expect(page).to_have_url(re.compile(f"#c={target}$"))
    expect(page.locator("#messages .msg")).to_have_count(20)
    message = page.locator(f"#m-{hits[0]['message_id']}")
    expect(message).to_have_class(re.compile(r"\bflash\b"))
    expect(message).to_be_in_viewport()
    expect(page.locator("#messages .msg").last).not_to_be_in_viewport()  # not simply scrolled to the end
    expect(message.locator(".content")).to_contain_text("<b>zebras</b>")
    assert page.locator("#messages img, #messages b").count() == 0
    assert page.evaluate("window.__xss") is None
    app.watch.assert_clean()


def test_import_a_chatgpt_export_and_open_its_conversations(app: App) -> None:
    rich = exports.chatgpt_rich()
    evil = exports.ChatGPTConversation(exports.uid(1, "xss"), title=XSS_TITLE)
    question = evil.add(
        "client-created-root", "user", exports.text("<script>window.__xss='question'</script>")
    )
    evil.add(question, "assistant", exports.text(XSS_REPLY))
    payload = exports.dumps([rich, evil.doc()])
    page = app.page
    page.locator("#import-file").set_input_files(
        {"name": "conversations.json", "mimeType": "application/json", "buffer": payload}
    )
    report = page.locator("#report-dialog")
    expect(report).to_be_visible()
    expect(report.locator("#report p").first).to_have_text("Imported 2 conversations, skipped 0.")
    expect(report).to_contain_text("Left out (no place for them here)")
    links = report.locator(".report-imported a")
    expect(links).to_have_count(2)
    expect(links.first).to_contain_text("Sorting in Python")
    expect(page.locator("#conversations a")).to_have_count(2)
    # open one from the report: the branch the export had current is shown
    links.first.click()
    expect(report).to_be_hidden()
    expect(page.locator("#title")).to_have_text("Sorting in Python")
    conversation_id = page.url.rsplit("#c=", 1)[1]
    shown = app.http.get(f"/api/conversations/{conversation_id}").json()["messages"]
    assert len(shown) >= 2
    expect(page.locator("#messages .msg")).to_have_count(len(shown))
    expect(page.locator("#messages .msg.user .content").first).to_have_text(shown[0]["content"])
    # the one with a hostile title and text: shown as text, nothing runs, nothing loads
    page.locator("#conversations a", has_text=XSS_TITLE).click()
    expect(page.locator("#title")).to_have_text(XSS_TITLE)
    expect(page.locator("#messages .msg.user .content")).to_have_text(
        "<script>window.__xss='question'</script>"
    )
    content = page.locator("#messages .msg.assistant .content")
    expect(content).to_contain_text("ok link")
    for tag in ("script", "img", "svg", "iframe", "style"):
        assert content.locator(tag).count() == 0, tag
    assert page.locator("body script:not([src]), body img, body iframe").count() == 0
    for link in content.locator("a").all():
        assert not (link.get_attribute("href") or "").lower().startswith("javascript")
    assert page.evaluate("window.__xss") is None
    app.watch.assert_clean()


def test_export_one_conversation_as_markdown_and_json(app: App) -> None:
    page = app.page
    app.send("Plans for Zürich: <b>trains</b>")
    app.wait_reply_done()
    (item,) = app.conversations()
    page.locator("#export-one").click()
    dialog = page.locator("#export-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#export-title")).to_have_text("Export this conversation")
    with page.expect_download() as markdown_download:
        page.locator("#export-markdown").click()
    expect(dialog).to_be_hidden()
    markdown = markdown_download.value
    # the exact UTF-8 name from Content-Disposition's filename*, not its ASCII fallback
    assert markdown.suggested_filename.startswith("Plans for Zürich")
    assert markdown.suggested_filename.endswith(f" - {item['id'][:8]}.md")
    text = Path(markdown.path()).read_text(encoding="utf-8")
    assert "Plans for Zürich: <b>trains</b>" in text and "You said: Plans for Zürich" in text
    # JSON: the file exactly as stored, every branch
    page.locator("#export-one").click()
    with page.expect_download() as json_download:
        page.locator("#export-json").click()
    assert json_download.value.suggested_filename.endswith(f"{item['id'][:8]}.json")
    exported = Path(json_download.value.path()).read_bytes()
    assert exported == (app.data_dir / "conversations" / f"{item['id']}.json").read_bytes()
    # cancel downloads nothing
    page.locator("#export-one").click()
    page.locator("#export-cancel").click()
    expect(dialog).to_be_hidden()
    app.watch.assert_clean()


def test_export_all_downloads_a_zip_that_imports_back(app: App) -> None:
    page = app.page
    ids = [chat_turn(app, f"conversation number {n}") for n in range(3)]
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    page.locator("#export-all").click()
    expect(page.locator("#export-title")).to_have_text("Export every conversation")
    with page.expect_download() as download:
        page.locator("#export-json").click()
    assert re.fullmatch(r"conversations-json-\d{4}-\d{2}-\d{2}\.zip", download.value.suggested_filename)
    with zipfile.ZipFile(download.value.path()) as archive:
        names = sorted(archive.namelist())
        assert names == sorted(f"conversations/{i}.json" for i in ids)
        for i in ids:
            assert (
                archive.read(f"conversations/{i}.json")
                == (app.data_dir / "conversations" / f"{i}.json").read_bytes()
            )
    # the zip goes back in through the page: nothing new, each reported as already there
    page.locator("#import-file").set_input_files(download.value.path())
    report = page.locator("#report-dialog")
    expect(report).to_be_visible()
    expect(report.locator("#report p").first).to_have_text("Imported 0 conversations, skipped 3.")
    expect(report.locator(".report-skipped li")).to_have_count(3)
    assert len(app.conversations()) == 3
    app.watch.assert_clean()


# --- usage and budgets ----------------------------------------------------------------------------


def test_cost_per_reply_and_conversation_and_the_budget_message(open_app: Callable[..., App]) -> None:
    app = open_app(
        settings={
            "CHAT_PRICES": {"openai/*": {"input": 100, "output": 100}},  # USD per million tokens
            "CHAT_BUDGETS": {"openai": {"day": 0.5}},
        }
    )
    app.goto()
    page = app.page
    app.upstream.script(Reply(text="first", usage=(2_000, 500)), Reply(text="second", usage=(2_000, 1_000)))
    app.send("what does it cost?")
    app.wait_reply_done()
    replies = page.locator("#messages .msg.assistant .meta")
    expect(replies.nth(0)).to_contain_text("2000 in / 500 out tokens")
    expect(replies.nth(0)).to_contain_text("$0.25")
    expect(page.locator("#totals")).to_have_text("2500 tokens \u00b7 $0.25")
    app.send("and now?")
    app.wait_reply_done(2)
    expect(replies.nth(1)).to_contain_text("2000 in / 1000 out tokens")
    expect(replies.nth(1)).to_contain_text("$0.30")
    expect(page.locator("#totals")).to_have_text("5500 tokens \u00b7 $0.55")
    # the day's $0.50 is spent: the next message is refused with when it resets, and kept
    app.send("one more")
    notice = page.locator("#notice")
    expect(notice).to_be_visible()
    expect(notice).to_contain_text("Budget reached")
    expect(notice).to_contain_text("It resets at")
    expect(page.locator("#input")).to_have_value("one more")
    expect(page.locator("#messages .msg")).to_have_count(4)
    (item,) = app.conversations()
    assert len(app.on_disk(item["id"])["messages"]) == 4
    assert len(chat_requests(app)) == 2
    assert app.watch.page_errors == [] and app.watch.foreign_requests == []


# --- the side list ------------------------------------------------------------------------------


def test_list_is_newest_first_and_pages_as_you_scroll(open_app: Callable[..., App]) -> None:
    app = open_app(viewport={"width": 1000, "height": 500})
    for n in range(45):
        created = app.http.post("/api/conversations", json={"title": f"chat {n:02d}"})
        assert created.status_code == 201
    app.goto()
    links = app.page.locator("#conversations a")
    expect(links).to_have_count(30)
    assert links.first.text_content() == "chat 44"
    links.nth(29).scroll_into_view_if_needed()
    expect(links).to_have_count(45)
    assert links.all_text_contents() == [f"chat {n:02d}" for n in range(44, -1, -1)]
    app.watch.assert_clean()


def test_new_chat_rename_and_delete_with_confirmation(app: App) -> None:
    page = app.page
    app.send("first chat")
    app.wait_reply_done()
    page.locator("#new-chat").click()
    expect(page.locator("#title")).to_have_text("New chat")
    app.send("second chat")
    app.wait_reply_done()
    expect(page.locator("#conversations li")).to_have_count(2)
    expect(page.locator("#conversations a").first).to_have_text("second chat")
    # rename
    page.locator("#rename").click()
    page.locator("#rename-input").fill("Renamed")
    page.locator("#rename-input").press("Enter")
    expect(page.locator("#title")).to_have_text("Renamed")
    expect(page.locator("#conversations a").first).to_have_text("Renamed")
    assert [c["title"] for c in app.conversations()] == ["Renamed", "first chat"]
    # delete: cancel first, then confirm
    page.locator("#delete").click()
    expect(page.locator("#confirm-dialog")).to_be_visible()
    expect(page.locator("#confirm-message")).to_contain_text("Renamed")
    page.locator("#confirm-cancel").click()
    assert len(app.conversations()) == 2
    page.locator("#delete").click()
    page.locator("#confirm-ok").click()
    expect(page.locator("#conversations li")).to_have_count(1)
    expect(page.locator("#title")).to_have_text("New chat")
    assert [c["title"] for c in app.conversations()] == ["first chat"]
    app.watch.assert_clean()


# --- token mode ---------------------------------------------------------------------------------


def test_token_mode_asks_once_per_session_and_says_when_it_is_wrong(open_app: Callable[..., App]) -> None:
    app = open_app(settings={"CHAT_API_TOKEN": TOKEN})
    app.http.post("/api/conversations", json={"title": "secret chat"})
    app.goto(ready=False)
    dialog = app.page.locator("#token-dialog")
    expect(dialog).to_be_visible()
    expect(app.page.locator("#conversations li")).to_have_count(0)
    app.page.locator("#token-input").fill("not-the-right-token-at-all")
    app.page.locator("#token-input").press("Enter")
    expect(app.page.locator("#token-message")).to_contain_text("That token was refused")
    app.page.locator("#token-input").fill(TOKEN)
    app.page.locator("#token-input").press("Enter")
    expect(dialog).to_be_hidden()
    expect(app.page.locator("body")).to_have_attribute("data-ready", "true")
    expect(app.page.locator("#conversations a")).to_have_text(["secret chat"])
    app.send("with a token")
    app.wait_reply_done()
    # a reload in the same tab keeps it; a new browser session asks again
    app.page.reload()
    expect(app.page.locator("body")).to_have_attribute("data-ready", "true")
    expect(dialog).to_be_hidden()
    fresh = app.context.browser.new_context()
    try:
        other = fresh.new_page()
        other.goto(app.served.url + "/")
        expect(other.locator("#token-dialog")).to_be_visible()
    finally:
        fresh.close()
    assert app.watch.page_errors == [] and app.watch.foreign_requests == []


# --- untrusted text stays inert -----------------------------------------------------------------

XSS_REPLY = "\n\n".join(
    [
        "<script>window.__xss = 'script'</script>",
        "<img src=x onerror=\"window.__xss = 'img'\">",
        "![pixel](http://198.51.100.7/track.png)",
        "[click](javascript:window.__xss='link')",
        "<a href=\"javascript:window.__xss='a'\">a</a>",
        "<svg onload=\"window.__xss='svg'\"></svg>",
        "<iframe srcdoc=\"<script>parent.__xss='iframe'</script>\"></iframe>",
        "<style>body{background:url(http://198.51.100.7/bg.png)}</style>",
        "[ok link](https://example.org/page)",
        "```html\n<script>window.__xss = 'code'</script>\n```",
    ]
)
XSS_TITLE = "<img src=x onerror=\"window.__xss='title'\"><script>window.__xss='title2'</script>"


def test_xss_in_a_reply_and_a_title_renders_inert(open_app: Callable[..., App]) -> None:
    app = open_app()
    created = app.http.post("/api/conversations", json={"title": XSS_TITLE}).json()
    app.upstream.script(Reply(text=XSS_REPLY))
    app.goto(f"#c={created['id']}")
    expect(app.page.locator("#title")).to_have_text(XSS_TITLE)
    expect(app.page.locator("#conversations a").first).to_have_text(XSS_TITLE)
    app.send("be evil")
    app.wait_reply_done()
    content = app.page.locator("#messages .msg.assistant .content")
    expect(content).to_contain_text("ok link")
    for tag in ("script", "img", "svg", "iframe", "style"):
        assert content.locator(tag).count() == 0, tag
    assert app.page.locator("body script:not([src]), body img, body iframe").count() == 0
    assert app.page.evaluate("window.__xss") is None
    for link in content.locator("a").all():
        href = link.get_attribute("href") or ""
        assert not href.lower().startswith("javascript"), href
        assert link.get_attribute("rel") == "noopener noreferrer"
        assert link.get_attribute("target") == "_blank"
    # the payloads are shown as text, and the code block keeps its text
    expect(content.locator(".code code")).to_contain_text("<script>window.__xss = 'code'</script>")
    expect(content).to_contain_text("<script>window.__xss = 'script'</script>")
    app.page.reload()
    expect(app.page.locator("body")).to_have_attribute("data-ready", "true")
    expect(app.page.locator("#messages .msg.assistant")).to_have_count(1)
    assert app.page.evaluate("window.__xss") is None
    app.watch.assert_clean()


# --- layouts ------------------------------------------------------------------------------------


def test_a_phone_sized_screen(open_app: Callable[..., App]) -> None:
    app = open_app(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    app.http.post("/api/conversations", json={"title": "on the phone"})
    app.goto()
    page = app.page
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    expect(page.locator("#sidebar")).not_to_be_in_viewport()
    expect(page.locator("#input")).to_be_in_viewport()
    page.locator("#open-sidebar").click()
    expect(page.locator("#sidebar")).to_be_in_viewport()
    page.locator("#conversations a", has_text="on the phone").click()
    expect(page.locator("#title")).to_have_text("on the phone")
    expect(page.locator("#sidebar")).not_to_be_in_viewport()
    app.send("hi from a phone")
    app.wait_reply_done()
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    app.watch.assert_clean()


@pytest.mark.parametrize(("scheme", "dark"), [("light", False), ("dark", True)])
def test_light_and_dark_follow_the_system(open_app: Callable[..., App], scheme: str, dark: bool) -> None:
    app = open_app(color_scheme=scheme)
    app.goto()
    background = app.page.evaluate("getComputedStyle(document.body).backgroundColor")
    channels = [int(c) for c in re.findall(r"\d+", background)[:3]]
    assert (sum(channels) < 150) == dark, background
    app.watch.assert_clean()


# --- screenshots (written to docs/screenshots/ only with --screenshots) ------------------------------

SHOT_REPLY = (
    "Sure. A **list comprehension** builds the list in one expression:\n\n"
    "```python\nsquares = [n * n for n in range(10) if n % 2 == 0]\n"
    "print(squares)  # [0, 4, 16, 36, 64]\n```\n\n"
    "It reads left to right: *what* to keep, *where* it comes from, and *which* items pass."
)


def test_screenshots_of_the_main_states(
    open_app: Callable[..., App], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    target = SHOTS if request.config.getoption("--screenshots") else tmp_path
    target.mkdir(parents=True, exist_ok=True)
    shots: list[tuple[str, dict[str, Any]]] = [
        ("light", {"color_scheme": "light", "viewport": {"width": 1200, "height": 760}}),
        ("dark", {"color_scheme": "dark", "viewport": {"width": 1200, "height": 760}}),
        # reduced motion: the side list is shown where it stops, not halfway through sliding in
        (
            "phone",
            {
                "color_scheme": "light",
                "viewport": {"width": 390, "height": 760},
                "is_mobile": True,
                "reduced_motion": "reduce",
            },
        ),
    ]
    first = open_app(**shots[0][1])
    for title in ("Trip to Lisbon", "SQL window functions", "Bread recipe"):
        first.http.post("/api/conversations", json={"title": title})
    first.upstream.script(Reply(text=SHOT_REPLY))
    first.goto()
    first.send("How do list comprehensions work in Python?")
    first.wait_reply_done()
    fragment = first.page.url.split("/", 3)[3]
    first.page.screenshot(path=str(target / "light.png"))
    for name, options in shots[1:]:
        context = first.context.browser.new_context(**options)
        try:
            page = context.new_page()
            page.goto(first.served.url + "/" + fragment)
            expect(page.locator("body")).to_have_attribute("data-ready", "true")
            expect(page.locator("#messages .msg")).to_have_count(2)
            page.screenshot(path=str(target / f"{name}.png"))
            if name == "phone":
                page.locator("#open-sidebar").click()
                expect(page.locator("#sidebar")).to_be_in_viewport()
                page.screenshot(path=str(target / "phone-list.png"))
        finally:
            context.close()
    for name in ("light", "dark", "phone", "phone-list"):
        assert (target / f"{name}.png").stat().st_size > 1000


# --- getting the browser on a fresh machine -----------------------------------------------------


def test_a_missing_browser_stops_the_run_saying_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # not root: no install attempted
    with pytest.raises(pytest.exit.Exception) as stop:
        chromium_path()
    assert "apt-get install -y chromium" in str(stop.value) and stop.value.returncode == 1
    assert "\n" not in str(stop.value)


def test_as_root_with_apt_the_browser_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    installed: list[list[str]] = []

    def which(name: str) -> str | None:
        if name == "apt-get":
            return "/usr/bin/apt-get"
        return "/usr/bin/chromium" if ["apt-get", "install", "-y", "chromium"] in installed else None

    def run(command: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        installed.append(command)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(shutil, "which", which)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(subprocess, "run", run)
    assert chromium_path() == "/usr/bin/chromium"
    assert installed == [["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]]
