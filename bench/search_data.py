"""Conversations for the search and listing benchmarks, written straight into a data directory.

    python -m bench.search_data DATA_DIR [--conversations 10000] [--messages 20] [--chars 600]

Each message is about `--chars` characters of words drawn from a fixed vocabulary (seeded, so every
run writes the same text). Planted for the queries the benchmark asks:

- `RARE_WORD` in one message of `RARE_COUNT` conversations (a word found in a few conversations);
- `COMMON_WORD` in one message of every conversation;
- `CJK_PHRASE` (Japanese) in one message of every 100th conversation, so that a three-character
  substring (trigram index) and a two-character one (a scan) have something to find.

Files are written plainly (no fsync): this makes test data, not conversations to keep.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import storage  # noqa: E402

RARE_WORD = "zanzibarite"
RARE_COUNT = 5
COMMON_WORD = "everywhere"
CJK_PHRASE = "東京都の天気予報"
QUERIES = {
    "rare word": RARE_WORD,
    "word in every conversation": COMMON_WORD,
    "two-word phrase": '"quick brown"',
    "prefix": "deploy*",
    "accent-insensitive": "cafe",
    "cjk 3 characters": "東京都",
    "cjk 2 characters": "天気",
}
WORDS = (
    "the a of to and in is it you that for on with as this was are be at or from have not by but "
    "what all were when we there can an your which their said if do will each about how up out them "
    "then she many some so these would other into has more her two like him see time could no make "
    "than first been its who now people my made over did down only way find use may water long little "
    "very after words called just where most know python server deploy deployment database index query "
    "function error memory network request response cache token model prompt reply stream message file "
    "quick brown fox jumps lazy dog café résumé naïve coöperate garçon piñata über straße"
)
VOCABULARY = WORDS.split()


def paragraph(rng: random.Random, chars: int, planted: str | None) -> str:
    words: list[str] = []
    length = 0
    while length < chars:
        word = rng.choice(VOCABULARY)
        words.append(word)
        length += len(word) + 1
    if planted is not None:
        words.insert(rng.randrange(len(words)), planted)
    return " ".join(words)


def conversation(rng: random.Random, number: int, messages: int, chars: int) -> storage.Conversation:
    params: storage.Params = {"temperature": None, "max_tokens": None}
    doc = storage.new_conversation(model="openai/gpt-4o-mini", system=None, params=params)
    doc["title"] = " ".join(rng.choice(VOCABULARY) for _ in range(5)).capitalize()
    plants: dict[int, str] = {rng.randrange(messages): COMMON_WORD}
    if number < RARE_COUNT:
        plants[rng.randrange(messages)] = RARE_WORD
    if number % 100 == 0:
        plants[rng.randrange(messages)] = CJK_PHRASE
    parent = None
    for position in range(messages):
        message: storage.Message = {
            "id": storage.new_id(),
            "parent_id": parent,
            "role": "user" if position % 2 == 0 else "assistant",
            "content": paragraph(rng, chars, plants.get(position)),
            "created_at": storage.now(),
        }
        if message["role"] == "assistant":
            message["model"] = doc["model"]
            message["status"] = "complete"
        doc["messages"].append(message)
        parent = message["id"]
    doc["current_id"] = parent
    return doc


def write(data_dir: Path, conversations: int, messages: int, chars: int, seed: int = 20261129) -> None:
    folder = data_dir / "conversations"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for number in range(conversations):
        doc = conversation(rng, number, messages, chars)
        (folder / f"{doc['id']}.json").write_bytes(storage.encode(doc))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--conversations", type=int, default=10_000)
    parser.add_argument("--messages", type=int, default=20)
    parser.add_argument("--chars", type=int, default=600)
    args = parser.parse_args()
    write(args.data_dir, args.conversations, args.messages, args.chars)


if __name__ == "__main__":
    main()
