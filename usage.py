"""What generations cost, and the limits that keep a runaway script from spending a month in an hour.

- The ledger, `data/usage.jsonl`: one line per generation (chat, regenerate, edit, title, `/v1`)
  with provider, model, tokens, whether they were estimated, and cost; never any text. It is the
  truth for spend: deleting a conversation keeps its usage. Appended durably under a file lock, so
  several processes on one data dir share it; every process folds new lines into per-day totals
  by reading only what was appended since it last looked. A generation counts at once (budgets
  and `/api/usage` see it); its line is written moments later by one background writer, in
  batches, so that no reply waits for the ledger's fsync.
- Prices: `genai-prices`' bundled table (offline) for the `openai` and `anthropic` providers,
  overridden or extended by `CHAT_PRICES`; unknown price -> cost `None`, never a guess.
- Limits, each off until set: `CHAT_RATE_LIMIT` (per token or peer, per process),
  `CHAT_MAX_CONCURRENT_GENERATIONS` (per process) and `CHAT_BUDGETS` (spend per provider per UTC
  day/month, from the shared ledger: they hold across processes and restarts).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import math
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio.to_thread
import orjson
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat
from starlette.responses import Response

from providers import ChatRequest, Finish
from storage import locked_file
from tokens import estimate_messages, estimate_tokens
from web import JSON

log = logging.getLogger("chat.usage")

# Providers whose names mean the real vendor, so the bundled price table applies to them.
PRICED_PROVIDERS = {"openai": "openai", "anthropic": "anthropic"}
Period = Literal["day", "month"]
GroupBy = Literal["day", "model", "provider"]


class Price(BaseModel):
    """USD per million tokens."""

    model_config = ConfigDict(extra="forbid")
    input: NonNegativeFloat
    output: NonNegativeFloat


PriceSetting = NonNegativeFloat | Price  # 0 (or any number) means the same price for input and output
Budgets = dict[str, dict[Period, NonNegativeFloat]]


# --- cost ---------------------------------------------------------------------------------------


class Prices:
    """Cost in USD of a generation's tokens: `CHAT_PRICES` first, then the bundled table."""

    def __init__(self, overrides: Mapping[str, PriceSetting]) -> None:
        self.overrides = {
            key: value if isinstance(value, Price) else Price(input=value, output=value)
            for key, value in overrides.items()
        }
        self._table: Any = None
        self._table_lock = threading.Lock()
        # Models the table has no price for: the table caches what it finds, not what it misses,
        # and a miss scans every model of the provider (about 0.4 ms).
        self._unknown: set[tuple[str, str]] = set()

    def needs_table(self, provider: str, model: str) -> bool:
        """Whether pricing this generation needs the bundled table, not loaded yet."""
        overridden = f"{provider}/{model}" in self.overrides or f"{provider}/*" in self.overrides
        return self._table is None and provider in PRICED_PROVIDERS and not overridden

    def cost(self, provider: str, model: str, input_tokens: int, output_tokens: int) -> float | None:
        """Blocking until the table is loaded (about a second): `load()` it first, in a thread."""
        price = self.overrides.get(f"{provider}/{model}") or self.overrides.get(f"{provider}/*")
        if price is not None:
            return round((input_tokens * price.input + output_tokens * price.output) / 1_000_000, 10)
        vendor = PRICED_PROVIDERS.get(provider)
        if vendor is None or (vendor, model) in self._unknown:
            return None
        table = self.load()
        try:
            calculation = table.calc_price(
                table.Usage(input_tokens=input_tokens, output_tokens=output_tokens),
                model_ref=model,
                provider_id=vendor,
            )
        except (LookupError, ValueError) as exc:  # unknown model; usage the table refuses (negative)
            if isinstance(exc, LookupError):
                self._unknown.add((vendor, model))
            else:
                log.warning("no cost for %s/%s: %s", provider, model, exc)
            return None
        total: Decimal = calculation.total_price
        return float(total)

    def load(self) -> Any:
        with self._table_lock:
            if self._table is None:
                import genai_prices  # about a second: only when a priced provider is first used

                self._table = genai_prices
        return self._table


# --- the ledger ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One generation's line in the ledger."""

    provider: str
    model: str
    input_tokens: int
    output_tokens: int
    estimated: bool
    cost: float | None
    conversation_id: str | None
    time: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="milliseconds")[:-6] + "Z")

    def line(self) -> bytes:
        return orjson.dumps(self.__dict__) + b"\n"

    def totals(self) -> Totals:
        return Totals.one(self.input_tokens, self.output_tokens, self.cost)


