"""The API's request and response bodies: what FastAPI validates and what /docs describes.

Routes answer with plain dicts encoded by orjson; these models document those bodies and
validate what comes in (limits, types, unknown fields refused).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ModelName = Annotated[str, Field(pattern=r"^[^/\s]+/\S+$", max_length=256, examples=["openai/gpt-4o-mini"])]
Temperature = Annotated[float, Field(ge=0, le=2)]
MaxTokens = Annotated[int, Field(ge=1, le=1_000_000)]
SystemPrompt = Annotated[str, Field(max_length=200_000)]
Title = Annotated[str, Field(min_length=1, max_length=200)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatIn(Strict):
    message: str = Field(min_length=1, max_length=500_000, description="The user's message.")
    conversation_id: str | None = Field(
        None,
        description="Continue this conversation (32 lowercase hex characters); omit to start one. "
        "A malformed id is answered like an unknown one: 404 conversation_not_found.",
    )
    model: ModelName | None = Field(None, description="provider/model; default: the conversation's.")
    system: SystemPrompt | None = None
    temperature: Temperature | None = None
    max_tokens: MaxTokens | None = None
    stream: bool = False

    @field_validator("message")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("message must contain some text")
        return value


class ParamsModel(Strict):
    temperature: Temperature | None = None
    max_tokens: MaxTokens | None = None


class ConversationIn(Strict):
    title: Title | None = None
    model: ModelName | None = None
    system: SystemPrompt | None = None
    params: ParamsModel = ParamsModel()


class ConversationPatch(Strict):
    title: Title | None = None
    model: ModelName | None = None
    system: SystemPrompt | None = None
    params: ParamsModel | None = None


class UsageOut(BaseModel):
    input_tokens: int | None
    output_tokens: int | None


class ErrorInfoOut(BaseModel):
    type: str
    message: str


class MessageOut(BaseModel):
    id: str
    parent_id: str | None
    role: Literal["user", "assistant"]
    content: str
    created_at: str
    model: str | None = None
    system: str | None = None
    params: ParamsModel | None = None
    status: Literal["complete", "incomplete", "error"] | None = None
    finish_reason: str | None = None
    usage: UsageOut | None = None
    error: ErrorInfoOut | None = None


class SummaryOut(BaseModel):
    id: str
    title: str | None
    created_at: str
    updated_at: str
    model: str
    message_count: int


class ConversationOut(SummaryOut):
    system: str | None
    params: ParamsModel
    current_id: str | None
    messages: list[MessageOut] = Field(description="The current branch, oldest first.")


class PageOut(BaseModel):
    items: list[SummaryOut]
    next_cursor: str | None


class ChatOut(BaseModel):
    conversation_id: str
    message: MessageOut


class ProviderOut(BaseModel):
    name: str
    configured: bool
    hint: str
    models: list[str]
    models_source: Literal["upstream", "fallback", "none"]


class ModelsOut(BaseModel):
    default_model: str
    providers: list[ProviderOut]


class ProviderHealth(BaseModel):
    configured: bool = Field(description="has the key it needs (local servers need none)")
    reachable: bool | None = Field(
        description="answered the last model listing or call; null: not asked yet (health never probes)"
    )


class HealthOut(BaseModel):
    status: Literal["ok", "degraded"]
    version: str
    data_dir_writable: bool
    providers: dict[str, ProviderHealth] = Field(description="provider name -> its state")
    unreadable_conversations: list[str]


class ErrorOut(BaseModel):
    detail: str
    type: str
