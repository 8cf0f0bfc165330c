"""Crash safety: a crash at any file-system call of a write leaves every file valid, old or new.

SQLite's crash-test idea: the storage module's `os` calls (open, write, fsync, replace, close,
unlink) are counted in a child process that performs one append, and the child dies with
`os._exit` at the N-th call, for every N. The parent then checks what a restart would see.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

import storage
from tests.test_storage import listed, new, opened, turn

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import asyncio, os, sys, types
sys.path.insert(0, {root!r})
import storage
from tests.test_storage import turn

crash_at = {crash_at}
calls = 0

def counted(fn):
    def call(*args, **kwargs):
        global calls
        calls += 1
        if calls == crash_at:
            os._exit(99)  # no cleanup, no flush: as close to pulling the plug as a process gets
        return fn(*args, **kwargs)
    return call

names = ("open", "write", "fsync", "replace", "close", "unlink")
storage.os = types.SimpleNamespace(**{{n: getattr(os, n) for n in dir(os)}})
for name in names:
    setattr(storage.os, name, counted(getattr(os, name)))

store = storage.Store(storage.Path({data!r}))
asyncio.run(turn(store, {cid!r}, "crash test", "the answer"))
print(calls)
"""


def run_child(data_dir: Path, conversation_id: str, crash_at: int) -> subprocess.CompletedProcess[str]:
    script = CHILD.format(root=str(ROOT), data=str(data_dir), cid=conversation_id, crash_at=crash_at)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)


def prepare(data_dir: Path) -> tuple[str, bytes]:
    store = opened(data_dir)

    async def history() -> str:
        conversation_id = await turn(store, new(), "first question", "first answer")
        await turn(store, conversation_id, "second question", "second answer")
        return conversation_id

    conversation_id = asyncio.run(history())
    return conversation_id, (store.conversations / f"{conversation_id}.json").read_bytes()


@pytest.mark.timeout(1200)  # a child process per crash point: minutes on a busy 2-core machine
def test_a_crash_at_every_file_system_call_leaves_old_or_new(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    conversation_id, before = prepare(reference)
    clean = run_child(reference, conversation_id, crash_at=0)
    assert clean.returncode == 0, clean.stderr
    total_calls = int(clean.stdout)
    assert total_calls >= 10  # two writes: each open, write, fsync, close, replace, dir fsync
    outcomes = {"old": 0, "new user message": 0, "new with reply": 0}

    for crash_at in range(1, total_calls + 1):
        data_dir = tmp_path / f"crash-{crash_at}"
        conversation_id, before = prepare(data_dir)
        result = run_child(data_dir, conversation_id, crash_at)
        assert result.returncode == 99, (crash_at, result.stderr)
        before_messages = json.loads(before)["messages"]

        conversations = data_dir / "conversations"
        path = conversations / f"{conversation_id}.json"
        doc = json.loads(path.read_bytes())  # always parses
        messages = doc["messages"]
        if path.read_bytes() == before:
            outcomes["old"] += 1
        else:
            assert messages[:4] == before_messages[:4]
            assert messages[4]["content"] == "crash test"
            reply = messages[5]
            if reply["content"] == "the answer":
                assert reply["status"] == "complete"
                outcomes["new with reply"] += 1
            else:
                assert (reply["content"], reply["status"]) == ("", "incomplete")
                outcomes["new user message"] += 1
        leftovers = [p.name for p in conversations.iterdir() if not p.name.startswith(conversation_id)]
        assert all(name.startswith(".") and name.endswith(".tmp") for name in leftovers), leftovers

        # what a restarted service sees: the conversation listed once, readable, writable
        assert listed(data_dir) == ([conversation_id], {})
        store = opened(data_dir)
        asyncio.run(turn(store, conversation_id, "after the crash", "fine"))
        assert storage.current_branch(asyncio.run(store.get(conversation_id)))[-1]["content"] == "fine"

    assert all(outcomes.values()), outcomes  # the sweep reached every stage of the write
    print(f"\ncrash sweep: {total_calls} crash points, outcomes {outcomes}")
