"""The project's one token estimate, for what no server counted for us.

Used to fit a history into a model's context window, to count the usage of a reply that ended
early or came from a server that sends no usage, and for `/v1/messages/count_tokens`.
Nothing here downloads anything: `tiktoken` fetches its encodings on first use and fails offline.

The rule: one token per 4 characters of text in scripts written with spaces (English and most
European languages average 3.5-4.5 characters per token in the OpenAI and Anthropic tokenizers),
one token per character of Chinese, Japanese or Korean script (their tokenizers give about one
token per character), and a few tokens of framing per message. It overestimates slightly more
often than it underestimates, which is the safe side for a context window and a budget.
"""

from __future__ import annotations

import math
import re

CHARS_PER_TOKEN = 4.0
TOKENS_PER_MESSAGE = 4  # role and framing, as the OpenAI cookbook counts them
_WIDE = re.compile(r"[\u1100-\u11ff\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")


def estimate_tokens(text: str) -> int:
    """Tokens in `text` by the rule above (0 for empty text)."""
    if not text:
        return 0
    wide = len(_WIDE.findall(text))
    return wide + math.ceil((len(text) - wide) / CHARS_PER_TOKEN)


def estimate_messages(texts: list[str]) -> int:
    """Tokens of a list of messages' texts, with each message's framing."""
    return sum(estimate_tokens(t) + TOKENS_PER_MESSAGE for t in texts)
