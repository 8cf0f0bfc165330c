"""The chat service: settings, the app, its routes and its error handlers.

Run it with `python main.py` (or `uvicorn main:app`). See README.md for the settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, Literal

import anyio.to_thread
import orjson
from fastapi import FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.staticfiles import StaticFiles
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]

import chat
import exporting
import generation
import importing
import page
import providers
import schemas
import search_index
import usage
import wire
from guard import Guard, bounded_http_protocol, is_loopback
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
from search_index import IndexDep, SearchIndex
from storage import StorageError, Store
from web import JSON, APIError, StoreDep, TableDep, client_key, error, json_body, provider_error_response

__version__ = "0.1.0"

log = logging.getLogger("chat")

PROJECT_DIR = Path(__file__).resolve().parent  # the default data dir and `.env` live beside main.py
ENV_FILE = PROJECT_DIR / ".env"
SWAGGER_UI_DIR = swagger_ui_path  # the swagger-ui-bundle-v2 wheel: Swagger UI 5.31.0, Apache-2.0
DOCS_ASSETS = "/docs/assets/"
OPEN_PATHS = frozenset({"/api/health", "/docs", "/docs/oauth2-redirect", "/openapi.json"}) | page.OPEN_PATHS
OPEN_PREFIXES = (DOCS_ASSETS, page.OPEN_PREFIX)  # files that hold no data: the docs' and the page's
# A request's headers may total this much; more is refused before it is buffered (h11, see main()).
MAX_HEADER_BYTES = 64 * 1024
NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,39}$"
BUILTIN_PROVIDERS = ("openai", "anthropic", "ollama")
FALLBACK_MODELS = {
    "openai": ("gpt-4o-mini", "gpt-4o", "gpt-4.1", "gpt-4.1-mini", "o4-mini"),
    "anthropic": ("claude-sonnet-4-6", "claude-opus-4-6", "claude-haiku-4-5"),
    "ollama": ("llama3.2", "qwen2.5", "mistral"),
}
DEFAULT_MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-sonnet-4-6", "ollama": "llama3.2"}


# --- settings -----------------------------------------------------------------------------------


class Server(BaseModel):
    """A further OpenAI-compatible server (LM Studio, llama.cpp, vLLM, ...)."""

    model_config = ConfigDict(extra="forbid")
    base_url: str = Field(pattern=r"^https?://\S+$")
    api_key: SecretStr | None = None
    context_tokens: int | None = Field(None, ge=256, description="the server's context window, in tokens")

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


def json_object(value: Any) -> Any:
    """Parse a JSON object setting here, so that a syntax error is reported like any bad value."""
    if not isinstance(value, str):
        return value
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"is not valid JSON ({exc})") from None


def under_project(path: Path) -> Path:
    """A relative path is taken from the project folder, wherever the service is started from."""
    return path if path.is_absolute() else PROJECT_DIR / path


class Settings(BaseSettings):
    """Every setting, from the environment or `.env`; a bad value stops start-up with a clear message."""

    model_config = SettingsConfigDict(
        env_file=ENV_FILE, extra="ignore", populate_by_name=True, env_ignore_empty=True
    )

    host: str = Field("127.0.0.1", alias="CHAT_HOST", examples=["127.0.0.1"])
    port: int = Field(8000, alias="CHAT_PORT", ge=1, le=65535, examples=["8000"])
    data_dir: Path = Field(PROJECT_DIR / "data", alias="CHAT_DATA_DIR", examples=["/home/you/chat-data"])
    default_model: str | None = Field(
        None, alias="CHAT_DEFAULT_MODEL", pattern=r"^[^/\s]+/\S+$", examples=["ollama/llama3.2"]
    )
    title_model: str | None = Field(
        None, alias="CHAT_TITLE_MODEL", pattern=r"^[^/\s]+/\S+$", examples=["ollama/llama3.2"]
    )
    api_token: SecretStr | None = Field(
        None, alias="CHAT_API_TOKEN", min_length=16, examples=["$(openssl rand -hex 16)"]
    )
    allow_remote: bool = Field(False, alias="CHAT_ALLOW_REMOTE", examples=["false"])
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        [], alias="CHAT_ALLOWED_HOSTS", examples=["chat.home.arpa,other.home.arpa"]
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        [], alias="CHAT_CORS_ORIGINS", examples=["http://localhost:5173"]
    )
    max_body_bytes: int = Field(1_048_576, alias="CHAT_MAX_BODY_BYTES", ge=1024, examples=["1048576"])
    stream_idle_timeout: float = Field(120.0, alias="CHAT_STREAM_IDLE_TIMEOUT", gt=0, examples=["120"])
    shutdown_timeout: float = Field(5.0, alias="CHAT_SHUTDOWN_TIMEOUT", ge=0, examples=["5"])
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", alias="CHAT_LOG_LEVEL", examples=["info"]
    )
    openai_api_key: SecretStr | None = Field(None, alias="OPENAI_API_KEY", examples=["sk-..."])
    openai_base_url: str = Field(
        "https://api.openai.com/v1",
        alias="OPENAI_BASE_URL",
        pattern=r"^https?://",
        examples=["https://api.openai.com/v1"],
    )
    anthropic_api_key: SecretStr | None = Field(None, alias="ANTHROPIC_API_KEY", examples=["sk-ant-..."])
    anthropic_base_url: str = Field(
        "https://api.anthropic.com",
        alias="ANTHROPIC_BASE_URL",
        pattern=r"^https?://",
        examples=["https://api.anthropic.com"],
    )
    ollama_base_url: str = Field(
        "http://127.0.0.1:11434/v1",
        alias="OLLAMA_BASE_URL",
        pattern=r"^https?://",
        examples=["http://127.0.0.1:11434/v1"],
    )
    servers: Annotated[dict[str, Server], NoDecode] = Field(
        {},
        alias="CHAT_SERVERS",
        examples=["""'{"lmstudio": "http://127.0.0.1:1234/v1"}'"""],
    )
    max_import_bytes: int = Field(
        2 * 1024**3, alias="CHAT_MAX_IMPORT_BYTES", ge=1024, examples=["2147483648"]
    )
    rate_limit: str | None = Field(None, alias="CHAT_RATE_LIMIT", examples=["30/minute"])
    max_concurrent_generations: int | None = Field(
        None, alias="CHAT_MAX_CONCURRENT_GENERATIONS", ge=1, examples=["4"]
    )
    budgets: usage.Budgets = Field({}, alias="CHAT_BUDGETS", examples=["""'{"openai": {"month": 20}}'"""])
    prices: dict[str, usage.PriceSetting] = Field({}, alias="CHAT_PRICES", examples=["""'{"ollama/*": 0}'"""])

    _split = field_validator("allowed_hosts", "cors_origins", mode="before")(split_list)
    _json = field_validator("servers", mode="before")(json_object)
    _under_project = field_validator("data_dir")(under_project)

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

    @field_validator("rate_limit")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value:
            from limits import parse_many

            try:
                parse_many(value)
            except ValueError:
                raise ValueError(
                    f"{value!r} is not a rate; write it like 30/minute or 10/second;500/day"
                ) from None
        return value

    @field_validator("prices")
    @classmethod
    def _price_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if not re.fullmatch(r"[^/\s]+/\S+", key):
                raise ValueError(f"price key {key!r} must be provider/model or provider/*, e.g. ollama/*")
        return value

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def providers_name_ok(name: str) -> bool:
    return re.fullmatch(NAME_PATTERN, name) is not None


class SettingsProblem(Exception):
    """Settings that cannot work: one line per problem, each naming its variable."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


