"""The chat service: settings, the app, its routes and its error handlers.

Run it with `python main.py` (or `uvicorn main:app`). See README.md for the settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import hmac
import ipaddress
import logging
import re
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, Literal

import orjson
from fastapi import FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import chat
import providers
import wire
from providers import Anthropic, OpenAICompatible, Provider, ProviderError, ProviderTable, Timeouts
from schemas import (
    ChatIn,
    ChatOut,
    ConversationIn,
    ConversationOut,
    ConversationPatch,
    ErrorOut,
    HealthOut,
    ModelsOut,
    PageOut,
    ParamsModel,
)
from storage import Conversation, StorageError, Store, current_branch, summarize
from web import JSON, StoreDep, TableDep, error

__version__ = "0.1.0"

log = logging.getLogger("chat")

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
OPEN_PATHS = frozenset({"/api/health", "/docs", "/docs/oauth2-redirect", "/openapi.json"})
NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,39}$"
BUILTIN_PROVIDERS = ("openai", "anthropic", "ollama")
FALLBACK_MODELS = {
    "openai": ("gpt-4o-mini", "gpt-4o", "gpt-4.1", "gpt-4.1-mini", "o4-mini"),
    "anthropic": ("claude-sonnet-4-5", "claude-opus-4-1", "claude-haiku-4-5"),
    "ollama": ("llama3.2", "qwen2.5", "mistral"),
}
DEFAULT_MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-sonnet-4-5", "ollama": "llama3.2"}


# --- settings -----------------------------------------------------------------------------------


class Server(BaseModel):
    """A further OpenAI-compatible server (LM Studio, llama.cpp, vLLM, ...)."""

    model_config = ConfigDict(extra="forbid")
    base_url: str = Field(pattern=r"^https?://\S+$")
    api_key: SecretStr | None = None

    @model_validator(mode="before")
    @classmethod
    def _bare_url(cls, value: Any) -> Any:
        """`{"name": "http://..."}` is short for `{"name": {"base_url": "http://..."}}`."""
        return {"base_url": value} if isinstance(value, str) else value


def split_list(value: Any) -> Any:
    """Accept `a,b` as well as a JSON list for list settings."""
    if isinstance(value, str):
        value = value.strip()
        return (
            orjson.loads(value)
            if value.startswith("[")
            else [v.strip() for v in value.split(",") if v.strip()]
        )
    return value


class Settings(BaseSettings):
    """Every setting, from the environment or `.env`; a bad value stops start-up with a clear message."""

    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", populate_by_name=True, env_ignore_empty=True
    )

    host: str = Field("127.0.0.1", alias="CHAT_HOST")
    port: int = Field(8000, alias="CHAT_PORT", ge=1, le=65535)
    data_dir: Path = Field(Path("data"), alias="CHAT_DATA_DIR")
    default_model: str | None = Field(None, alias="CHAT_DEFAULT_MODEL", pattern=r"^[^/\s]+/\S+$")
    api_token: SecretStr | None = Field(None, alias="CHAT_API_TOKEN", min_length=16)
    allow_remote: bool = Field(False, alias="CHAT_ALLOW_REMOTE")
    allowed_hosts: Annotated[list[str], NoDecode] = Field([], alias="CHAT_ALLOWED_HOSTS")
    cors_origins: Annotated[list[str], NoDecode] = Field([], alias="CHAT_CORS_ORIGINS")
    max_body_bytes: int = Field(1_048_576, alias="CHAT_MAX_BODY_BYTES", ge=1024)
    stream_idle_timeout: float = Field(120.0, alias="CHAT_STREAM_IDLE_TIMEOUT", gt=0)
    shutdown_timeout: float = Field(5.0, alias="CHAT_SHUTDOWN_TIMEOUT", ge=0)
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", alias="CHAT_LOG_LEVEL")
    openai_api_key: SecretStr | None = Field(None, alias="OPENAI_API_KEY")
    openai_base_url: str = Field("https://api.openai.com/v1", alias="OPENAI_BASE_URL", pattern=r"^https?://")
    anthropic_api_key: SecretStr | None = Field(None, alias="ANTHROPIC_API_KEY")
    anthropic_base_url: str = Field(
        "https://api.anthropic.com", alias="ANTHROPIC_BASE_URL", pattern=r"^https?://"
    )
    ollama_base_url: str = Field("http://127.0.0.1:11434/v1", alias="OLLAMA_BASE_URL", pattern=r"^https?://")
    servers: dict[str, Server] = Field({}, alias="CHAT_SERVERS")

    _split = field_validator("allowed_hosts", "cors_origins", mode="before")(split_list)

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("servers")
    @classmethod
    def _server_names(cls, value: dict[str, Server]) -> dict[str, Server]:
        for name in value:
            if name in BUILTIN_PROVIDERS or not providers_name_ok(name):
                raise ValueError(
                    f"server name {name!r} must be lowercase letters, digits, '.', '_' or '-' "
                    f"and not one of {', '.join(BUILTIN_PROVIDERS)}"
                )
        return value

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def providers_name_ok(name: str) -> bool:
    return re.fullmatch(NAME_PATTERN, name) is not None


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_settings() -> Settings:
    """Settings from the environment, or exit with a message naming each bad value."""
    try:
        return Settings()
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise SystemExit("Invalid settings (environment or .env):\n" + "\n".join(lines)) from None


def build_providers(settings: Settings) -> ProviderTable:
    timeouts = Timeouts(idle=settings.stream_idle_timeout)

    def secret(value: SecretStr | None) -> str | None:
        return value.get_secret_value() if value is not None else None

    table: ProviderTable = {
        "openai": OpenAICompatible(
            "openai",
            settings.openai_base_url,
            secret(settings.openai_api_key),
            key_env_var="OPENAI_API_KEY",
            fallback_models=FALLBACK_MODELS["openai"],
            timeouts=timeouts,
            max_tokens_field="max_completion_tokens",
        ),
        "anthropic": Anthropic(
            "anthropic",
            settings.anthropic_base_url,
            secret(settings.anthropic_api_key),
            key_env_var="ANTHROPIC_API_KEY",
            fallback_models=FALLBACK_MODELS["anthropic"],
            timeouts=timeouts,
        ),
        "ollama": OpenAICompatible(
            "ollama", settings.ollama_base_url, fallback_models=FALLBACK_MODELS["ollama"], timeouts=timeouts
        ),
    }
    for name, server in settings.servers.items():
        table[name] = OpenAICompatible(name, server.base_url, secret(server.api_key), timeouts=timeouts)
    return table


def default_model(settings: Settings, table: ProviderTable) -> str:
    """CHAT_DEFAULT_MODEL, else the first provider with a key, else a local Ollama model."""
    if settings.default_model:
        return settings.default_model
    for name in ("openai", "anthropic"):
        if table[name].configured:
            return f"{name}/{DEFAULT_MODELS[name]}"
    return f"ollama/{DEFAULT_MODELS['ollama']}"


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 413, 429, 500, 502, 503, 504, 507)
}


# --- security: pure ASGI so client disconnects still reach the routes ----------------------------


class Guard:
    """Refuse requests a browser could forge or a stranger could send.

    - Host: when bound to loopback only loopback names are served (DNS rebinding, Ollama
      CVE-2024-28224); CHAT_ALLOWED_HOSTS adds names.
    - Origin: a browser request from another origin is refused unless CHAT_CORS_ORIGINS lists it.
    - Body size: a Content-Length over CHAT_MAX_BODY_BYTES gets 413 before the body is read.
    - Token: with CHAT_API_TOKEN set, every route but health and the docs needs it.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.token = settings.api_token.get_secret_value().encode() if settings.api_token else None
        self.hosts = {h.lower() for h in settings.allowed_hosts}
        self.origins = set(settings.cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self.refuse(scope, headers, functools.partial(wire.error_for, scope["path"], headers))
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, self.limit_body(receive), send)

    def limit_body(self, receive: Receive) -> Receive:
        """Count a body sent without Content-Length; past the limit the route gets a 413 (JSON)."""
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.settings.max_body_bytes:
                raise HTTPException(413, self.too_large())
            return message

        return counted

    def too_large(self, size: str = "") -> str:
        what = f"request body is {size} bytes" if size else "request body is too large"
        return f"{what}; the limit is {self.settings.max_body_bytes} bytes (CHAT_MAX_BODY_BYTES)"

    def refuse(
        self, scope: Scope, headers: dict[str, str], error: Callable[..., Response]
    ) -> Response | None:
        """Why this request is refused, as `error` renders it (on /v1 in the client's wire format)."""
        peer = (scope.get("client") or ("", 0))[0]
        if self.settings.loopback and not self.settings.allow_remote and not is_loopback(peer):
            # e.g. `uvicorn main:app --host 0.0.0.0`, which skips main()'s refusal
            return error(
                403,
                f"requests from {peer or 'an unknown address'} are refused: CHAT_HOST is "
                f"{self.settings.host}, so this service answers this machine only; set CHAT_HOST and "
                f"CHAT_API_TOKEN to serve others",
                "forbidden_client",
            )
        host = headers.get("host", "")
        if not self.host_ok(host):
            return error(
                403, f"requests for host {host!r} are refused; add it to CHAT_ALLOWED_HOSTS", "forbidden_host"
            )
        origin = headers.get("origin")
        if origin is not None and origin not in self.origins and not same_origin(origin, host):
            return error(
                403,
                f"cross-origin requests from {origin!r} are refused; add it to CHAT_CORS_ORIGINS",
                "forbidden_origin",
            )
        if scope["method"] == "OPTIONS" and origin is not None:
            return None  # CORS preflight carries no credentials
        length = headers.get("content-length", "0")
        if length.isdigit() and int(length) > self.settings.max_body_bytes:
            return error(413, self.too_large(length), "body_too_large")
        if self.token is not None and scope["path"] not in OPEN_PATHS and not self.token_ok(scope, headers):
            return error(
                401,
                "missing or wrong token: send the header 'Authorization: Bearer <CHAT_API_TOKEN>'"
                + (" or 'x-api-key: <CHAT_API_TOKEN>'" if wire.serves(scope["path"]) else ""),
                "unauthorized",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return None

    def token_ok(self, scope: Scope, headers: dict[str, str]) -> bool:
        """`Authorization: Bearer <token>`, or on /v1 also `x-api-key` (what the anthropic clients send)."""
        assert self.token is not None
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token):
            return True
        key = headers.get("x-api-key") if wire.serves(scope["path"]) else None
        return key is not None and hmac.compare_digest(key.strip().encode(), self.token)

    def host_ok(self, host: str) -> bool:
        name = host_name(host)
        if name in self.hosts:
            return True
        if not self.settings.loopback:
            return not self.hosts and bool(name)
        return name in LOOPBACK_NAMES or name.endswith(".localhost") or is_loopback(name)


