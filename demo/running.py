"""Running a job: one at a time across all tabs, failures shown in the page, warnings passed on.

Known failures (the library's exceptions for bad input or missing weights, running out of GPU memory)
become a readable ``gr.Error`` and one line in the server log (the traceback only with ``--debug``);
anything else is logged with its traceback and summarised in the page.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable

import gradio as gr
from imageprompt.demo.context import DemoContext, Sampling, write_results
from imageprompt.demo.limits import GPU
from imageprompt.demo.validation import escape, page_error

from imageprompt.images import generators

logger = logging.getLogger(__name__)


def user_errors() -> tuple[type[BaseException], ...]:
    """The library's exceptions whose message is meant for the user as it is.

    Not TypeError: from inside the library it is a bug, shown as "Unexpected TypeError" and logged.
    """
    from imageprompt.images import ImageInputError
    from imageprompt.loading import ModelLoadError

    return (ImageInputError, ModelLoadError, ValueError, FileNotFoundError)


def shows_errors(fn: Callable) -> Callable:
    """Turn known failures into a readable ``gr.Error``; log and summarise the unexpected ones."""

    @functools.wraps(fn)  # keeps the signature: gradio reads the parameter names and the Progress default
    def wrapper(*args, **kwargs):
        import torch

        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            raise page_error("Out of GPU memory: try fewer images or a smaller size.") from None
        except user_errors() as err:
            raise page_error(str(err)) from None
        except Exception as err:  # a bug, not a refusal: logged with its traceback
            logger.exception("demo request failed")
            raise page_error(f"Unexpected {type(err).__name__}: {err}", log=False) from None

    return wrapper


def on_run(button: gr.Button, fn: Callable, inputs: list, outputs: list, api_name: str) -> None:
    """Attach a sampling handler: queued, one job at a time across all tabs."""
    button.click(shows_errors(fn), inputs, outputs, api_name=api_name, concurrency_limit=1, concurrency_id=GPU)


def sample(ctx: DemoContext, method: str, inputs: dict, sampling: Sampling, params: dict):
    """Run the SD-IPC pipeline with the accordion's settings and write the results."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = ctx.pipe(
            **inputs, negative_prompt=sampling.negative_prompt, num_inference_steps=sampling.steps,
            guidance_scale=sampling.guidance, num_images_per_prompt=sampling.num_images, height=sampling.height,
            width=sampling.width, generator=generators(sampling.seed, sampling.num_images),
        )
    for warning in caught:
        if issubclass(warning.category, UserWarning):
            gr.Warning(escape(str(warning.message)))  # e.g. a prompt truncated to 77 tokens
    seeds = [sampling.seed + i for i in range(sampling.num_images)]
    return write_results(ctx, result.images, method, seeds, params)