@dataclass
class Totals:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    unpriced: int = 0  # generations whose cost is unknown: the cost total leaves them out

    @classmethod
    def one(cls, input_tokens: int, output_tokens: int, cost: object) -> Totals:
        """One generation's totals; a cost that is not a number is an unknown price."""
        if isinstance(cost, int | float):
            return cls(1, input_tokens, output_tokens, float(cost))
        return cls(1, input_tokens, output_tokens, unpriced=1)

    def add(self, other: Totals) -> None:
        self.requests += other.requests
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cost += other.cost
        self.unpriced += other.unpriced

    def out(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost": round(self.cost, 6),
            "unpriced_requests": self.unpriced,
        }


Bucket = tuple[str, str, str]  # (UTC day "YYYY-MM-DD", provider, model)


class Ledger:
    """`usage.jsonl`: appended durably by any process, folded into per-day totals by each.

    Reading keeps an offset and folds only complete new lines, so a refresh costs a `stat` when
    nothing changed. A line torn by a crash is skipped; the next append starts on a new line.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "usage.jsonl"
        self.lock_path = data_dir / "usage.jsonl.lock"  # held by every process that appends
        self._buckets: defaultdict[Bucket, Totals] = defaultdict(Totals)
        self._offset = 0
        self._identity: tuple[int, int] | None = None  # (device, inode): a replaced file is read anew
        self._mutex = threading.Lock()

    def append(self, *entries: Entry, written: Callable[[], None] = lambda: None) -> None:
        """Blocking: run in a thread. fsynced before it returns. `written` is called as the lines
        reach the file, under the lock `totals` takes: a count sees them in one place or the other."""
        line = b"".join(entry.line() for entry in entries)
        with locked_file(self.lock_path):  # may wait for another process: no other lock held
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line  # the last line was torn by a crash: don't glue onto it
                view = memoryview(line)
                with self._mutex:
                    while view:
                        view = view[os.write(fd, view) :]
                    written()
                os.fsync(fd)
            finally:
                os.close(fd)

    def totals(self, pending: Callable[[], list[Entry]] = list) -> tuple[dict[Bucket, Totals], list[Entry]]:
        """Every bucket, fresh from the file (copies), and `pending()` taken at the same moment:
        the entries counted but not yet written. Blocking: run in a thread."""
        with self._mutex:
            self._refresh()
            return {key: dataclasses.replace(t) for key, t in self._buckets.items()}, pending()

    def _refresh(self) -> None:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            self._buckets.clear()
            self._offset, self._identity = 0, None
            return
        identity = (stat.st_dev, stat.st_ino)
        if identity != self._identity or stat.st_size < self._offset:
            self._buckets.clear()
            self._offset, self._identity = 0, identity
        if stat.st_size == self._offset:
            return
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read(stat.st_size - self._offset)
        complete = chunk.rfind(b"\n") + 1  # a line still being written is read next time
        for raw in chunk[:complete].splitlines():
            self._fold(raw)
        self._offset += complete

    def _fold(self, raw: bytes) -> None:
        try:
            line = orjson.loads(raw)
            bucket = (line["time"][:10], str(line["provider"]), str(line["model"]))
            totals = Totals.one(int(line["input_tokens"]), int(line["output_tokens"]), line.get("cost"))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            if raw.strip():
                log.warning("skipped a malformed line in %s", self.path)
            return
        self._buckets[bucket].add(totals)


def aggregate(
    buckets: Mapping[Bucket, Totals], start: date | None, end: date | None, group_by: GroupBy
) -> dict[str, Totals]:
    """Totals per day, model or provider over [start, end] (inclusive UTC days), in key order."""
    groups: defaultdict[str, Totals] = defaultdict(Totals)
    for (day, provider, model), totals in buckets.items():
        if (start and day < start.isoformat()) or (end and day > end.isoformat()):
            continue
        key = {"day": day, "provider": provider, "model": f"{provider}/{model}"}[group_by]
        groups[key].add(totals)
    return {key: groups[key] for key in sorted(groups)}


# --- limits -------------------------------------------------------------------------------------


class LimitReached(Exception):
    """A generation refused before anything was written; carries the API's 429."""

    status_code = 429

    def __init__(self, kind: str, detail: str, headers: dict[str, str], **extra: Any) -> None:
        super().__init__(detail)
        self.type = kind
        self.detail = detail
        self.headers = headers
        self.extra = extra


def period_bounds(period: Period, now: datetime) -> tuple[str, datetime]:
    """The first UTC day of the period containing `now`, and when the next period starts."""
    today = now.date()
    if period == "day":
        start, reset = today, today + timedelta(days=1)
    else:
        start = today.replace(day=1)
        reset = (start + timedelta(days=32)).replace(day=1)
    return start.isoformat(), datetime(reset.year, reset.month, reset.day, tzinfo=UTC)


