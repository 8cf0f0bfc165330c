"""Export files as ChatGPT and Claude.ai write them (fields and content types from FACTS.md), to import.

Each builder returns plain JSON data; `zipped` packs files the way the services' downloads do.
"""

from __future__ import annotations

import io
import uuid
import zipfile
from typing import Any

import orjson

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def uid(n: int, salt: str = "") -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{salt}/{n}"))


# --- ChatGPT ------------------------------------------------------------------------------------


class ChatGPTConversation:
    """A `mapping` tree built node by node: `add` returns the new node's id."""

    def __init__(
        self, conversation_id: str, title: str | None = "Sorting in Python", model: str = "gpt-4o"
    ) -> None:
        self.conversation_id = conversation_id
        self.title = title
        self.model = model
        self.mapping: dict[str, Any] = {
            "client-created-root": {
                "id": "client-created-root",
                "message": None,
                "parent": None,
                "children": [],
            }
        }
        self.current_node = "client-created-root"
        self.clock = T0

    def add(
        self,
        parent: str,
        role: str,
        content: dict[str, Any],
        *,
        status: str = "finished_successfully",
        finish: str | None = "stop",
        hidden: bool = False,
        recipient: str = "all",
        channel: str | None = None,
        name: str | None = None,
        model: str | None = None,
        timestamp: bool = True,
    ) -> str:
        node_id = str(uuid.uuid5(uuid.NAMESPACE_OID, f"{self.conversation_id}/{len(self.mapping)}"))
        self.clock += 7.25
        metadata: dict[str, Any] = {}
        if role == "assistant":
            metadata["model_slug"] = model or self.model
            if finish is not None:
                metadata["finish_details"] = {"type": finish, "stop_tokens": [200002]}
        if hidden:
            metadata["is_visually_hidden_from_conversation"] = True
        message: dict[str, Any] = {
            "id": node_id,
            "author": {"role": role, "name": name, "metadata": {}},
            "create_time": self.clock if timestamp else None,
            "update_time": None,
            "content": content,
            "status": status,
            "end_turn": role == "assistant" or None,
            "weight": 1.0,
            "metadata": metadata,
            "recipient": recipient,
            "channel": channel,
        }
        self.mapping[node_id] = {"id": node_id, "message": message, "parent": parent, "children": []}
        self.mapping[parent]["children"].append(node_id)
        self.current_node = node_id
        return node_id

    def doc(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "create_time": T0,
            "update_time": self.clock,
            "mapping": self.mapping,
            "moderation_results": [],
            "current_node": self.current_node,
            "plugin_ids": None,
            "conversation_id": self.conversation_id,
            "conversation_template_id": None,
            "gizmo_id": None,
            "is_archived": False,
            "safe_urls": [],
            "default_model_slug": self.model,
            "id": self.conversation_id,
        }


def text(*parts: str) -> dict[str, Any]:
    return {"content_type": "text", "parts": list(parts)}


def image_pointer() -> dict[str, Any]:
    return {
        "content_type": "image_asset_pointer",
        "asset_pointer": "file-service://file-AbC123",
        "size_bytes": 183_511,
        "width": 1024,
        "height": 768,
        "fovea": None,
        "metadata": None,
    }


def chatgpt_rich(conversation_id: str = "67a1b2c3-0000-4000-8000-00000000c0de") -> dict[str, Any]:
    """A conversation with what real exports hold: branches, hidden and tool nodes, code, quotes, images."""
    c = ChatGPTConversation(conversation_id)
    n: dict[str, str] = {}
    system = c.add("client-created-root", "system", text(""), hidden=True, finish=None)
    context = c.add(
        system,
        "user",
        {
            "content_type": "user_editable_context",
            "user_profile": "I am a data engineer.",
            "user_instructions": "Answer briefly, with code.",
        },
        hidden=True,
    )
    n["question"] = c.add(context, "user", text("Sort a list of dicts by a key?"))
    thoughts = c.add(
        n["question"],
        "assistant",
        {"content_type": "thoughts", "thoughts": [{"summary": "Plan", "content": "Use sorted with a key."}]},
        model="o3",
        channel="analysis",
        finish=None,
    )
    recap = c.add(
        thoughts,
        "assistant",
        {"content_type": "reasoning_recap", "content": "Thought for 4 seconds"},
        model="o3",
    )
    n["code"] = c.add(
        recap,
        "assistant",
        {
            "content_type": "code",
            "language": "python",
            "text": "rows = [{'a': 2}, {'a': 1}]\nsorted(rows, key=lambda r: r['a'])",
        },
        recipient="python",
        model="o3",
        finish=None,
    )
    output = c.add(
        n["code"], "tool", {"content_type": "execution_output", "text": "[{'a': 1}, {'a': 2}]"}, name="python"
    )
    n["answer"] = c.add(output, "assistant", text("Use `sorted(rows, key=lambda r: r['a'])`."), model="o3")
    # a regenerated answer beside the first one, interrupted by the user
    n["regenerated"] = c.add(
        output, "assistant", text("You can use operator.itemgetter"), finish="interrupted", model="o3"
    )
    # the first answer continues: an image and a question
    n["picture"] = c.add(
        n["answer"],
        "user",
        {"content_type": "multimodal_text", "parts": [image_pointer(), "What does this chart show?"]},
    )
    n["chart"] = c.add(n["picture"], "assistant", text("A rising trend."), model="gpt-4o")
    search = c.add(n["chart"], "user", text("Find the docs for sorted()."))
    n["search_user"] = search
    call = c.add(search, "assistant", text('search("python sorted key")'), recipient="browser", finish=None)
    browse = c.add(
        call,
        "tool",
        {"content_type": "tether_browsing_display", "result": "# docs.python.org ...", "summary": None},
        name="browser",
    )
    n["quote"] = c.add(
        browse,
        "tool",
        {
            "content_type": "tether_quote",
            "url": "https://docs.python.org/3/howto/sorting.html",
            "domain": "docs.python.org",
            "text": "sorted() has a key parameter.\nIt is called once per element.",
            "title": "Sorting Techniques",
        },
        name="browser",
    )
    n["final"] = c.add(
        n["quote"],
        "assistant",
        text("The docs say `key` is called once per element."),
        status="in_progress",
        finish=None,
    )
    return c.doc()


