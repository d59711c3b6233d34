"""torch.compile(unet, fullgraph=True) with imageprompt's processors installed: no graph break (dynamo's own
counters; the "eager" backend, so no compiler is needed)."""

from __future__ import annotations

import pytest
import torch

dynamo = pytest.importorskip("torch._dynamo")


@pytest.fixture
def compiled(tiny_model):
    from imageprompt.pipelines.loading import load_pipeline

    pipe = load_pipeline(str(tiny_model[0]), str(tiny_model[1]), device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    dynamo.reset()
    pipe.unet = torch.compile(pipe.unet, fullgraph=True, backend="eager")
    yield pipe
    dynamo.reset()


def test_sdipc_variation_and_text_compile_once(compiled, red_image):
    from torch._dynamo.utils import counters

    counters.clear()
    kw = dict(num_inference_steps=3, output_type="np", height=32, width=32)
    compiled(image=red_image, **kw)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    compiled(prompt="a red circle", **kw)  # same shapes: the graph is reused, every step
    assert counters["stats"]["unique_graphs"] == 1


def test_prompt_to_prompt_compiles_without_graph_breaks(compiled):
    from imageprompt.pipelines import StableDiffusionPromptToPromptPipeline
    from torch._dynamo.utils import counters

    p2p = StableDiffusionPromptToPromptPipeline.from_pipe(compiled)
    counters.clear()
    out = p2p("a red circle", "a blue circle", blend_words=["red", "blue"], num_inference_steps=3,
              output_type="np", height=32, width=32)
    assert out.images.shape[0] == 2 and not counters["graph_break"]
