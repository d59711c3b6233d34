"""The demo's limits and fixed places: what one request may ask for, and how much the server keeps."""

from __future__ import annotations

from pathlib import Path

from imageprompt.images import MAX_SIDE

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
MAX_FILE_SIZE = "10mb"  # uploads above this are refused by gradio itself
MAX_INPUT_PIXELS = 4096 * 4096  # refused before decoding; larger sides up to this are downscaled to MAX_SIDE
MAX_IMAGES = 4
MAX_STEPS = 150
QUEUE_SIZE = 16  # waiting jobs; more are turned away with "queue is full"
KEEP_RUNS = 64  # result folders kept in the demo's temporary folder
GPU = "gpu"  # one concurrency group: all tabs share the one pipeline, one job at a time
SEED_MAX = 2**31 - 1
MAX_WORD_WEIGHT = 100  # prompt-to-prompt word weights beyond this overflow the attention (fp16: inf)

__all__ = ["EXAMPLES_DIR", "GPU", "KEEP_RUNS", "MAX_FILE_SIZE", "MAX_IMAGES", "MAX_INPUT_PIXELS", "MAX_SIDE",
           "MAX_STEPS", "MAX_WORD_WEIGHT", "QUEUE_SIZE", "SEED_MAX"]
