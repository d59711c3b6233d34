"""Prompt-to-prompt's token alignment (the authors' ``seq_aligner`` and ``get_word_inds``):
which target token reads which source token's attention, for replace (word swap) and refine
(global alignment of the two token sequences), and per-token weights. The controller that
uses them is :mod:`imageprompt.p2p`.
"""

from __future__ import annotations

import string

import torch


def normalize_word(word: str) -> str:
    return word.lower().strip(string.punctuation)


def word_token_spans(tokenizer, prompt: str) -> list[tuple[str, list[int]]]:
    """``(word, token positions)`` for each word; position 0 is BOS. CLIP's BPE splits on whitespace first."""
    spans, position = [], 1
    for word in prompt.split():
        count = len(tokenizer.encode(word, add_special_tokens=False))
        spans.append((normalize_word(word), list(range(position, position + count))))
        position += count
    return spans


def word_positions(tokenizer, prompt: str, word: str, length: int) -> list[int]:
    """Token positions of every occurrence of ``word`` in ``prompt`` (within the context length)."""
    word = normalize_word(word)
    return [p for w, span in word_token_spans(tokenizer, prompt) if w == word for p in span if p < length - 1]


def replacement_mapper(tokenizer, source: str, target: str, length: int) -> torch.Tensor:
    """``(length, length)`` matrix ``M`` with ``target_probs = source_probs @ M`` (word swap).

    Words correspond one for one; a word whose token count differs spreads the
    source tokens' attention evenly over its target tokens. After the words,
    EOS and padding map in order.
    """
    mapper = torch.zeros(length, length)
    mapper[0, 0] = 1.0
    end_s = end_t = 1
    for (_, src), (_, tgt) in zip(word_token_spans(tokenizer, source), word_token_spans(tokenizer, target)):
        src, tgt = [p for p in src if p < length], [p for p in tgt if p < length]
        if src and tgt:
            if len(src) == len(tgt):
                mapper[src, tgt] = 1.0
            else:
                mapper[torch.tensor(src)[:, None], torch.tensor(tgt)[None, :]] = 1.0 / len(tgt)
        end_s, end_t = end_s + len(src), end_t + len(tgt)
    i, j = end_s, end_t
    while j < length:
        mapper[min(i, length - 1), j] = 1.0
        i, j = i + 1, j + 1
    return mapper


def global_alignment(x: list[int], y: list[int]) -> list[int]:
    """Needleman-Wunsch alignment (gap 0, match 1, mismatch -1): for each ``y`` index, its ``x`` index or -1.

    Tie-breaking follows the authors' ``seq_aligner``: insertion, deletion, then diagonal.
    """
    n, m = len(x), len(y)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    trace = [[0] * (m + 1) for _ in range(n + 1)]
    for j in range(1, m + 1):
        trace[0][j] = 1
    for i in range(1, n + 1):
        trace[i][0] = 2
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left, up = score[i][j - 1], score[i - 1][j]
            diag = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            best = max(left, up, diag)
            score[i][j] = best
            trace[i][j] = 1 if best == left else 2 if best == up else 3
    mapping = [-1] * m
    i, j = n, m
    while i > 0 or j > 0:
        if trace[i][j] == 3:
            i, j = i - 1, j - 1
            mapping[j] = i
        elif trace[i][j] == 1:
            j -= 1
        else:
            i -= 1
    return mapping


def refinement_mapper(tokenizer, source: str, target: str, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, keep)``: target position ``j`` takes source position ``index[j]`` where ``keep[j]`` is 1.

    New tokens of the target (``keep`` 0) keep their own attention. Target
    padding position ``j`` (after EOS) takes source position ``j``, as in the
    authors' ``seq_aligner.get_refinement_mapper``.
    """
    x = tokenizer.encode(source)[:length]
    y = tokenizer.encode(target)[:length]
    mapping = global_alignment(x, y)
    index = torch.zeros(length, dtype=torch.long)
    keep = torch.ones(length)
    for j, i in enumerate(mapping):
        index[j], keep[j] = max(i, 0), float(i >= 0)
    for j in range(len(y), length):
        index[j] = j
    return index, keep


def token_weights(tokenizer, prompt: str, weights: dict, length: int) -> torch.Tensor:
    """``(length,)`` multipliers: 1, and ``value`` at the tokens of each weighted word."""
    vector = torch.ones(length)
    for word, value in weights.items():
        vector[word_positions(tokenizer, prompt, word, length)] = float(value)
    return vector
