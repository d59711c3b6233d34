"""Labelled progress bars: each long phase says what it is (loading, inverting, sampling).

A diffusers pipeline draws its bars with the settings of ``set_progress_bar_config``; :func:`labelled`
adds a ``desc`` for the length of a block and keeps the rest (``disable``, ...).
"""

from __future__ import annotations

import contextlib
import sys

LOADING = "loading"
INVERTING = "inverting"
SAMPLING = "sampling"


def say(phase: str, what: str = "") -> None:
    """One line on stderr as a phase without a bar of its own starts: ``imageprompt: loading MODEL ...``."""
    print(f"imageprompt: {phase} {what}".rstrip() + " ...", file=sys.stderr, flush=True)


def bar_settings(pipe) -> dict:
    """``pipe``'s progress bar settings (diffusers keeps them in ``_progress_bar_config``, with no getter)."""
    return dict(getattr(pipe, "_progress_bar_config", None) or {})


def label(pipe, text: str):
    """Label ``pipe``'s progress bars ``text`` from now on, its other settings kept; returns ``pipe``."""
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(**{**bar_settings(pipe), "desc": text})
    return pipe


@contextlib.contextmanager
def labelled(pipe, text: str):
    """``pipe``'s progress bars are labelled ``text`` inside the block, then as before."""
    before = bar_settings(pipe)
    label(pipe, text)
    try:
        yield pipe
    finally:
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(**before)
