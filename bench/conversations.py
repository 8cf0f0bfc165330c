"""Conversations written straight to disk for the scenarios that need many or long ones: plain writes
(no fsync: the page cache is what a warm service reads anyway), in the service's own encoding."""

from __future__ import annotations

import random
from pathlib import Path

import storage
from bench.processes import MODELS

MODEL = "openai/" + MODELS["openai"]
PARAMS: storage.Params = {"temperature": None, "max_tokens": None}
WORDS = [
    *("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven"),
    *("wizards", "quietly", "judge", "boxing", "matches", "under", "pale", "moonlight", "and"),
    *("every", "answer", "needs", "context", "memory", "patience", "careful", "reading"),
]


def text_of(chars: int, rng: random.Random) -> str:
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < chars:
        words.append(rng.choice(WORDS))
    return " ".join(words)[:chars]


LANGUAGES = ("python", "javascript", "bash", "sql")


def inline_of(chars: int, rng: random.Random) -> str:
    """Words with now and then a **bold** phrase or an `inline code` span."""
    words = text_of(chars, rng).split(" ")
    for _ in range(len(words) // 12):
        i = rng.randrange(len(words))
        words[i] = f"**{words[i]}**" if rng.random() < 0.5 else f"`{words[i]}()`"
    return " ".join(words)


def markdown_of(chars: int, rng: random.Random) -> str:
    """A reply as a model writes one, of about `chars` characters: paragraphs, now and then a list
    (bulleted or numbered) or a fenced code block with a language."""
    blocks: list[str] = []
    size = 0
    while size < chars:
        kind = rng.random()
        if kind < 0.2 and blocks:
            bullet = "- " if rng.random() < 0.6 else "1. "
            block = "\n".join(bullet + inline_of(rng.randint(30, 90), rng) for _ in range(rng.randint(3, 6)))
        elif kind < 0.3 and blocks:
            lines = [f"    {text_of(rng.randint(15, 50), rng).replace(' ', '_')} = {i}" for i in range(5)]
            block = f"```{rng.choice(LANGUAGES)}\ndef f():\n" + "\n".join(lines) + "\n    return 0\n```"
        else:
            block = inline_of(rng.randint(150, 400), rng).capitalize() + "."
        blocks.append(block)
        size += len(block) + 2
    return "\n\n".join(blocks)


def make_conversation(
    messages: int, chars: int, rng: random.Random, markdown: bool = False
) -> storage.Conversation:
    """Alternating user/assistant messages of about `chars` characters each; with `markdown`, the
    replies are Markdown (`markdown_of`) and the questions plain text."""
    conversation = storage.new_conversation(model=MODEL, system=None, params=PARAMS.copy(), title="bench")
    parent: str | None = None
    for i in range(messages):
        message: storage.Message = {
            "id": storage.new_id(),
            "parent_id": parent,
            "role": "user" if i % 2 == 0 else "assistant",
            "content": markdown_of(chars, rng) if markdown and i % 2 else text_of(chars, rng),
            "created_at": storage.now(),
        }
        if message["role"] == "assistant":
            message["model"] = MODEL
            message["params"] = PARAMS.copy()
            message["status"] = "complete"
            message["finish_reason"] = "stop"
            message["usage"] = {"input_tokens": 10, "output_tokens": 100}
            message["error"] = None
        conversation["messages"].append(message)
        parent = message["id"]
    conversation["current_id"] = parent
    return conversation


def put(data_dir: Path, conversation: storage.Conversation) -> Path:
    folder = data_dir / "conversations"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{conversation['id']}.json"
    path.write_bytes(storage.encode(conversation))
    return path


def fill(data_dir: Path, count: int, rng: random.Random) -> Path:
    """`count` short conversations in `data_dir` (made once per run)."""
    if not (data_dir / "conversations").exists():
        for _ in range(count):
            put(data_dir, make_conversation(2, 200, rng))
    return data_dir
