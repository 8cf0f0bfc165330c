"""Usage, cost and limits through the real API: the ledger, prices, rate limits and budgets."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from genai_prices import Usage as PriceUsage
from genai_prices import calc_price
from pydantic import ValidationError

import main
import storage
import usage
from tests.conftest import ledger_lines, parse_events, settings_for
from tests.fake_upstream import FakeUpstream, Reply


def chat(client: TestClient, **body: Any) -> Any:
    response = client.post("/api/chat", json={"message": "Hello there", **body})
    assert response.status_code == 200, response.text
    return response.json()


def library_cost(provider: str, model: str, input_tokens: int, output_tokens: int) -> float:
    price = calc_price(
        PriceUsage(input_tokens=input_tokens, output_tokens=output_tokens),
        model_ref=model,
        provider_id=provider,
    )
    return float(price.total_price)


@pytest.mark.parametrize(
    ("model", "provider", "upstream_model"),
    [
        ("openai/gpt-4o-mini", "openai", "gpt-4o-mini"),
        ("anthropic/claude-haiku-4-5", "anthropic", "claude-haiku-4-5"),
    ],
)
def test_known_models_cost_what_the_price_table_says(
    client: TestClient, upstream: FakeUpstream, data_dir: Path, model: str, provider: str, upstream_model: str
) -> None:
    upstream.script(Reply(text="fine", usage=(12_000, 3_000)))
    reply = chat(client, model=model)["message"]
    expected = library_cost(provider, upstream_model, 12_000, 3_000)
    assert expected > 0
    assert reply["usage"] == {"input_tokens": 12_000, "output_tokens": 3_000}
    assert reply["cost"] == pytest.approx(expected)
    [line] = ledger_lines(data_dir, 1)
    assert line["provider"] == provider and line["model"] == upstream_model
    assert (line["input_tokens"], line["output_tokens"], line["estimated"]) == (12_000, 3_000, False)
    assert line["cost"] == pytest.approx(expected)
    assert line["conversation_id"] == client.get("/api/conversations").json()["items"][0]["id"]
    assert "Hello there" not in (data_dir / "usage.jsonl").read_text()  # never any text


def test_an_unknown_price_is_null_never_a_guess(client: TestClient, data_dir: Path) -> None:
    assert chat(client, model="openai/fake-gpt-1")["message"]["cost"] is None
    assert chat(client, model="ollama/llama3.2")["message"]["cost"] is None
    assert [line["cost"] for line in ledger_lines(data_dir, 2)] == [None, None]
    totals = client.get("/api/usage", params={"group_by": "provider"}).json()
    assert totals["total"]["requests"] == 2
    assert totals["total"]["unpriced_requests"] == 2
    assert totals["total"]["cost"] == 0


def test_chat_prices_override_and_declare_free_servers(
    make_client: Callable[..., TestClient], upstream: FakeUpstream
) -> None:
    client = make_client(
        CHAT_PRICES={
            "lmstudio/*": {"input": 0.5, "output": 1.5},
            "ollama/*": 0,
            "openai/gpt-4o-mini": {"input": 1, "output": 2},
        }
    )
    upstream.script(*[Reply(text="ok", usage=(1_000_000, 2_000_000))] * 3)
    assert chat(client, model="lmstudio/any-model")["message"]["cost"] == pytest.approx(0.5 + 3.0)
    assert chat(client, model="ollama/llama3.2")["message"]["cost"] == 0
    assert chat(client, model="openai/gpt-4o-mini")["message"]["cost"] == pytest.approx(1 + 4)


def test_a_server_that_sends_no_usage_is_estimated_and_marked(
    client: TestClient, upstream: FakeUpstream, data_dir: Path
) -> None:
    upstream.script(Reply(text="word " * 40, send_usage=False))
    events = parse_events(
        client.post("/api/chat", json={"message": "x" * 400, "model": "lmstudio/m", "stream": True}).text
    )
    reply = events[-1][1]["message"]
    assert reply["usage"]["estimated"] is True
    assert reply["usage"]["input_tokens"] >= 100  # 400 characters at about 4 per token
    assert reply["usage"]["output_tokens"] >= 40
    [line] = ledger_lines(data_dir, 1)
    assert line["estimated"] is True and line["input_tokens"] == reply["usage"]["input_tokens"]


def test_a_reply_cut_by_an_error_is_counted_as_estimated(
    client: TestClient, upstream: FakeUpstream, data_dir: Path
) -> None:
    upstream.script(Reply(text="partial text that goes on", chunks=4, mode="midstream_error"))
    response = client.post("/api/chat", json={"message": "hi", "model": "openai/gpt-4o-mini"})
    assert response.status_code >= 400
    [line] = ledger_lines(data_dir, 1)
    assert line["estimated"] is True and line["output_tokens"] > 0
    upstream.script(Reply(status=401))
    client.post("/api/chat", json={"message": "hi", "model": "openai/gpt-4o-mini"})
    assert len(ledger_lines(data_dir, 1)) == 1  # refused before any text: nothing was generated


def test_conversation_and_listing_carry_totals(
    make_client: Callable[..., TestClient], upstream: FakeUpstream
) -> None:
    client = make_client(CHAT_PRICES={"openai/*": {"input": 1, "output": 1}})
    upstream.script(Reply(text="a", usage=(100, 10)), Reply(text="b", usage=(200, 20)))
    conversation_id = chat(client)["conversation_id"]
    chat(client, conversation_id=conversation_id)
    expected = {"input_tokens": 300, "output_tokens": 30, "cost": pytest.approx(330 / 1_000_000)}
    assert client.get(f"/api/conversations/{conversation_id}").json()["totals"] == expected
    assert client.get("/api/conversations").json()["items"][0]["totals"] == expected


def test_usage_groups_and_validates(make_client: Callable[..., TestClient], upstream: FakeUpstream) -> None:
    client = make_client(CHAT_PRICES={"openai/*": {"input": 1, "output": 1}, "anthropic/*": 0})
    upstream.script(Reply(usage=(10, 1)), Reply(usage=(20, 2)), Reply(usage=(40, 4)))
    chat(client, model="openai/fake-gpt-1")
    chat(client, model="openai/fake-gpt-2")
    chat(client, model="anthropic/claude-fake-1")
    today = datetime.now(UTC).date().isoformat()
    by_provider = client.get("/api/usage", params={"group_by": "provider"}).json()
    assert [(g["provider"], g["requests"], g["input_tokens"]) for g in by_provider["groups"]] == [
        ("anthropic", 1, 40),
        ("openai", 2, 30),
    ]
    assert by_provider["total"] == {
        "requests": 3,
        "input_tokens": 70,
        "output_tokens": 7,
        "cost": pytest.approx(33 / 1_000_000),
        "unpriced_requests": 0,
    }
    by_model = client.get("/api/usage", params={"group_by": "model", "from": today, "to": today}).json()
    assert [g["model"] for g in by_model["groups"]] == [
        "anthropic/claude-fake-1",
        "openai/fake-gpt-1",
        "openai/fake-gpt-2",
    ]
    by_day = client.get("/api/usage").json()
    assert [(g["day"], g["requests"]) for g in by_day["groups"]] == [(today, 3)]
    assert client.get("/api/usage", params={"from": "2000-01-01", "to": "2000-01-31"}).json()["groups"] == []
    swapped = client.get("/api/usage", params={"from": "2026-02-01", "to": "2026-01-01"})
    assert swapped.status_code == 422 and swapped.json()["detail"][0]["loc"] == ["query", "from"]
    unknown = client.get("/api/usage", params={"group_by": "week"})
    assert unknown.status_code == 422 and unknown.json()["detail"][0]["loc"] == ["query", "group_by"]


def test_rate_limit_refuses_before_anything_is_written_and_resets(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(CHAT_RATE_LIMIT="2/second")
    chat(client)
    chat(client)
    refused = client.post("/api/chat", json={"message": "third"})
    assert refused.status_code == 429
    assert refused.json()["type"] == "rate_limited"
    assert refused.headers["retry-after"] == "1"
    assert client.get("/api/conversations").json()["items"].__len__() == 2  # nothing written
    time.sleep(float(refused.headers["retry-after"]) + 0.1)  # the window itself is the thing under test
    chat(client)


def test_the_rate_is_counted_per_peer(make_client: Callable[..., TestClient]) -> None:
    client = make_client(CHAT_RATE_LIMIT="1/minute")
    chat(client)
    assert client.post("/api/chat", json={"message": "again"}).status_code == 429
    client._transport.client = ("127.0.0.2", 50001)  # type: ignore[attr-defined]  # another local peer
    assert client.post("/api/chat", json={"message": "mine"}).status_code == 200


def test_concurrent_generations_are_capped(
    make_client: Callable[..., TestClient], upstream: FakeUpstream
) -> None:
    client = make_client(CHAT_MAX_CONCURRENT_GENERATIONS=1)
    upstream.script(Reply(text="slow reply here", chunks=3, mode="stall_mid"), Reply(text="next"))
    with client.stream("POST", "/api/chat", json={"message": "first", "stream": True}) as first:
        lines = first.iter_lines()
        while "delta" not in next(lines):  # the first reply is running
            pass
        refused = client.post("/api/chat", json={"message": "second"})
        assert refused.status_code == 429
        assert refused.json()["type"] == "too_many_generations"
        assert refused.headers["retry-after"] == "1"
    # the stream's end releases its place once the reply is saved
    for _ in range(200):
        response = client.post("/api/chat", json={"message": "second"})
        if response.status_code != 429:
            break
        time.sleep(0.05)
    assert response.status_code == 200


def test_budget_holds_across_restart_and_deletion(
    make_client: Callable[..., TestClient], upstream: FakeUpstream, data_dir: Path
) -> None:
    settings = {
        "CHAT_PRICES": {"openai/*": {"input": 100, "output": 100}},
        "CHAT_BUDGETS": {"openai": {"day": 0.5, "month": 20}},
    }
    client = make_client(**settings)
    upstream.script(Reply(text="costly", usage=(5_000, 0)))
    conversation_id = chat(client)["conversation_id"]  # $0.50: the day's budget is spent
    refused = client.post("/api/chat", json={"message": "more", "conversation_id": conversation_id})
    body = refused.json()
    assert refused.status_code == 429 and body["type"] == "budget_exceeded"
    assert "retry-after" not in refused.headers
    assert refused.headers["x-should-retry"] == "false"
    assert body["provider"] == "openai" and body["period"] == "day" and body["spent"] == pytest.approx(0.5)
    tomorrow = datetime.fromisoformat(body["resets_at"].replace("Z", "+00:00"))
    assert tomorrow.date() > datetime.now(UTC).date() and tomorrow.hour == 0
    assert len(client.get(f"/api/conversations/{conversation_id}").json()["messages"]) == 2  # nothing added
    assert (
        client.post("/api/chat", json={"message": "hi", "model": "anthropic/claude-fake-1"}).status_code
        == 200
    )
    client.delete(f"/api/conversations/{conversation_id}")
    restarted = make_client(**settings)
    again = restarted.post("/api/chat", json={"message": "new one"})
    assert again.status_code == 429 and again.json()["type"] == "budget_exceeded"
    assert len(restarted.get("/api/conversations").json()["items"]) == 1  # only the anthropic one


def test_ledger_survives_a_torn_line(tmp_path: Path) -> None:
    book = usage.Ledger(tmp_path)
    book.append(usage.Entry("openai", "m", 1, 2, False, 0.5, None))
    with open(book.path, "ab") as f:
        f.write(b'{"time": "2026-11-')  # a crash in the middle of an append
    book.append(usage.Entry("openai", "m", 3, 4, True, None, "a" * 32))
    [(bucket, totals)] = usage.Ledger(tmp_path).totals()[0].items()
    assert bucket[1:] == ("openai", "m")
    assert (totals.requests, totals.input_tokens, totals.output_tokens, totals.cost, totals.unpriced) == (
        2,
        4,
        6,
        0.5,
        1,
    )


def test_bad_limit_settings_name_the_variable(upstream: FakeUpstream, data_dir: Path) -> None:
    for name, value in (
        ("CHAT_RATE_LIMIT", "thirty a minute"),
        ("CHAT_PRICES", {"no-slash": 1}),
        ("CHAT_BUDGETS", {"openai": {"week": 1}}),
        ("CHAT_MAX_CONCURRENT_GENERATIONS", 0),
    ):
        with pytest.raises(ValidationError) as caught:
            settings_for(upstream, data_dir, **{name: value})
        assert name in str(caught.value)
    assert (
        main.Settings(_env_file=None, CHAT_RATE_LIMIT="10/second;500/day").rate_limit == "10/second;500/day"
    )


def test_a_burst_cannot_slip_past_the_concurrency_limit(
    make_client: Callable[..., TestClient], upstream: FakeUpstream
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    client = make_client(CHAT_MAX_CONCURRENT_GENERATIONS=1)
    upstream.script(*[Reply(text="slow reply here", chunks=3, mode="stall_mid")] * 6)
    with ThreadPoolExecutor(6) as pool:  # six turns at once, each still being saved when the others arrive
        statuses = list(
            pool.map(lambda i: client.post("/api/chat", json={"message": f"m{i}"}).status_code, range(6))
        )
    assert statuses.count(429) == 5, statuses  # the one admitted ends with the idle timeout (504)


def test_the_total_is_summed_before_rounding(
    make_client: Callable[..., TestClient], upstream: FakeUpstream
) -> None:
    client = make_client(CHAT_PRICES={"openai/*": {"input": 0.4, "output": 0}})  # $0.0000004 a token
    upstream.script(*[Reply(usage=(1, 0))] * 3)
    for model in ("openai/fake-gpt-1", "openai/fake-gpt-2", "openai/fake-gpt-3"):
        chat(client, model=model)
    by_model = client.get("/api/usage", params={"group_by": "model"}).json()
    assert [group["cost"] for group in by_model["groups"]] == [0.0, 0.0, 0.0]  # each under a millionth
    assert by_model["total"]["cost"] == 0.000001  # 0.0000012, rounded once


def test_budget_periods_start_and_reset_on_utc_calendar_boundaries(tmp_path: Path) -> None:
    assert usage.period_bounds("day", datetime(2026, 12, 31, 23, 59, tzinfo=UTC)) == (
        "2026-12-31",
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    assert usage.period_bounds("month", datetime(2026, 12, 31, 23, 59, tzinfo=UTC)) == (
        "2026-12-01",
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    assert usage.period_bounds("month", datetime(2028, 2, 29, tzinfo=UTC)) == (
        "2028-02-01",
        datetime(2028, 3, 1, tzinfo=UTC),
    )
    today = datetime.now(UTC).date()
    last_month = today.replace(day=1) - timedelta(days=1)  # spent before both periods began
    spent = usage.Usage(
        tmp_path,
        prices={},
        rate_limit=None,
        max_concurrent=None,
        budgets={"openai": {"day": 1.0, "month": 1.5}},
    )
    spent.ledger.append(
        usage.Entry("openai", "m", 1, 1, False, 100.0, None, time=f"{last_month}T23:59:59.999Z")
    )
    spent.ledger.append(usage.Entry("openai", "m", 1, 1, False, 0.999, None, time=f"{today}T00:00:00.000Z"))
    spent.check_budget("openai")  # under both budgets: last month's spend does not count
    spent.ledger.append(usage.Entry("openai", "m", 1, 1, True, 0.001, None, time=f"{today}T00:00:01.000Z"))
    with pytest.raises(usage.LimitReached) as caught:
        spent.check_budget("openai")  # at the budget is over it
    assert caught.value.extra["period"] == "day"
    assert caught.value.extra["spent"] == pytest.approx(1.0)
    assert caught.value.extra["resets_at"] == f"{today + timedelta(days=1)}T00:00:00Z"
    spent.check_budget("anthropic")  # another provider's budget is its own


def test_a_budget_that_can_never_trip_is_said_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    budgets: usage.Budgets = {"ollama": {"day": 1}, "gpu": {"day": 1}, "openai": {"day": 1}}
    usage.Usage(tmp_path, prices={"gpu/*": 0.5}, rate_limit=None, max_concurrent=None, budgets=budgets)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "budget for ollama" in warnings[0] and "CHAT_PRICES" in warnings[0]


def test_ledger_appends_exclude_each_other_within_one_process_too(tmp_path: Path) -> None:
    book = usage.Ledger(tmp_path)
    entry = usage.Entry("openai", "m", 1, 2, False, 0.5, None)
    with storage.locked_file(book.lock_path):  # an append in progress in this process, in another thread
        other = threading.Thread(target=book.append, args=(entry,))
        other.start()
        other.join(timeout=0.5)
        assert other.is_alive(), "an append ran while another held the ledger's lock"
    other.join()
    assert len(book.path.read_bytes().splitlines()) == 1


def test_nonsense_token_counts_are_estimated_and_the_reply_saved(
    client: TestClient, upstream: FakeUpstream, data_dir: Path
) -> None:
    upstream.script(Reply(text="fine", usage=(-5, 3)))  # a compatible server's nonsense
    body = chat(client, model="openai/gpt-4o-mini")
    assert body["message"]["status"] == "complete"
    assert body["message"]["usage"]["estimated"] is True and body["message"]["usage"]["input_tokens"] > 0
    assert body["message"]["usage"]["output_tokens"] == 3  # the count that makes sense is kept
    saved = client.get(f"/api/conversations/{body['conversation_id']}").json()["messages"][-1]
    assert saved["status"] == "complete" and saved["content"] == "fine"
    [line] = ledger_lines(data_dir, 1)
    assert line["estimated"] is True and line["cost"] == body["message"]["cost"] > 0
    # and should a count reach the price table that it refuses, the cost is unknown, not an error
    assert usage.Prices({}).cost("openai", "gpt-4o-mini", -5, 3) is None


def test_an_entry_counts_at_once_and_once_while_its_line_is_written_behind(tmp_path: Path) -> None:
    book = usage.Usage(tmp_path, prices={"m/*": 1.0}, rate_limit=None, max_concurrent=None, budgets={})
    counts: list[int] = []

    async def main() -> None:
        for i in range(200):
            await book.record(
                provider="m",
                model="x",
                input_tokens=1,
                output_tokens=1,
                estimated=False,
                conversation_id=None,
            )
            # counted at once, and never twice while a batch moves from memory to the file
            totals = await asyncio.to_thread(book.totals)
            counts.append(sum(t.requests for t in totals.values()))
            if i % 7 == 0:
                await asyncio.sleep(0.001)  # let the writer take a batch now and then
        await book.flush()

    asyncio.run(main())
    assert counts == list(range(1, 201))
    assert len((tmp_path / "usage.jsonl").read_bytes().splitlines()) == 200  # every line, once
    assert sum(t.requests for t in book.totals().values()) == 200


def test_shutdown_writes_every_counted_line(upstream: FakeUpstream, data_dir: Path) -> None:
    app = main.create_app(settings_for(upstream, data_dir))
    with TestClient(app, base_url="http://127.0.0.1", client=("127.0.0.1", 50000)) as client:
        for _ in range(3):
            chat(client)
    # the app has shut down: its lines are on disk without waiting for anything
    assert len((data_dir / "usage.jsonl").read_bytes().splitlines()) == 3


def test_a_ledger_that_cannot_be_written_is_logged_and_the_writer_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    book = usage.Usage(tmp_path, prices={}, rate_limit=None, max_concurrent=None, budgets={})
    (tmp_path / "usage.jsonl").mkdir()  # a real fault: the ledger's path is a directory

    async def main() -> None:
        await book.record(
            provider="m", model="x", input_tokens=1, output_tokens=1, estimated=False, conversation_id=None
        )
        await book.flush()
        (tmp_path / "usage.jsonl").rmdir()
        await book.record(
            provider="m", model="y", input_tokens=2, output_tokens=2, estimated=False, conversation_id=None
        )
        await book.flush()

    asyncio.run(main())
    assert any("could not append 1 lines" in r.getMessage() for r in caplog.records)
    lines = (tmp_path / "usage.jsonl").read_bytes().splitlines()
    assert [orjson_model(line) for line in lines] == ["y"]  # the lost line is not counted either
    assert [bucket[2] for bucket in book.totals()] == ["y"]


def test_a_cancelled_writer_never_writes_a_line_twice(tmp_path: Path) -> None:
    book = usage.Usage(tmp_path, prices={}, rate_limit=None, max_concurrent=None, budgets={})

    async def main() -> None:
        for model in ("a", "b"):
            await book.record(
                provider="m",
                model=model,
                input_tokens=1,
                output_tokens=1,
                estimated=False,
                conversation_id=None,
            )
        assert book._writer is not None
        book._writer.cancel()  # as a loop closing with tasks pending does
        await book.record(
            provider="m", model="c", input_tokens=1, output_tokens=1, estimated=False, conversation_id=None
        )
        await book.flush()

    asyncio.run(main())
    lines = (tmp_path / "usage.jsonl").read_bytes().splitlines()
    assert sorted(orjson_model(line) for line in lines) == ["a", "b", "c"]


def orjson_model(line: bytes) -> str:
    model: str = json.loads(line)["model"]
    return model
