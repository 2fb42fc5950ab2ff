"""A deterministic toy tokenizer and a seeded word sampler.

Generated text re-tokenizes to exactly the number of tokens that produced it: every sampled token is
either a word with one leading space or a punctuation mark, which the tokenizer splits back apart.
"""

from __future__ import annotations

import hashlib
import random
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

_TOKEN_PATTERN = re.compile(r"\w+|[^\w\s]")
_VOCAB_SIZE = 32000
_SPECIAL_IDS = {"<|im_start|>": 1, "<|im_end|>": 2, "\n": 3}
_FIRST_WORD_ID = 16


_WORDS = (
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from",
    "it", "an", "be", "this", "are", "or", "his", "which", "her", "had", "not", "but", "were", "they",
    "have", "one", "all", "their", "has", "been", "more", "time", "can", "would", "there", "about", "when",
    "who", "will", "so", "up", "out", "into", "some", "could", "them", "only", "other", "than", "then",
    "its", "new", "these", "two", "may", "first", "also", "after", "any", "many", "most", "over", "such",
    "where", "through", "back", "years", "way", "even", "because", "good", "each", "those", "people",
    "model", "token", "engine", "batch", "stream", "queue", "river", "stone", "light", "garden", "window",
    "paper", "signal", "music",
)


def token_id(piece: str) -> int:
    """Stable id of one token text (process-independent, unlike hash())."""
    special = _SPECIAL_IDS.get(piece)
    if special is not None:
        return special
    return _FIRST_WORD_ID + zlib.crc32(piece.lower().encode()) % (_VOCAB_SIZE - _FIRST_WORD_ID)


def split_words(text: str) -> list[str]:
    return _TOKEN_PATTERN.findall(text)


def encode(text: str) -> list[int]:
    return [token_id(piece) for piece in split_words(text)]


def message_text(content: Any) -> str:
    """Text of an OpenAI message `content`: a string, or a list of parts of which text parts count."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part.get("text", "") for part in content if isinstance(part, dict)]
        return " ".join(text for text in texts if isinstance(text, str))
    return str(content)


# A ChatML-like template: `<|im_start|>{role}\n{content}<|im_end|>` per message (4 tokens around the
# content), then `<|im_start|>assistant\n` (3 tokens) as the generation prompt.
def chat_token_strings(messages: Iterable[dict[str, Any]], add_generation_prompt: bool = True) -> list[str]:
    pieces: list[str] = []
    for message in messages:
        pieces.extend(("<|im_start|>", str(message.get("role", "")), "\n"))
        pieces.extend(split_words(message_text(message.get("content"))))
        for call in message.get("tool_calls") or ():
            if isinstance(call, dict):
                function = call.get("function") or {}
                pieces.extend(split_words(f"{function.get('name', '')} {function.get('arguments', '')}"))
        pieces.append("<|im_end|>")
    if add_generation_prompt:
        pieces.extend(("<|im_start|>", "assistant", "\n"))
    return pieces


def encode_chat(messages: Iterable[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
    return [token_id(piece) for piece in chat_token_strings(messages, add_generation_prompt)]


def prompt_fingerprint(token_ids: Sequence[int]) -> str:
    digest = hashlib.blake2b(digest_size=8)
    digest.update(b",".join(str(t).encode() for t in token_ids))
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class VocabEntry:
    text: str
    token_id: int


def _build_vocabulary() -> tuple[VocabEntry, ...]:
    words = [VocabEntry(" " + word, token_id(word)) for word in _WORDS]
    # Punctuation is rarer than words, as in prose.
    punctuation = [VocabEntry(".", token_id(".")), VocabEntry(",", token_id(","))]
    return tuple(words + punctuation * 4)


VOCABULARY = _build_vocabulary()


class TokenSampler:
    """Draws output tokens for one sequence; the same seed material gives the same text."""

    __slots__ = ("_rng",)

    def __init__(self, engine_seed: int, request_seed: int | None, prompt_key: str, choice_index: int) -> None:
        self._rng = random.Random(f"{engine_seed}/{request_seed}/{prompt_key}/{choice_index}")

    def next_token(self) -> VocabEntry:
        return self._rng.choice(VOCABULARY)


def embedding_vector(engine_seed: int, token_ids: Sequence[int], dim: int) -> list[float]:
    """A unit-length vector that depends only on the seed and the tokens."""
    rng = random.Random(f"{engine_seed}/embed/{prompt_fingerprint(token_ids)}")
    values = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [v / norm for v in values]