def host_name(host: str) -> str:
    """The name in a Host header, without the port: `[::1]:8000` -> `::1`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else ""
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def same_origin(origin: str, host: str) -> bool:
    scheme, _, rest = origin.partition("://")
    return scheme in ("http", "https") and rest.lower() == host.strip().lower()


# --- the app ------------------------------------------------------------------------------------


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    store: Store = app.state.store
    if not logging.getLogger().handlers:  # started as `uvicorn main:app`
        configure_logging(settings.log_level)
    if problem := exposure_problem(settings):  # `uvicorn main:app` skips main()
        log.error(problem)
        raise SystemExit(problem)
    app.state.loop = asyncio.get_running_loop()
    store.open()
    warming = asyncio.create_task(store.warm_index())  # the first listing need not wait for the scan
    log.info("conversations are kept in %s", store.conversations.resolve())
    for provider in app.state.providers.values():
        log.info("provider %-10s %s", provider.name, provider.hint)
    log.info("default model: %s", app.state.default_model)
    gc.collect()
    gc.freeze()  # what start-up built lives as long as the process: keep it out of full collections
    try:
        yield
    finally:
        warming.cancel()
        tracker: chat.TurnTracker = app.state.turns
        tracker.stop()
        if running := await tracker.wait_saved(max(settings.shutdown_timeout, 5.0)):
            log.info("waited for %d open turns to save their replies", running)
        await providers.close_all(app.state.providers)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    app = FastAPI(
        title="Chat assistant",
        version=__version__,
        description="A self-hosted chat backend: OpenAI, Anthropic and local models, "
        "every conversation kept on disk.",
        lifespan=lifespan,
        responses=ERRORS,
    )
    app.state.settings = settings
    app.state.store = Store(settings.data_dir)
    app.state.providers = build_providers(settings)
    app.state.default_model = default_model(settings, app.state.providers)
    app.state.turns = chat.TurnTracker()
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(Guard, settings=settings)
    add_error_handlers(app)
    add_routes(app)
    app.include_router(wire.router)
    return app


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ProviderError)
    async def provider_error(request: Request, exc: ProviderError) -> Response:
        if wire.serves(request.url.path):
            return wire.refusal(wire.flavor_of(request.url.path, request.headers), exc)
        return provider_error_response(exc)

    @app.exception_handler(StorageError)
    async def storage_error(request: Request, exc: StorageError) -> Response:
        if exc.status_code >= 500:
            log.error("storage: %s", exc.detail)
        return wire.error_for(request.url.path, request.headers, exc.status_code, exc.detail, exc.type)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        kinds = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
        detail = exc.detail
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}; see /docs for the API"
        kind = kinds.get(exc.status_code, "http_error")
        return wire.error_for(
            request.url.path, request.headers, exc.status_code, str(detail), kind, exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        if wire.serves(request.url.path):
            detail = wire.validation_detail(errors)
            return wire.error_for(request.url.path, request.headers, 400, detail, "invalid_request")
        return JSON({"detail": jsonable_encoder(errors), "type": "invalid_request"}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        detail = "internal error; the server log has the details"
        return wire.error_for(request.url.path, request.headers, 500, detail, "internal_error")


def add_routes(app: FastAPI) -> None:
    @app.get("/api/health", response_model=HealthOut, tags=["service"])
    async def health(store: StoreDep, table: TableDep) -> Response:
        """Is the service up, can it write its data, which providers have keys."""
        writable = await store.writable()
        return JSON(
            {
                "status": "ok" if writable else "degraded",
                "version": __version__,
                "data_dir_writable": writable,
                "providers": {name: p.configured for name, p in table.items()},
                "unreadable_conversations": sorted(store.unreadable()),
            }
        )

    @app.get("/api/models", response_model=ModelsOut, tags=["service"])
    async def models(table: TableDep, request: Request) -> Response:
        """Each provider, whether it is configured, and its models (asked upstream, cached)."""
        configured = [p for p in table.values() if p.configured]
        listed = dict(zip(configured, await asyncio.gather(*(p.models() for p in configured)), strict=True))
        return JSON(
            {
                "default_model": request.app.state.default_model,
                "providers": [provider_out(p, listed.get(p)) for p in table.values()],
            }
        )

    @app.post("/api/chat", response_model=ChatOut, tags=["chat"], responses={200: chat_stream_doc()})
    async def chat_turn(body: ChatIn, request: Request, store: StoreDep, table: TableDep) -> Response:
        """Send a message and get the reply, whole or streamed as server-sent events."""
        if request.app.state.turns.stopping.is_set():
            return error(
                503, "the server is shutting down; send the message again shortly", "server_shutdown"
            )
        turn = await chat.begin_turn(
            store,
            table,
            request.app.state.turns,
            conversation_id=body.conversation_id,
            text=body.message,
            options=chat.TurnOptions(body.model, body.system, body.temperature, body.max_tokens),
            default_model=request.app.state.default_model,
        )
        if body.stream:
            return chat.EventStream(turn)
        outcome = await chat.run_watched(turn, request.receive, chat.ignore)
        reply = turn.final
        if outcome == "gone":
            return Response(status_code=499)  # the client is gone; nobody reads this
        if outcome == "stopped":
            detail = chat.SHUTDOWN["message"]
            return error(503, detail, "server_shutdown", conversation_id=turn.conversation_id, message=reply)
        if turn.error is not None:
            return provider_error_response(turn.error, conversation_id=turn.conversation_id, message=reply)
        return JSON({"conversation_id": turn.conversation_id, "message": reply})

    @app.post("/api/conversations", status_code=201, response_model=ConversationOut, tags=["conversations"])
    async def create_conversation(
        store: StoreDep, table: TableDep, request: Request, body: ConversationIn | None = None
    ) -> Response:
        """Start an empty conversation with its own model, system prompt and parameters."""
        body = body or ConversationIn()
        model = body.model or request.app.state.default_model
        providers.resolve(table, model)
        conversation = await store.create(
            model=model, system=body.system, params=params_dict(body.params), title=body.title
        )
        return JSON(conversation_out(conversation), status_code=201)

    @app.get("/api/conversations", response_model=PageOut, tags=["conversations"])
    async def list_conversations(
        store: StoreDep,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        cursor: Annotated[str | None, Query(max_length=512)] = None,
    ) -> Response:
        """Conversations, most recently updated first; pass `next_cursor` back for the next page."""
        items, next_cursor = await store.list_conversations(limit, cursor)
        return JSON({"items": items, "next_cursor": next_cursor})

    @app.get("/api/conversations/{conversation_id}", response_model=ConversationOut, tags=["conversations"])
    async def get_conversation(conversation_id: str, store: StoreDep) -> Response:
        """One conversation with the messages of its current branch, oldest first."""
        return JSON(conversation_out(await store.get(conversation_id)))

    @app.patch("/api/conversations/{conversation_id}", response_model=ConversationOut, tags=["conversations"])
    async def update_conversation(
        conversation_id: str, body: ConversationPatch, store: StoreDep, table: TableDep
    ) -> Response:
        """Change the title, model, system prompt or parameters; fields left out stay as they are."""
        changes = body.model_dump(exclude_unset=True)
        if body.model is not None:
            providers.resolve(table, body.model)
        for name in ("title", "model", "params"):  # null means "leave as is"; only `system` can be cleared
            if name in changes and changes[name] is None:
                changes.pop(name)
        if not changes:
            return JSON(conversation_out(await store.get(conversation_id)))
        return JSON(conversation_out(await store.update(conversation_id, changes)))

    @app.delete("/api/conversations/{conversation_id}", status_code=204, tags=["conversations"])
    async def delete_conversation(conversation_id: str, store: StoreDep) -> Response:
        """Delete a conversation and its file."""
        await store.delete(conversation_id)
        return Response(status_code=204)


def provider_error_response(exc: ProviderError, **extra: Any) -> JSON:
    headers = {"Retry-After": exc.retry_after} if exc.retry_after is not None else None
    return error(exc.status_code, exc.detail, exc.type, headers, **extra)


def params_dict(params: ParamsModel) -> Any:
    return {"temperature": params.temperature, "max_tokens": params.max_tokens}


def conversation_out(conversation: Conversation) -> dict[str, Any]:
    out = {k: v for k, v in conversation.items() if k not in ("messages", "schema_version")}
    return {**out, **summarize(conversation), "messages": current_branch(conversation)}


def provider_out(provider: Provider, listed: tuple[list[str], str] | None) -> dict[str, Any]:
    names, source = listed if listed is not None else ([], "none")
    return {
        "name": provider.name,
        "configured": provider.configured,
        "hint": provider.hint,
        "models": names,
        "models_source": source,
    }


def chat_stream_doc() -> dict[str, Any]:
    return {
        "description": "JSON when `stream` is false; with `stream: true`, `text/event-stream` with events "
        "`start` {conversation_id, user_message_id, message_id}, `delta` {text}, then `done` {message} "
        "or `error` {error: {type, message}, message}.",
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "description": "one server-sent event; `data` is JSON",
                    "properties": {
                        "event": {"enum": ["start", "delta", "done", "error"]},
                        "data": {"type": "string", "contentMediaType": "application/json"},
                    },
                    "required": ["event", "data"],
                }
            }
        },
    }


# --- running it ---------------------------------------------------------------------------------


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr
    )
    # The HTTP client's and SDKs' debug logs include request headers (keys): keep them quiet.
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "openai", "anthropic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def exposure_problem(settings: Settings) -> str | None:
    """Why these settings would let strangers read the chats, if they would."""
    if settings.loopback or settings.api_token is not None or settings.allow_remote:
        return None
    return (
        f"Refusing to listen on {settings.host} without a token: anyone on the network could read "
        f"your conversations. Set CHAT_API_TOKEN (16+ characters), or CHAT_ALLOW_REMOTE=true if "
        f"something else guards the port."
    )


def main() -> None:
    settings = load_settings()
    if problem := exposure_problem(settings):
        raise SystemExit(problem)
    configure_logging(settings.log_level)
    import uvicorn

    class UvicornServer(uvicorn.Server):
        """uvicorn, and on Ctrl-C or SIGTERM every open chat turn ends at once, saved as incomplete."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            loop: asyncio.AbstractEventLoop | None = getattr(service.state, "loop", None)
            if loop is not None:  # a signal handler may only hand work to the loop
                loop.call_soon_threadsafe(service.state.turns.stop)
            super().handle_exit(sig, frame)

    service = create_app(settings)
    config = uvicorn.Config(
        service,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout)),
        log_config=None,
    )
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises Ctrl-C once it has shut down
        UvicornServer(config).run()


app = create_app() if __name__ != "__main__" else None

if __name__ == "__main__":
    main()
