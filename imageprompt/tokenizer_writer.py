"""A small CLIP BPE vocabulary, generated from a word list (the tiny test models' and the shapes world's).

transformers' ``CLIPTokenizer`` reads ``vocab.json`` and ``merges.txt``. The real
table (49408 entries) is not available offline, so tests and the bundled model
use a vocabulary built here: every printable ASCII character (alone and as a
word end ``c</w>``), plus merges that assemble each listed word left to right,
ranked so that every listed word is a single token (as common English words are
in CLIP's table). Any other text still tokenizes, falling back to pieces and
characters.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77


def _word_merges(word: str) -> list[tuple[str, str]]:
    """Merges that build ``word</w>`` left to right: ((w,o), (wo,r), (wor,d</w>))."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    merges, left = [], symbols[0]
    for right in symbols[1:]:
        merges.append((left, right))
        left = left + right
    return merges


def write_clip_tokenizer(words: Iterable[str], folder: str | Path, max_length: int = MAX_LENGTH) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer config into ``folder``.

    Returns the folder; load it with ``CLIPTokenizer.from_pretrained(folder)``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = [c for c in string.printable if not c.isspace()]
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    words = sorted({w.lower() for w in words if len(w.strip()) >= 2})
    for word in words:
        for left, right in _word_merges(word):
            vocab.setdefault(left + right, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    _write_single_token_merges(words, folder)
    return folder


def _write_merges(order: list[str], folder: Path) -> None:
    merges, seen = [], set()
    for word in order:
        for merge in _word_merges(word):
            if merge not in seen:
                seen.add(merge)
                merges.append(merge)
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2"] + [f"{a} {b}" for a, b in merges]) + "\n")


def _write_single_token_merges(words: list[str], folder: Path) -> None:
    """Rank the merges so that every listed word ends as one token.

    BPE applies the best-ranked merge anywhere in a word, so one word's merge can
    break another's chain ("ar" of "are" inside "square"). Longer words go
    first, and words that still split move to the front until none does.
    """
    from transformers import CLIPTokenizer

    order = sorted(words, key=lambda w: (-len(w), w))
    for _ in range(len(order) + 1):
        _write_merges(order, folder)
        tokenizer = CLIPTokenizer.from_pretrained(folder)
        split = [w for w in order if len(tokenizer.tokenize(w)) != 1]
        if not split:
            return
        order = split + [w for w in order if w not in split]
    raise RuntimeError(f"could not make single tokens of {split}")


def write_t5_tokenizer(words: Iterable[str], folder: str | Path) -> Path:
    """Write a small T5 (SentencePiece unigram) tokenizer into ``folder``: every listed word is one piece
    ``▁word``, other text falls back to ``▁c`` and single characters; ``</s>`` ends every sequence, ``<pad>``
    pads, as in T5's own tokenizer. Load it with ``T5TokenizerFast.from_pretrained(folder)``."""
    from transformers import T5TokenizerFast

    chars = [c for c in string.printable if not c.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -5.0) for c in chars] + [("\u2581" + c, -5.0) for c in chars]
    vocab += [("\u2581" + w, -1.0) for w in sorted({w.lower() for w in words if len(w.strip()) >= 2})]
    folder = Path(folder)
    T5TokenizerFast(vocab=vocab, extra_ids=0).save_pretrained(folder)
    return folder