SECRET_SETTINGS = frozenset({"CHAT_API_TOKEN", "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "CHAT_SERVERS"})
SETTING_WORDS = {
    "int_parsing": "must be a whole number",
    "float_parsing": "must be a number",
    "bool_parsing": "must be true or false",
    "too_short": "must be at least {min_length} characters",
    "string_too_short": "must be at least {min_length} characters",
    "greater_than_equal": "must be at least {ge}",
    "greater_than": "must be more than {gt}",
    "less_than_equal": "must be at most {le}",
    "literal_error": "must be one of {expected}",
    "string_pattern_mismatch": "does not have the right form",
    "extra_forbidden": "is not a known key (a server takes base_url and api_key)",
    "missing": "is missing",
}


def setting_problem(error: Mapping[str, Any]) -> str:
    """`Invalid setting NAME: what was wrong; e.g. NAME=good value` (a secret's value is never shown)."""
    variable, *inner = [str(part) for part in error["loc"]]
    words = SETTING_WORDS.get(error["type"])
    what = words.format(**error.get("ctx", {})) if words else str(error["msg"]).removeprefix("Value error, ")
    where = f" ({'.'.join(inner)})" if inner else ""
    given = error.get("input")
    if variable not in SECRET_SETTINGS and not inner and isinstance(given, str | int | float):
        what = f"{given!r} {what}"
    examples = next((f.examples for f in Settings.model_fields.values() if f.alias == variable), None)
    example = f"; e.g. {variable}={examples[0]}" if examples else ""
    return f"Invalid setting {variable}{where}: {what}{example}"


def load_settings() -> Settings:
    """Settings from the environment and the project's `.env`; `SettingsProblem` names each bad value."""
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsProblem([setting_problem(e) for e in exc.errors()]) from None
    except SettingsError as exc:  # e.g. a `.env` line pydantic-settings cannot parse
        raise SettingsProblem([f"Invalid settings in the environment or {ENV_FILE}: {exc}"]) from None


def exit_for(problem: SettingsProblem) -> SystemExit:
    """Print the problem, one line each, and exit with status 2 (a usage error), no traceback."""
    print("\n".join(problem.lines), file=sys.stderr)
    return SystemExit(2)


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
            sends_account_ids=True,
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
        table[name] = OpenAICompatible(
            name,
            server.base_url,
            secret(server.api_key),
            timeouts=timeouts,
            context_tokens=server.context_tokens,
        )
    return table


def default_model(settings: Settings, table: ProviderTable) -> str:
    """CHAT_DEFAULT_MODEL, else the first provider with a key, else a local Ollama model (until
    `find_local_default_model` has asked the local servers)."""
    if settings.default_model:
        return settings.default_model
    for name in ("openai", "anthropic"):
        if table[name].configured:
            return f"{name}/{DEFAULT_MODELS[name]}"
    return f"ollama/{DEFAULT_MODELS['ollama']}"


def asks_local_servers(settings: Settings, table: ProviderTable) -> bool:
    """No default set and no hosted provider's key: the default comes from a local server."""
    return not settings.default_model and not any(table[name].configured for name in ("openai", "anthropic"))


async def find_local_default_model(app: FastAPI) -> None:
    """The first chat model listed by the first local server (Ollama, then CHAT_SERVERS in order)
    that answers; asked in the background at start, so start-up never waits for a server."""
    for provider in app.state.providers.values():
        if isinstance(provider, OpenAICompatible) and provider.key_env_var is None:
            model = await provider.first_chat_model()
            if model is not None:
                app.state.default_model = f"{provider.name}/{model}"
                log.info(
                    "default model: %s (the first chat model %s lists)",
                    app.state.default_model,
                    provider.name,
                )
                return
    log.info("default model: %s (no local server listed a chat model)", app.state.default_model)


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 413, 429, 500, 502, 503, 504, 507)
}


