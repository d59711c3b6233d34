"""The world's tokenizer writer: :mod:`imageprompt.tokenizer_writer`, re-exported for the world's users.

The writer lives outside the world package so that :mod:`imageprompt.testing` can build
tiny models without importing the world (scenes, reader, numpy and Pillow).
"""

from imageprompt.tokenizer_writer import BOS, EOS, MAX_LENGTH, write_clip_tokenizer

__all__ = ["BOS", "EOS", "MAX_LENGTH", "write_clip_tokenizer"]
