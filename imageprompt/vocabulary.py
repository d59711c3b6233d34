"""The words a model's tokenizer knows whole, and a warning for prompts that use others.

The bundled shapes-world model (:data:`imageprompt.checkpoints.BUNDLED_MODEL`) has a
tokenizer built from the world's captions alone (``imageprompt.world.scenes.vocabulary()``):
shapes, colours, positions, backgrounds and a few common words. Any other word ("cat",
"beach") still tokenizes, but split into letters and pieces the model never saw in
training, so it means nothing to the model and attention maps are labelled ``c``, ``at``...
The command line, the demo and batch jobs warn once per prompt; ``imageprompt words``
lists the vocabulary.

The words are read from the tokenizer's own ``vocab.json``, so they follow the model.
No torch or transformers here: the check runs before any model loads.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from pathlib import Path

WORDS_COMMAND = "imageprompt words"
_WORD = re.compile(r"[^\W_]+")  # letters and digits: how the CLIP tokenizer splits words


def is_bundled_model(model: str | Path | None) -> bool:
    """Whether ``model`` (a path or hub id) is the bundled shapes-world model folder."""
    from imageprompt.checkpoints import BUNDLED_MODEL

    if model is None:
        return False
    try:
        return Path(model).expanduser().resolve() == Path(BUNDLED_MODEL).resolve()
    except (OSError, TypeError, ValueError):
        return False


@functools.lru_cache(maxsize=8)
def tokenizer_words(tokenizer_folder: str | Path) -> frozenset[str]:
    """Every whole word (``word</w>`` entry) of a CLIP tokenizer's ``vocab.json``, single characters included."""
    vocab = json.loads((Path(tokenizer_folder) / "vocab.json").read_text(encoding="utf-8"))
    return frozenset(token[: -len("</w>")] for token in vocab if token.endswith("</w>") and len(token) > 4)


def bundled_words() -> frozenset[str]:
    """The whole words of the bundled model's tokenizer."""
    from imageprompt.checkpoints import BUNDLED_MODEL

    return tokenizer_words(str(Path(BUNDLED_MODEL) / "tokenizer"))


def bundled_vocabulary() -> list[str]:
    """The bundled model's vocabulary, sorted: its whole words of two or more letters, and ``a``."""
    words = bundled_words()
    return sorted(w for w in words if (len(w) > 1 and w.isalpha()) or w == "a")


def unknown_words(text: str | None, known: Iterable[str]) -> list[str]:
    """The words of ``text`` (lower-cased, first-seen order, each once) that are not in ``known``."""
    known = known if isinstance(known, (set, frozenset)) else set(known)
    found: dict[str, None] = {}
    for word in _WORD.findall((text or "").lower()):
        if word not in known:
            found.setdefault(word, None)
    return list(found)


def unknown_words_message(model: str | Path | None, text: str | None, what: str = "the prompt") -> str | None:
    """The warning for ``text`` when ``model`` is the bundled model and ``text`` has words it does not know."""
    if not text or not is_bundled_model(model):
        return None
    missing = unknown_words(text, bundled_words())
    if not missing:
        return None
    quoted = ", ".join(f"'{w}'" for w in missing)
    they = "they are" if len(missing) > 1 else "it is"
    return (f"the bundled shapes-world model does not know {quoted} ({what} {text!r}): {they} split into letters "
            f"it never saw in training and mean{'' if len(missing) > 1 else 's'} nothing to it; `{WORDS_COMMAND}` "
            "lists the words it knows.")


def warn_unknown_words(model: str | Path | None, prompts: Iterable[tuple[str, str | None]],
                       seen: set | None = None) -> list[str]:
    """Warn (:class:`UserWarning`) once per prompt with unknown words, for the bundled model only.

    ``prompts`` holds ``(what, text)`` pairs such as ``("--prompt", "a cat")``; ``seen`` (a set kept
    by the caller, e.g. across the rows of a batch job) holds the texts already warned about.
    Returns the messages given.
    """
    import warnings

    seen = set() if seen is None else seen
    messages = []
    for what, text in prompts:
        if not text or text in seen:
            continue
        message = unknown_words_message(model, text, what)
        if message:
            seen.add(text)
            messages.append(message)
            warnings.warn(message, UserWarning, stacklevel=2)
    return messages
