"""The API's request and response bodies: what FastAPI validates and what /docs describes.

Routes answer with plain dicts encoded by orjson; these models document those bodies and
validate what comes in (limits, types, unknown fields refused).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

MODEL_NAME = r"^[^/\s]+/\S+$"
MODEL_NAME_ERROR = "model_name"  # main.py adds the configured providers to this error's message


def _model_name(value: str) -> str:
    if re.fullmatch(MODEL_NAME, value) is None:
        raise PydanticCustomError(MODEL_NAME_ERROR, 'model must be "provider/model", e.g. "ollama/llama3.2"')
    return value


ModelName = Annotated[
    str,
    Field(max_length=256, examples=["openai/gpt-4o-mini"], json_schema_extra={"pattern": MODEL_NAME}),
    AfterValidator(_model_name),
]
Temperature = Annotated[float, Field(ge=0, le=2)]
MaxTokens = Annotated[int, Field(ge=1, le=1_000_000)]
SystemPrompt = Annotated[str, Field(max_length=200_000)]
Title = Annotated[str, Field(min_length=1, max_length=200)]
ClientMessageId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=64,
        description="Your id for this request: a repeat with an id already in the conversation "
        "answers that turn instead of adding another (safe retries).",
    ),
]
OnDisconnect = Annotated[
    Literal["stop", "continue"],
    Field(
        description='"stop": a client that goes away ends the reply (saved as incomplete); '
        '"continue": the reply goes on and is saved (re-attach with GET .../stream).'
    ),
]


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
    on_disconnect: OnDisconnect = "stop"
    client_message_id: ClientMessageId | None = None

    @field_validator("message")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise PydanticCustomError("blank_message", "message must contain some text, not only spaces")
        return value


class RegenerateIn(Strict):
    model: ModelName | None = Field(None, description="provider/model; default: the conversation's.")
    temperature: Temperature | None = None
    max_tokens: MaxTokens | None = None
    stream: bool = False
    on_disconnect: OnDisconnect = "stop"
    client_message_id: ClientMessageId | None = None


class EditIn(RegenerateIn):
    message: str = Field(min_length=1, max_length=500_000, description="The new text of the user's message.")

    @field_validator("message")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        return ChatIn._not_blank(value)


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
    current_id: str | None = Field(
        None,
        max_length=64,
        description="Show the branch through this message: the current leaf becomes the newest leaf "
        "beneath it. Changing only this keeps updated_at.",
    )


class UsageOut(BaseModel):
    input_tokens: int | None
    output_tokens: int | None
    estimated: bool = Field(False, description="counted by the service's estimate: the provider sent none")


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
    status: Literal["complete", "incomplete", "error", "generating"] | None = None
    finish_reason: str | None = None
    usage: UsageOut | None = None
    cost: float | None = Field(None, description="USD; null when the model's price is unknown")
    error: ErrorInfoOut | None = None
    messages_left_out: int | None = Field(
        None, description="Oldest messages of the branch not sent to the model: the window was full."
    )
    client_message_id: str | None = None
    sibling_ids: list[str] | None = Field(
        None, description="In GET and tree: this message and its siblings (same parent), oldest first."
    )


class TotalsOut(BaseModel):
    input_tokens: int
    output_tokens: int
    cost: float | None = Field(description="USD over the replies with a known price; null if none has one")


class SummaryOut(BaseModel):
    id: str
    title: str | None
    created_at: str
    updated_at: str
    model: str
    message_count: int
    totals: TotalsOut = Field(description="tokens and cost of every reply in every branch")


class ConversationOut(SummaryOut):
    system: str | None
    params: ParamsModel
    current_id: str | None
    messages: list[MessageOut] = Field(description="The current branch, oldest first.")


class TreeOut(BaseModel):
    id: str
    current_id: str | None
    messages: list[MessageOut] = Field(description="Every message of every branch, in the order added.")


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
