"""Is a configured secret fit for production? (core/config.Settings refuses it at start if not.)

A production secret must come from a CSPRNG (`openssl rand -hex 32`, a platform's generated
value): RFC 7518 §3.2 wants an HS256 key of at least 256 bits and OWASP ASVS (V6.4, V14.3) wants
no default or example credential in production. Nothing can prove that a string is random, so this
refuses what certainly is not, and errs towards accepting generated values:

* every example or placeholder this repository ships (.env.example, deploy/k8s, docs) and any
  value with a placeholder marker in it (`replace-me`, `change-me`, `example`, `secret`, ...);
* fewer than 128 bits by an estimate that gives no credit for what an attacker would try first:
  a character that repeats or continues the previous step (`xxxx`, `abcd`, `0000`) adds nothing,
  a string that repeats a shorter block counts once, a value of only a few distinct symbols
  counts by its Shannon entropy, and a phrase of words counts each word as one pick from a
  7776-word list (Diceware's 12.9 bits), so `my-super-secret-jwt-signing-key` is 7 words, not
  31 random characters.

Hand-written, not zxcvbn: zxcvbn models human passwords (at most 72 characters, a 10-symbol
brute-force alphabet that would score a 32-character hex key below 128 bits) and its word lists
would cost every worker process ~14 MB for a check that runs once.
"""

from __future__ import annotations

import math
import re
from collections import Counter

MIN_BITS = 128
WORD_BITS = math.log2(7776)  # one word of a Diceware list

# Every example value this repository ships, exactly (compared case-insensitively). A test keeps
# this in step with .env.example and deploy/k8s/secret.example.yaml.
KNOWN_EXAMPLES = frozenset(
    {
        "dev-insecure-change-me",
        "replace-me",
        "replace-me-with-64-random-hex-characters-0000000000000000000000",
        "change-me",
        "changeme",
        "secret",
        "test-secret-" + "x" * 40,
    }
)
# Words that mark a placeholder anywhere in the value. Five letters or more, so a random
# base64 value contains one by chance about once in 10^5 draws (and is then regenerated).
_MARKERS = re.compile(
    r"replace|change|example|placeholder|insecure|secret|passw|dummy|sample|default|fixme|"
    r"notsecure|letmein",
    re.IGNORECASE,
)
_HEX = frozenset("0123456789abcdef")
# Words, camelCase humps and numbers: `MyJwtKey2024` → My, Jwt, Key, 2024.
_PIECES = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|[0-9]+")
_WORD = re.compile(r"[a-z]{2,}|[A-Z][a-z]+")  # lower-case or Capitalized
_CONSONANTS = re.compile(r"[bcdfghjklmnpqrstvwxz]{4}", re.IGNORECASE)


def weakness(value: str, *, min_chars: int = 32, min_bits: float = MIN_BITS) -> str | None:
    """Why `value` is not a production secret, or None. The reason never quotes the value."""
    if value.strip().lower() in KNOWN_EXAMPLES:
        return "it is an example value shipped with llm-api"
    if _MARKERS.search(value):
        return "it contains a placeholder word (replace, change, example, secret, ...)"
    if len(value) < min_chars:
        return f"it is shorter than {min_chars} characters"
    bits = estimated_bits(value)
    if bits < min_bits:
        return f"it looks guessable (about {bits:.0f} bits; at least {min_bits:.0f} needed)"
    return None


def estimated_bits(value: str) -> float:
    """A conservative estimate of the bits an attacker must guess (see the module docstring)."""
    per_char = min(math.log2(_alphabet(value)), _shannon(_shortest_period(value)))
    pieces = _PIECES.findall(value)
    words = [p for p in pieces if _is_word(p)]
    # A phrase: three words or more that make up most of the value (random text has digits and
    # one-letter humps between its letter runs).
    if len(words) >= 3 and sum(map(len, words)) >= 0.75 * len(value):
        # A word is worth one pick from a word list, a short one no more than its letters.
        return sum(
            min(WORD_BITS, _informative_length(p) * per_char)
            if _is_word(p)
            else _informative_length(p) * per_char
            for p in pieces
        )
    return _informative_length(_shortest_period(value)) * per_char


def _is_word(piece: str) -> bool:
    """Lower-case or Capitalized letters, pronounceable: words rarely have four consonants in a
    row, random letters usually do."""
    return _WORD.fullmatch(piece) is not None and not _CONSONANTS.search(piece)


def _shortest_period(value: str) -> str:
    """`abcabcab` → `abc`: a value that repeats a block is worth one block."""
    n = len(value)
    for p in range(1, n // 2 + 1):
        if all(value[i] == value[i - p] for i in range(p, n)):
            return value[:p]
    return value


def _informative_length(value: str) -> int:
    """Characters that do not just continue the previous step (repeat, +1, -1, ...)."""
    if len(value) < 3:
        return len(value)
    codes = [ord(c) for c in value]
    predictable = sum(
        1 for i in range(2, len(codes)) if codes[i] - codes[i - 1] == codes[i - 1] - codes[i - 2]
    )
    return len(value) - predictable


def _alphabet(value: str) -> int:
    """Size of the alphabet the value seems drawn from (hex, alphanumerics, printable)."""
    if set(value.lower()) <= _HEX and (value.islower() or value.isupper() or value.isdigit()):
        return 16
    size = 0
    size += 10 if any(c.isdigit() for c in value) else 0
    size += 26 if any(c.islower() for c in value) else 0
    size += 26 if any(c.isupper() for c in value) else 0
    size += 33 if any(not c.isalnum() for c in value) else 0
    return max(size, 2)


def _shannon(value: str) -> float:
    """Bits per character of the value's own character distribution."""
    if not value:
        return 0.0
    n = len(value)
    return sum(c / n * math.log2(n / c) for c in Counter(value).values())