def chatgpt_simple(index: int, salt: str = "simple", turns: int = 2) -> dict[str, Any]:
    c = ChatGPTConversation(uid(index, salt), title=f"Conversation {index}")
    parent = "client-created-root"
    for turn in range(turns):
        parent = c.add(parent, "user", text(f"Question {turn} of conversation {index}"))
        parent = c.add(parent, "assistant", text(f"Answer {turn} " + "lorem ipsum " * 40))
    return c.doc()


# --- Claude.ai ----------------------------------------------------------------------------------

CLAUDE_ROOT = "00000000-0000-4000-8000-000000000000"


def claude_message(
    message_uuid: str,
    sender: str,
    parent: str,
    minute: int,
    content: list[dict[str, Any]],
    *,
    attachments: list[dict[str, Any]] | None = None,
    files: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    stamp = f"2025-03-04T10:{minute:02d}:05.123456Z"
    return {
        "uuid": message_uuid,
        "text": "".join(b.get("text", "") for b in content if b["type"] == "text"),
        "content": content,
        "sender": sender,
        "created_at": stamp,
        "updated_at": stamp,
        "attachments": attachments or [],
        "files": files or [],
        "parent_message_uuid": parent,
    }


def block(text_value: str) -> dict[str, Any]:
    return {
        "type": "text",
        "text": text_value,
        "start_timestamp": None,
        "stop_timestamp": None,
        "citations": [],
    }


def claude_rich(
    conversation_uuid: str = "c1a0de00-0000-4000-8000-000000000001",
) -> tuple[dict[str, Any], dict[str, str]]:
    n = {
        k: uid(i, conversation_uuid) for i, k in enumerate(["ask", "think", "edit", "tools", "photo", "seen"])
    }
    messages = [
        claude_message(
            n["ask"],
            "human",
            CLAUDE_ROOT,
            0,
            [block("Summarise the attached notes.")],
            attachments=[
                {
                    "file_name": "notes.txt",
                    "file_size": 31,
                    "file_type": "txt",
                    "extracted_content": "Line one.\n```\nLine two.",
                }
            ],
        ),
        claude_message(
            n["think"],
            "assistant",
            n["ask"],
            1,
            [
                {"type": "thinking", "thinking": "The user wants a summary.", "summaries": []},
                block("Two lines of notes."),
            ],
        ),
        # the user edited the first message: a second branch from the root
        claude_message(n["edit"], "human", CLAUDE_ROOT, 2, [block("Summarise them in French.")]),
        claude_message(
            n["tools"],
            "assistant",
            n["edit"],
            3,
            [
                {"type": "tool_use", "name": "web_search", "input": {"query": "résumé"}},
                {"type": "tool_result", "name": "web_search", "content": [{"type": "text", "text": "..."}]},
                block("Deux lignes de notes."),
            ],
        ),
        claude_message(
            n["photo"], "human", n["tools"], 4, [block("And this photo?")], files=[{"file_name": "photo.jpg"}]
        ),
        claude_message(n["seen"], "assistant", n["photo"], 5, [block("Une photo d'un chat.")]),
    ]
    doc = {
        "uuid": conversation_uuid,
        "name": "Notes summary",
        "summary": "",
        "created_at": "2025-03-04T10:00:00.000000Z",
        "updated_at": "2025-03-04T10:05:06.000000Z",
        "account": {"uuid": "acc00000-0000-4000-8000-000000000000"},
        "chat_messages": messages,
    }
    return doc, n


def claude_simple(index: int, salt: str = "simple") -> dict[str, Any]:
    conversation_uuid = uid(index, "claude-" + salt)
    first, second = uid(2 * index, salt + "m"), uid(2 * index + 1, salt + "m")
    return {
        "uuid": conversation_uuid,
        "name": f"Claude {index}",
        "summary": "",
        "created_at": "2025-01-01T00:00:00Z",
        "updated_at": "2025-01-01T00:01:00Z",
        "account": {"uuid": "acc00000-0000-4000-8000-000000000000"},
        "chat_messages": [
            claude_message(first, "human", CLAUDE_ROOT, 0, [block(f"Hello {index}")]),
            claude_message(second, "assistant", first, 1, [block(f"Hi {index}!")]),
        ],
    }


# --- files --------------------------------------------------------------------------------------


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def zipped(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def chatgpt_sharded_zip(shards: list[list[dict[str, Any]]]) -> bytes:
    names = [f"conversations-{i:03d}.json" for i in range(len(shards))]
    files = {name: dumps(shard) for name, shard in zip(names, shards, strict=True)}
    files["conversations.json.index"] = dumps({"files": names, "count": sum(len(s) for s in shards)})
    files["export_manifest.json"] = dumps({"version": 2, "files": [*names, "user.json", "chat.html"]})
    files["user.json"] = dumps({"id": "user-abc", "email": "someone@example.com"})
    files["chat.html"] = b"<html><body>ChatGPT export</body></html>"
    files["file-AbC123-chart.png"] = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
    return zipped(files)