# --- the app ------------------------------------------------------------------------------------


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    store: Store = app.state.store
    if not logging.getLogger().handlers:  # started as `uvicorn main:app`
        configure_logging(settings.log_level)
    quiet_uvicorn_logs()  # again: `uvicorn main:app` configured its loggers after our import
    if problem := exposure_problem(settings):  # `uvicorn main:app` skips main()
        log.error(problem)
        raise SystemExit(problem)
    app.state.loop = asyncio.get_running_loop()
    index: SearchIndex = app.state.index
    store.open()
    index.open()
    freshening = asyncio.create_task(index.keep_fresh())  # builds the index; nobody waits for it
    log.info("conversations are kept in %s", store.conversations.resolve())
    log.info("settings from the environment and %s%s", ENV_FILE, "" if ENV_FILE.exists() else " (absent)")
    for provider in app.state.providers.values():
        log.info("provider %-10s %s", provider.name, provider.hint)
    finding = None
    if asks_local_servers(settings, app.state.providers):
        finding = app.state.finding_default = asyncio.create_task(find_local_default_model(app))
        log.info("default model: asking the local servers (until then %s)", app.state.default_model)
    else:
        log.info("default model: %s", app.state.default_model)
    gc.collect()
    gc.freeze()  # what start-up built lives as long as the process: keep it out of full collections
    try:
        yield
    finally:
        index.close()  # a build in progress stops at its next batch
        freshening.cancel()
        if finding is not None:
            finding.cancel()
        generations: generation.Generations = app.state.generations
        generations.stop_all()
        if running := await generations.wait_saved(max(settings.shutdown_timeout, 5.0)):
            log.info("waited for %d generations to save their replies", running)
        await app.state.usage.flush()  # their lines in the usage ledger
        await providers.close_all(app.state.providers)
        store.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    app = FastAPI(
        title="Chat assistant",
        version=__version__,
        description="A self-hosted chat backend: OpenAI, Anthropic and local models, "
        "every conversation kept on disk.",
        lifespan=lifespan,
        responses=ERRORS,
        docs_url=None,  # served by add_docs, from the project's own copy of Swagger UI
        redoc_url=None,
        # FastAPI's OpenTelemetry: off, like any telemetry of a personal service (and it cost a
        # check on every request)
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.index = SearchIndex(settings.data_dir)
    app.state.store = Store(settings.data_dir, indexer=app.state.index)
    app.state.providers = build_providers(settings)
    app.state.default_model = default_model(settings, app.state.providers)
    app.state.usage = usage.Usage(
        settings.data_dir,
        prices=settings.prices,
        rate_limit=settings.rate_limit,
        max_concurrent=settings.max_concurrent_generations,
        budgets=settings.budgets,
    )
    app.state.generations = generation.Generations(usage=app.state.usage)
    app.state.title_model = settings.title_model
    app.state.background = set()  # title tasks, kept referenced until they end
    token = settings.api_token.get_secret_value() if settings.api_token is not None else None
    app.add_middleware(
        Guard,
        host=settings.host,
        allow_remote=settings.allow_remote,
        allowed_hosts=settings.allowed_hosts,
        cors_origins=settings.cors_origins,
        max_body_bytes=settings.max_body_bytes,
        max_header_bytes=MAX_HEADER_BYTES,
        token=token,
        open_paths=OPEN_PATHS,
        open_prefixes=OPEN_PREFIXES,
        body_limits={importing.IMPORT_PATH: (settings.max_import_bytes, "CHAT_MAX_IMPORT_BYTES")},
        api_key_prefixes=(wire.PREFIX + "/",),
        render=wire.render_refusal,
    )
    if settings.cors_origins:  # added last, so outermost: Guard's refusals carry CORS headers too
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    add_error_handlers(app)
    # FastAPI tries routes in order, each included router route by route: the calls clients make
    # in a loop (/v1, a chat turn) come first, the rare ones (import, export, the page) last.
    app.include_router(wire.router)
    add_routes(app)
    app.include_router(chat.router)
    app.include_router(usage.router)
    app.include_router(search_index.router)
    app.include_router(page.router)
    app.include_router(importing.router)
    app.include_router(exporting.router)
    add_docs(app, token_required=token is not None)
    return app


def add_docs(app: FastAPI, *, token_required: bool) -> None:
    """/docs from the pinned swagger-ui-bundle-v2 package (no CDN), and the bearer scheme in OpenAPI."""
    app.mount(DOCS_ASSETS.rstrip("/"), StaticFiles(directory=SWAGGER_UI_DIR), name="docs-assets")

    async def docs(request: Request) -> Response:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_js_url=f"{DOCS_ASSETS}swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}favicon-32x32.png",
        )

    async def oauth2_redirect(request: Request) -> Response:
        return get_swagger_ui_oauth2_redirect_html()

    app.add_route("/docs", docs, include_in_schema=False)
    app.add_route("/docs/oauth2-redirect", oauth2_redirect, include_in_schema=False)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            components = schema.setdefault("components", {})
            components["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "description": "the CHAT_API_TOKEN"}
            }
            for path, operations in schema["paths"].items():
                for operation in operations.values():
                    operation["security"] = (
                        [] if path in OPEN_PATHS or not token_required else [{"bearer": []}]
                    )
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ProviderError)
    async def provider_error(request: Request, exc: ProviderError) -> Response:
        if wire.serves(request.url.path):
            return wire.refusal(wire.flavor_of(request.url.path, request.headers), exc)
        return provider_error_response(exc)

    @app.exception_handler(usage.LimitReached)
    async def limit_reached(request: Request, exc: usage.LimitReached) -> Response:
        path, headers = request.url.path, request.headers
        return wire.error_for(path, headers, exc.status_code, exc.detail, exc.type, exc.headers, **exc.extra)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return wire.error_for(request.url.path, request.headers, exc.status_code, exc.detail, exc.type)

    @app.exception_handler(StorageError)
    async def storage_error(request: Request, exc: StorageError) -> Response:
        if exc.status_code >= 500:
            log.error("storage: %s", exc.detail)
        return wire.error_for(request.url.path, request.headers, exc.status_code, exc.detail, exc.type)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        # FastAPI's only 400 is a body it could not parse (json_invalid is a validation error)
        kinds = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
        detail = exc.detail
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}; see /docs for the API"
        if exc.status_code == 400:
            detail = unparsable_body(exc.__cause__)
        kind = kinds.get(exc.status_code, "http_error")
        return wire.error_for(
            request.url.path, request.headers, exc.status_code, str(detail), kind, exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        if wire.serves(request.url.path):
            detail = wire.validation_detail(list(exc.errors()))
            return wire.error_for(request.url.path, request.headers, 400, detail, "invalid_request")
        if not json_body(request.headers) and any(tuple(e["loc"])[:1] == ("body",) for e in exc.errors()):
            return error(415, not_json(request.headers.get("content-type")), "unsupported_media_type")
        table: ProviderTable = request.app.state.providers
        errors = [{"loc": e["loc"], "msg": explain(e, table), "type": e["type"]} for e in exc.errors()]
        return JSON({"detail": jsonable_encoder(errors), "type": "invalid_request"}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        detail = "internal error; the server log has the details"
        return wire.error_for(request.url.path, request.headers, 500, detail, "internal_error")


JSON_EXAMPLE = """curl --json '{"message": "Hello"}' localhost:8000/api/chat"""


def not_json(content_type: str | None) -> str:
    given = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
    return (
        f"the body must be JSON sent with the header 'Content-Type: application/json' (got {given}); "
        f"e.g. {JSON_EXAMPLE}"
    )


def unparsable_body(cause: BaseException | None) -> str:
    why = "is nested too deeply" if isinstance(cause, RecursionError) else "could not be read as UTF-8 JSON"
    return f"the JSON body {why}; send one JSON object, e.g. {JSON_EXAMPLE}"


def explain(error: Mapping[str, Any], table: ProviderTable) -> str:
    """A validation error in the words of someone sending the request: what to send instead."""
    loc = tuple(error["loc"])
    field = ".".join(str(part) for part in loc[1:]) if loc[:1] == ("body",) else str(loc[-1])
    kind, message = error["type"], str(error["msg"])
    if loc == ("body",) and kind == "missing":
        return f"the request needs a JSON body, e.g. {JSON_EXAMPLE}"
    if loc == ("body",):
        return f"the body must be a JSON object, e.g. {JSON_EXAMPLE}"
    if kind == "json_invalid":
        return (
            f"the body is not valid JSON: {error.get('ctx', {}).get('error', message)} at character {loc[-1]}"
        )
    if kind == "missing":
        return f"{field} is required"
    if kind == "extra_forbidden":
        return f"unknown field {field!r}; /docs lists the fields this request takes"
    if kind == schemas.MODEL_NAME_ERROR:
        return f"{message}; providers: {', '.join(sorted(table))}"
    return f"{field}: {message}" if field and not message.startswith(field) else message


def add_routes(app: FastAPI) -> None:
    @app.get("/api/health", response_model=HealthOut, tags=["service"])
    async def health(store: StoreDep, table: TableDep, index: IndexDep) -> Response:
        """Is the service up, can it write its data; each provider's key, and whether it answered
        the last model listing or call (null until one was made: health never probes)."""
        writable = await store.writable()
        return JSON(
            {
                "status": "ok" if writable else "degraded",
                "version": __version__,
                "data_dir_writable": writable,
                "providers": {
                    name: {"configured": p.configured, "reachable": p.reachable} for name, p in table.items()
                },
                "unreadable_conversations": sorted(await index.unreadable()),
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

    @app.post(
        "/api/chat",
        response_model=ChatOut,
        tags=["chat"],
        responses={
            200: chat.event_stream_doc(
                "JSON when `stream` is false; with `stream: true`, `text/event-stream` with events `start` "
                "{conversation_id, user_message_id, message_id}, `delta` {text}, then `done` {message} or "
                "`error` {error: {type, message}, message}."
            )
        },
    )
    async def chat_turn(body: ChatIn, request: Request, store: StoreDep, table: TableDep) -> Response:
        """Send a message and get the reply, whole or streamed as server-sent events."""
        turn = await chat.begin_turn(
            store,
            table,
            request.app.state.generations,
            client=client_key(request),
            conversation_id=body.conversation_id,
            text=body.message,
            options=chat.TurnOptions(body.model, body.system, body.temperature, body.max_tokens),
            default_model=request.app.state.default_model,
            client_message_id=body.client_message_id,
        )
        return await chat.start_and_answer(request, turn, body.stream, body.on_disconnect)

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
        return JSON(chat.conversation_view(conversation, request.app.state.generations), status_code=201)

    @app.get("/api/conversations", response_model=PageOut, tags=["conversations"])
    async def list_conversations(
        index: IndexDep,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        cursor: Annotated[str | None, Query(max_length=512)] = None,
        q: Annotated[str | None, Query(max_length=500)] = None,
    ) -> Response:
        """Conversations, most recently updated first; `q` keeps those whose title has every word
        (as a prefix). Pass `next_cursor` back for the next page."""
        items, next_cursor = await index.page(limit, cursor, q if q and q.strip() else None)
        return JSON({"items": items, "next_cursor": next_cursor})

    @app.get("/api/conversations/{conversation_id}", response_model=ConversationOut, tags=["conversations"])
    async def get_conversation(
        conversation_id: str, store: StoreDep, generations: chat.GenerationsDep
    ) -> Response:
        """One conversation with the messages of its current branch, oldest first."""
        conversation = await store.get(conversation_id)
        view = chat.conversation_view(conversation, generations)
        # a long conversation takes milliseconds to encode: not on the event loop
        return Response(await anyio.to_thread.run_sync(encode_view, view), media_type="application/json")

    @app.patch("/api/conversations/{conversation_id}", response_model=ConversationOut, tags=["conversations"])
    async def update_conversation(
        conversation_id: str,
        body: ConversationPatch,
        store: StoreDep,
        table: TableDep,
        generations: chat.GenerationsDep,
    ) -> Response:
        """Change the title, model, system prompt, parameters or the branch shown (`current_id`)."""
        changes = body.model_dump(exclude_unset=True)
        if body.model is not None:
            providers.resolve(table, body.model)
        for name in ("title", "model", "params", "current_id"):  # null means "leave as is"
            if name in changes and changes[name] is None:
                changes.pop(name)
        current_id = changes.pop("current_id", None)
        if current_id is not None:
            conversation = await store.set_current(conversation_id, current_id)
        if changes:
            conversation = await store.update(conversation_id, changes)
        elif current_id is None:
            conversation = await store.get(conversation_id)
        return JSON(chat.conversation_view(conversation, generations))

    @app.delete("/api/conversations/{conversation_id}", status_code=204, tags=["conversations"])
    async def delete_conversation(conversation_id: str, store: StoreDep) -> Response:
        """Delete a conversation and its file."""
        await store.delete(conversation_id)
        return Response(status_code=204)


def params_dict(params: ParamsModel) -> Any:
    return {"temperature": params.temperature, "max_tokens": params.max_tokens}


def provider_out(provider: Provider, listed: tuple[list[str], str] | None) -> dict[str, Any]:
    names, source = listed if listed is not None else ([], "none")
    return {
        "name": provider.name,
        "configured": provider.configured,
        "hint": provider.hint,
        "models": names,
        "models_source": source,
    }


def encode_view(view: dict[str, Any]) -> bytes:
    """A conversation as GET shows it, encoded (milliseconds for a long one: run it in a thread)."""
    return orjson.dumps(view)


# --- running it ---------------------------------------------------------------------------------


class BelowInfoDropped(logging.Filter):
    """uvicorn lends its `uvicorn.error` logger to the websockets library, whose DEBUG lines are a
    handshake's headers (the token, cookies, x-api-key): nothing below INFO leaves these loggers."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.INFO


class PathOnly(logging.Filter):
    """An access-log line names the path without its query string (which may carry a secret); uvicorn
    logs a websocket's access line on `uvicorn.error`, so both loggers get it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(a.partition("?")[0] if isinstance(a, str) else a for a in record.args)
        return True


def add_filter_once(name: str, kind: type[logging.Filter]) -> None:
    logger = logging.getLogger(name)
    if not any(isinstance(f, kind) for f in logger.filters):
        logger.addFilter(kind())


def quiet_uvicorn_logs() -> None:
    """Filters that hold whatever level uvicorn later sets on its loggers (`--log-level debug` too)."""
    for name in ("uvicorn", "uvicorn.error", "uvicorn.asgi", "websockets"):
        add_filter_once(name, BelowInfoDropped)
    for name in ("uvicorn.error", "uvicorn.access"):
        add_filter_once(name, PathOnly)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr
    )
    # The HTTP client's and SDKs' debug logs include request headers (keys): keep them quiet.
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "openai", "anthropic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_uvicorn_logs()


def exposure_problem(settings: Settings) -> str | None:
    """Why these settings would let strangers read the chats, if they would."""
    if settings.loopback or settings.api_token is not None or settings.allow_remote:
        return None
    return (
        f"Refusing to listen on {settings.host} without a token: anyone on the network could read "
        f"your conversations. Set CHAT_API_TOKEN (16+ characters), or CHAT_ALLOW_REMOTE=true if "
        f"something else guards the port."
    )


def prepare_data_dir(settings: Settings) -> None:
    """Create the data directory now, so that an unusable CHAT_DATA_DIR is one clear line, not a traceback."""
    store = Store(settings.data_dir)
    try:
        store.open()
        usable = os.access(store.conversations, os.W_OK)
        why = "is not writable"
    except (OSError, StorageError) as exc:
        usable = False
        why = f"cannot be used ({getattr(exc, 'strerror', None) or exc})"
    if not usable:
        example = Settings.model_fields["data_dir"].examples or [""]
        raise SettingsProblem(
            [f"Invalid setting CHAT_DATA_DIR: {settings.data_dir} {why}; e.g. CHAT_DATA_DIR={example[0]}"]
        )


def main() -> None:
    try:
        settings = load_settings()
        if sys.argv[1:2] == ["import"]:  # `python main.py import FILE...`: into the data dir, no server
            model = default_model(settings, build_providers(settings))
            limit = settings.max_import_bytes
            raise SystemExit(importing.run_cli(sys.argv[2:], settings.data_dir, limit, model))
        if problem := exposure_problem(settings):
            raise SettingsProblem([problem])
        prepare_data_dir(settings)
    except SettingsProblem as problem:
        raise exit_for(problem) from None
    configure_logging(settings.log_level)
    import uvicorn

    class UvicornServer(uvicorn.Server):
        """uvicorn, and on Ctrl-C or SIGTERM every open chat turn ends at once, saved as incomplete."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            loop: asyncio.AbstractEventLoop | None = getattr(service.state, "loop", None)
            if loop is not None:  # a signal handler may only hand work to the loop
                loop.call_soon_threadsafe(service.state.generations.stop_all)
            super().handle_exit(sig, frame)

    service = create_app(settings)
    config = uvicorn.Config(
        service,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout)),
        log_config=None,
        http=bounded_http_protocol(MAX_HEADER_BYTES),  # httptools, its buffer bounded (§5.4)
        ws="none",  # no WebSocket routes; an upgrade request is then plain HTTP, which Guard judges
    )
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises Ctrl-C once it has shut down
        UvicornServer(config).run()


def app_from_environment() -> FastAPI:
    """`uvicorn main:app`: bad settings exit with status 2 and one line each, as under main()."""
    try:
        return create_app()
    except SettingsProblem as problem:
        raise exit_for(problem) from None


app = app_from_environment() if __name__ != "__main__" else None

if __name__ == "__main__":
    main()
