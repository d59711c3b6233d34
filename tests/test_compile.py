"""torch.compile(unet, fullgraph=True) with imageprompt's processors installed: no graph break, and one graph that
every denoising step reuses (dynamo's own counters; the "eager" backend, so no compiler is needed).

Each technique runs with windows that open or close inside the run (prompt-to-prompt's cross- and self-attention
steps, MasaCtrl's start step, an IP-Adapter's step window), where a Python switch would recompile; the compiled
images are compared with the eager pipeline's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402

SAMPLE = dict(num_inference_steps=4, output_type="np", height=32, width=32)
SOURCE, TARGET = "a red circle", "a blue circle"


@pytest.fixture(scope="module")
def compiled(tiny_model):
    from imageprompt.pipelines.loading import load_pipeline

    pipe = load_pipeline(str(tiny_model[0]), str(tiny_model[1]), device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    dynamo.reset()
    pipe.unet = torch.compile(pipe.unet, fullgraph=True, backend="eager")
    yield pipe
    dynamo.reset()


def one_graph(run):
    """Run ``run()`` on a fresh dynamo cache; assert one graph, no break; return its result."""
    dynamo.reset()
    counters.clear()
    out = run()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, "recompiled during the run"
    return out


def noise(pipe):
    side = SAMPLE["height"] // pipe.vae_scale_factor
    return torch.randn(1, pipe.unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(0))


def test_sdipc_variation_and_text_compile_once(compiled, red_image):
    one_graph(lambda: compiled(image=red_image, **SAMPLE))
    compiled(prompt="a red circle", **SAMPLE)  # same shapes: the graph is reused, every step
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("edit", [
    dict(mode="replace", blend_words=["red", "blue"], cross_steps=0.5, self_steps=0.5),
    pytest.param(dict(mode="refine", target="a big blue circle", cross_steps=(0.25, 0.75), weights={"big": 2.0}),
                 marks=pytest.mark.slow),  # the same switches as replace, another edit: opt in (-m slow)
    pytest.param(dict(mode="reweight", target=None, weights={"red": 3.0}, cross_steps=0.5, blend_words=["circle"],
                      blend_start=0.5), marks=pytest.mark.slow),
], ids=["replace-blend", "refine", "reweight"])
def test_prompt_to_prompt_compiles_once_for_every_step(compiled, p2p_pipe, edit):
    from imageprompt.pipelines import StableDiffusionPromptToPromptPipeline

    edit = dict(edit)
    target = edit.pop("target", TARGET)
    p2p = StableDiffusionPromptToPromptPipeline.from_pipe(compiled)
    latents = noise(p2p)
    got = one_graph(lambda: p2p(SOURCE, target, latents=latents, **edit, **SAMPLE)).images
    expected = p2p_pipe(SOURCE, target, latents=latents, **edit, **SAMPLE).images
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.abs(got[1] - got[0]).max() > 1e-3  # the edit did something


@pytest.mark.parametrize("masks", [pytest.param(None, marks=pytest.mark.slow), ["circle", "square"]],
                         ids=["plain", "masks"])
def test_masactrl_compiles_once_for_every_step(compiled, tiny_pipe, masks):
    from imageprompt.pipelines import StableDiffusionMasaCtrlPipeline

    kwargs = dict(start_step=2, start_layer=0, mask_words=masks, **SAMPLE)
    latents = noise(compiled)
    got = one_graph(lambda: StableDiffusionMasaCtrlPipeline.from_pipe(compiled)(
        SOURCE, "a blue square", latents=latents, **kwargs)).images
    expected = StableDiffusionMasaCtrlPipeline.from_pipe(tiny_pipe)("a red circle", "a blue square",
                                                                    latents=latents, **kwargs).images
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_style_aligned_compiles_once(compiled):
    from imageprompt.pipelines import StableDiffusionStyleAlignedPipeline

    out = one_graph(lambda: StableDiffusionStyleAlignedPipeline.from_pipe(compiled)(
        [SOURCE, "a blue square"], keys_scale=0.8, **SAMPLE))
    assert out.images.shape[0] == 2


def test_ip_adapter_with_a_window_and_a_mask_compiles_once(compiled, tiny_pipe, red_image):
    from diffusers.image_processor import IPAdapterMaskProcessor
    from PIL import Image
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from imageprompt.testing import ip_adapter_state_dict

    torch.manual_seed(1)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=40)).eval()
    left = Image.fromarray(np.pad(np.full((32, 16), 255, np.uint8), ((0, 0), (0, 16))))
    mask = IPAdapterMaskProcessor().preprocess([left], height=32, width=32).reshape(1, 1, 32, 32)
    images = {}
    for name, pipe in (("compiled", compiled), ("eager", tiny_pipe)):
        pipe.load_ip_adapter(ip_adapter_state_dict(pipe.unet, "sd15", encoder.config), image_encoder=encoder)
        try:
            pipe.set_ip_adapter_window((0.25, 0.75))  # steps 1 and 2 of 4
            runs = [dict(), dict(cross_attention_kwargs={"ip_adapter_masks": [mask]})]
            for i, extra in enumerate(runs):
                def run(extra=extra, pipe=pipe):
                    return pipe(prompt="a circle", ip_adapter_image=red_image, latents=noise(pipe), **SAMPLE,
                                **extra).images
                images[name, i] = one_graph(run) if name == "compiled" else run()
        finally:
            pipe.unload_ip_adapter()
    for i in range(2):
        np.testing.assert_allclose(images["compiled", i], images["eager", i], atol=1e-4)
    assert np.abs(images["eager", 0] - images["eager", 1]).max() > 1e-4  # the mask mattered


def test_compile_mode_picks_cuda_graphs_on_cuda_only():
    from imageprompt.jobs.sampling import compile_mode

    assert compile_mode("cuda") == compile_mode(torch.device("cuda", 1)) == "reduce-overhead"
    assert compile_mode("cpu") is None and compile_mode("mps") is None


def test_the_compile_option_of_the_command_line_compiles_the_unet(tiny_model, tmp_path, red_image, monkeypatch,
                                                                     capsys):
    from imageprompt.cli.main import main
    from imageprompt.images import read_parameters

    image = tmp_path / "red.png"
    red_image.save(image)
    monkeypatch.setenv("IMAGEPROMPT_COMPILE_BACKEND", "eager")  # dynamo without inductor's C compiler
    args = ["vary", str(image), "--model", str(tiny_model[0]), "--clip", str(tiny_model[1]), "--steps", "3",
            "--seed", "1"]
    dynamo.reset()
    counters.clear()
    assert main([*args, "--out", str(tmp_path / "compiled"), "--compile"]) == 0, capsys.readouterr().err
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]  # the UNet and the VAE decoder
    assert main([*args, "--out", str(tmp_path / "eager")]) == 0
    [compiled], [eager] = (sorted((tmp_path / name).glob("*.png")) for name in ("compiled", "eager"))
    from PIL import Image

    assert np.abs(np.asarray(Image.open(compiled), np.int16) - np.asarray(Image.open(eager), np.int16)).max() <= 1
    assert read_parameters(compiled)["seed"] == 1
    dynamo.reset()