class Usage:
    """The ledger, the prices and the limits of one app, behind the few calls a generation makes."""

    def __init__(
        self,
        data_dir: Path,
        *,
        prices: Mapping[str, PriceSetting],
        rate_limit: str | None,
        max_concurrent: int | None,
        budgets: Budgets,
    ) -> None:
        self.ledger = Ledger(data_dir)
        self.prices = Prices(prices)
        self.budgets = budgets
        for provider in budgets:
            if provider not in PRICED_PROVIDERS and not any(k.startswith(f"{provider}/") for k in prices):
                log.warning(
                    "CHAT_BUDGETS has a budget for %s, but no price is known for its models, so its spend "
                    'stays 0 and the budget never trips; give one in CHAT_PRICES, e.g. {"%s/*": 0.5}',
                    provider,
                    provider,
                )
        self.max_concurrent = max_concurrent
        self._unwritten: list[Entry] = []  # counted, not taken by the writer yet
        self._writing: list[Entry] = []  # the batch being written
        self._pending_lock = threading.Lock()  # held for list operations only
        self._writer: asyncio.Task[None] | None = None
        self._rate: Any = None
        self._rate_items: list[Any] = []
        if rate_limit:
            from limits import parse_many, storage, strategies

            self._rate_items = parse_many(rate_limit)
            self._rate = strategies.MovingWindowRateLimiter(storage.MemoryStorage())

    # before a generation: every check raises LimitReached before anything is written

    def admit(self, client: str, running: int) -> None:
        """Count a request that starts a generation against the rate and concurrency limits.

        `client` is what the rate is counted per (the token, else the peer address); `running` is
        how many generations this process is running now.
        """
        if self.max_concurrent is not None and running >= self.max_concurrent:
            raise LimitReached(
                "too_many_generations",
                f"{running} replies are already being generated, the most "
                f"CHAT_MAX_CONCURRENT_GENERATIONS allows; retry in a moment",
                {"Retry-After": "1"},
            )
        if self._rate is not None:
            key = hashlib.sha256(client.encode()).hexdigest()[:16]  # a token never sits in memory as such
            for item in self._rate_items:
                if not self._rate.test(item, key):
                    reset = self._rate.get_window_stats(item, key).reset_time
                    wait = max(1, math.ceil(reset - time.time()))
                    raise LimitReached(
                        "rate_limited",
                        f"more than {item.amount} replies per {item.get_expiry()} s "
                        f"(CHAT_RATE_LIMIT); retry in {wait} s",
                        {"Retry-After": str(wait)},
                    )
            for item in self._rate_items:
                self._rate.hit(item, key)

    def check_budget(self, provider: str) -> None:
        """Refuse a generation for `provider` once its spend this day or month reached a budget.

        Blocking (it reads what the ledger gained since last time): call it in a worker thread.
        """
        budget = self.budgets.get(provider)
        if not budget:
            return
        buckets = self.totals()
        now = datetime.now(UTC)
        for period, limit in budget.items():
            start, reset = period_bounds(period, now)
            spent = sum(t.cost for (day, p, _), t in buckets.items() if p == provider and day >= start)
            if spent >= limit:
                resets_at = reset.isoformat().replace("+00:00", "Z")
                raise LimitReached(
                    "budget_exceeded",
                    f"the {period}ly budget for {provider} is spent: ${spent:.4f} of ${limit:g} "
                    f"(CHAT_BUDGETS); it resets at {resets_at}",
                    {"x-should-retry": "false"},
                    provider=provider,
                    period=period,
                    budget=limit,
                    spent=round(spent, 6),
                    resets_at=resets_at,
                )

    # after a generation

    def totals(self) -> dict[Bucket, Totals]:
        """Every bucket: the ledger's, and the entries not written to it yet. Blocking: in a thread."""
        buckets, pending = self.ledger.totals(self._pending)
        for entry in pending:
            bucket = buckets.setdefault((entry.time[:10], entry.provider, entry.model), Totals())
            bucket.add(entry.totals())
        return buckets

    def _pending(self) -> list[Entry]:
        with self._pending_lock:
            return [*self._writing, *self._unwritten]

    async def record(
        self,
        *,
        provider: str,
        model: str,
        input_tokens: int,
        output_tokens: int,
        estimated: bool,
        conversation_id: str | None,
    ) -> Entry:
        """Price a finished generation and count it; returns the entry. Its ledger line follows."""
        if self.prices.needs_table(provider, model):  # its first load takes about a second
            await anyio.to_thread.run_sync(self.prices.load)
        cost = self.prices.cost(provider, model, input_tokens, output_tokens)
        entry = Entry(provider, model, input_tokens, output_tokens, estimated, cost, conversation_id)
        with self._pending_lock:
            self._unwritten.append(entry)
        self._start_writer()
        return entry

    def _start_writer(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())

    async def _write(self) -> None:
        """Append what was counted, in batches, until nothing is left (one fsync per batch)."""
        while True:
            with self._pending_lock:  # taken out of the list: no second writer can take it again
                batch, self._unwritten = self._unwritten, []
                self._writing = batch
            if not batch:
                return
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._append, batch)

    def _append(self, batch: list[Entry]) -> None:
        """A ledger that cannot be written is logged, not raised: the replies are the user's."""

        def written() -> None:
            with self._pending_lock:
                self._writing = []

        try:
            self.ledger.append(*batch, written=written)
        except Exception:
            written()  # they will not reach the file: not counted any more either
            log.exception("could not append %d lines to %s", len(batch), self.ledger.path)

    async def flush(self, seconds: float = 10.0) -> None:
        """Wait (at most `seconds`) until every entry counted so far is in the ledger."""
        with anyio.move_on_after(seconds):
            while True:
                if self._unwritten:
                    self._start_writer()
                if self._writer is None or self._writer.done():
                    return
                await asyncio.wait([self._writer])
        if left := len(self._pending()):
            log.error("%d lines were not written to %s in %g s", left, self.ledger.path, seconds)

    async def record_reply(
        self,
        provider: str,
        request: ChatRequest,
        reply: str,
        finish: Finish | None,
        conversation_id: str | None,
    ) -> Entry:
        """Count one generation: the tokens the provider reported (its `finish`), else the estimate
        of the request's texts and of the reply; returns the ledger entry (tokens, cost)."""
        reported = (finish.input_tokens, finish.output_tokens) if finish else None
        prompt = [m.content for m in request.messages] + ([request.system] if request.system else [])
        input_tokens, output_tokens, estimated = counted_tokens(reported, prompt, reply)
        return await self.record(
            provider=provider,
            model=request.model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            estimated=estimated,
            conversation_id=conversation_id,
        )


# --- the route ----------------------------------------------------------------------------------


class UsageTotalsOut(BaseModel):
    requests: int
    input_tokens: int
    output_tokens: int
    cost: float = Field(description="USD over the generations with a known price")
    unpriced_requests: int = Field(description="generations whose price is unknown (not in `cost`)")


class UsageGroupOut(UsageTotalsOut):
    day: str | None = Field(None, description="with group_by=day: YYYY-MM-DD (UTC)")
    model: str | None = Field(None, description="with group_by=model: provider/model")
    provider: str | None = Field(None, description="with group_by=provider")


class UsageOut(BaseModel):
    from_: str | None = Field(alias="from")
    to: str | None
    group_by: GroupBy
    groups: list[UsageGroupOut]
    total: UsageTotalsOut


router = APIRouter(tags=["usage"])


@router.get("/api/usage", response_model=UsageOut)
async def usage_totals(
    request: Request,
    from_: Annotated[date | None, Query(alias="from", description="first UTC day, e.g. 2026-11-01")] = None,
    to: Annotated[date | None, Query(description="last UTC day, inclusive")] = None,
    group_by: Annotated[GroupBy, Query(description="day, model or provider")] = "day",
) -> Response:
    """Requests, tokens and cost from the usage ledger, grouped by day, model or provider."""
    if from_ is not None and to is not None and from_ > to:
        return JSON(
            {
                "detail": [
                    {
                        "loc": ["query", "from"],
                        "msg": f"from ({from_}) is after to ({to}); swap them",
                        "type": "value_error",
                    }
                ],
                "type": "invalid_request",
            },
            status_code=422,
        )
    usage: Usage = request.app.state.usage
    buckets = await anyio.to_thread.run_sync(usage.totals)
    groups = aggregate(buckets, from_, to, group_by)
    total = Totals()
    for totals in groups.values():
        total.add(totals)  # summed before rounding, so the total is no sum of rounded groups
    return JSON(
        {
            "from": from_.isoformat() if from_ else None,
            "to": to.isoformat() if to else None,
            "group_by": group_by,
            "groups": [{group_by: key, **totals.out()} for key, totals in groups.items()],
            "total": total.out(),
        }
    )


def counted_tokens(
    reported: tuple[int | None, int | None] | None, prompt: list[str], reply: str
) -> tuple[int, int, bool]:
    """(input, output, estimated): what the provider reported, else `tokens.estimate_*` of the texts.

    `reported` is None when the generation ended early (stop, error, disconnect, shutdown): the
    provider may have billed it all the same, so it is estimated rather than left out.
    """
    given_in, given_out = (counted(n) for n in reported) if reported is not None else (None, None)
    if given_in is not None and given_out is not None:
        return given_in, given_out, False
    input_tokens = given_in if given_in is not None else estimate_messages(prompt)
    output_tokens = given_out if given_out is not None else estimate_tokens(reply)
    return input_tokens, output_tokens, True


def counted(tokens: int | None) -> int | None:
    """A token count as reported, or None for one no provider could mean (a negative number)."""
    return tokens if tokens is not None and tokens >= 0 else None
