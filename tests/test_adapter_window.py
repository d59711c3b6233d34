"""IP-Adapter step windows: an adapter applies only between fractions begin..end of the sampling steps."""

from __future__ import annotations

import pytest
import torch
from imageprompt.pipelines import StableDiffusionPromptToPromptPipeline
from test_image_embeds import write_own_clip_adapter
from test_ip_adapter import TINY_ENCODER, two_images

from imageprompt.ip_adapter import adapter_windows, image_branches, window_steps
from imageprompt.testing import ip_adapter_state_dict

SAMPLE = dict(num_inference_steps=4, guidance_scale=7.5, height=32, width=32, output_type="latent")


@pytest.fixture(scope="module")
def encoder():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(1)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_ENCODER)).eval()


@pytest.fixture
def own_clip_adapter_file(tiny_pipe, tmp_path):
    return write_own_clip_adapter(tiny_pipe, tmp_path / "adapter")


@pytest.fixture
def pipe(tiny_pipe):
    yield tiny_pipe
    tiny_pipe.unload_ip_adapter()


def load(pipe, encoder):
    pipe.load_ip_adapter(ip_adapter_state_dict(pipe.unet, "sd15", encoder.config), image_encoder=encoder)


def trajectory(pipe, **kwargs) -> list[torch.Tensor]:
    """The latents after every step (same noise each time)."""
    seen = []

    def keep(p, step, t, tensors):
        seen.append(tensors["latents"].clone())
        return tensors

    pipe(generator=torch.Generator().manual_seed(0), callback_on_step_end=keep, **SAMPLE, **kwargs)
    return seen


def test_window_steps_rule():
    assert list(window_steps((0.5, 1.0), 4)) == [2, 3]
    assert list(window_steps((0.0, 0.3), 25)) == list(range(7))
    assert list(window_steps((0.0, 1.0), 3)) == [0, 1, 2]
    assert list(window_steps((0.0, 0.1), 5)) == []  # a window may hold no step


def test_outside_the_window_is_plain_sampling_bit_for_bit(pipe, encoder):
    image, _ = two_images()
    plain = trajectory(pipe, prompt="a red circle")  # no adapter loaded at all
    load(pipe, encoder)
    full = trajectory(pipe, prompt="a red circle", ip_adapter_image=image)
    pipe.set_ip_adapter_window((0.5, 1.0))
    late = trajectory(pipe, prompt="a red circle", ip_adapter_image=image)
    for step in (0, 1):  # before the window: the plain pipeline's latents, exactly
        assert torch.equal(late[step], plain[step])
        assert not torch.equal(full[step], plain[step])
    for step in (2, 3):  # inside it the image branch acts
        assert (late[step] - plain[step]).abs().max() > 1e-4
    pipe.set_ip_adapter_window((0.0, 0.5))
    early = trajectory(pipe, prompt="a red circle", ip_adapter_image=image)
    assert all(torch.equal(early[s], full[s]) for s in (0, 1))  # inside: as with no window
    assert (early[3] - full[3]).abs().max() > 1e-4
    # after the loop every adapter applies again (a direct UNet call is not inside any window)
    assert all(branch.active is None for branch in image_branches(pipe.unet).values())


def test_window_per_adapter_and_kept_on_the_unet(pipe, encoder):
    from imageprompt.sdipc_branch import enable_sdipc_branch

    load(pipe, encoder)
    enable_sdipc_branch(pipe, scale=0.5)
    pipe.set_ip_adapter_window([(0.0, 0.4), None])
    assert adapter_windows(pipe.unet) == [(0.0, 0.4), (0.0, 1.0)]
    other = StableDiffusionPromptToPromptPipeline.from_pipe(pipe)
    assert adapter_windows(other.unet) == [(0.0, 0.4), (0.0, 1.0)]  # state on the UNet, seen by every pipeline
    pipe.set_ip_adapter_scale([0.7, 0.2])  # scales and windows are independent
    assert adapter_windows(pipe.unet)[0] == (0.0, 0.4)
    pipe.set_ip_adapter_window(None)
    assert adapter_windows(pipe.unet) == [(0.0, 1.0)] * 2


@pytest.mark.parametrize("window,message", [
    ((0.6, 0.5), "0 <= begin < end <= 1"),
    ((0.5, 0.5), "0 <= begin < end <= 1"),
    ((-0.1, 0.5), "0 <= begin < end <= 1"),
    ((0.0, float("nan")), "0 <= begin < end <= 1"),
    (("a", "b"), "pair of numbers"),
    ("0.5-1", "pair of fractions"),
    (0.5, "pair of fractions"),
    ([(0.0, 0.5), (0.5, 1.0)], "2 step windows for 1 loaded adapters"),
])
def test_bad_windows_are_clear_errors(pipe, encoder, window, message):
    load(pipe, encoder)
    with pytest.raises(ValueError, match=message):
        pipe.set_ip_adapter_window(window)
    assert adapter_windows(pipe.unet) == [(0.0, 1.0)]


def test_window_needs_an_adapter(pipe):
    with pytest.raises(ValueError, match="no image adapter is loaded"):
        pipe.set_ip_adapter_window((0.0, 0.5))


def test_window_composes_with_prompt_to_prompt(pipe, encoder):
    """IP-Adapter window + prompt-to-prompt: before the window the edit runs exactly as without the adapter."""
    p2p = StableDiffusionPromptToPromptPipeline.from_pipe(pipe)
    side = 32 // p2p.vae_scale_factor
    noise = torch.randn(1, p2p.unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(3))
    run = dict(source_prompt="a red circle", target_prompt="a blue circle", latents=noise, **SAMPLE)
    plain = trajectory_p2p(p2p, **run)
    load(pipe, encoder)
    image, _ = two_images()
    pipe.set_ip_adapter_window((0.5, 1.0))
    windowed = trajectory_p2p(p2p, ip_adapter_image=image, **run)
    assert all(torch.equal(windowed[s], plain[s]) for s in (0, 1))  # source and edit rows alike
    assert (windowed[3] - plain[3]).abs().max() > 1e-4


def trajectory_p2p(pipe, **kwargs) -> list[torch.Tensor]:
    seen = []

    def keep(p, step, t, tensors):
        seen.append(tensors["latents"].clone())
        return tensors

    kwargs.pop("generator", None)
    pipe(callback_on_step_end=keep, **kwargs)
    return seen


# ------------------------------------------------------------------ batch rows
def test_batch_rows_with_windows_and_content_subtraction(tiny_pipe, own_clip_adapter_file, tmp_path):
    import json

    from PIL import Image

    from imageprompt.images import read_parameters
    from imageprompt.jobs import RESULTS, JobDefaults, JobOptions, run_job

    Image.new("RGB", (40, 40), (220, 30, 30)).save(tmp_path / "red.png")
    adapter = str(own_clip_adapter_file)
    rows = [
        {"kind": "adapter", "image": "red.png", "adapter": adapter, "window": [0.5, 1]},
        {"kind": "adapter", "image": "red.png", "adapter": adapter},
        {"kind": "adapter", "image": "red.png", "adapter": adapter, "subtract_text": "a red circle"},
        {"kind": "p2p", "prompt": "a red circle", "target": "a blue circle", "adapter": adapter,
         "adapter_image": "red.png", "window": [0.0, 0.5], "subtract_text": "a circle", "subtract_scale": 0.5},
        {"kind": "adapter", "image": "red.png", "adapter": adapter, "window": [0.7, 0.2]},
        {"kind": "p2p", "prompt": "a red circle", "target": "a blue circle", "window": [0, 1]},
        {"kind": "adapter", "image": "red.png", "adapter": adapter, "subtract_scale": 0.5},
    ]
    (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    run_job(tmp_path / "jobs.jsonl", out, pipe=tiny_pipe, defaults=JobDefaults(steps=4, height=32, width=32),
            options=JobOptions(batch_size=4, progress=False))
    records = {r["line"]: r for r in map(json.loads, (out / RESULTS).read_text().splitlines())}
    assert [records[i]["status"] for i in (1, 2, 3, 4)] == ["done"] * 4, records
    assert "0 <= begin < end <= 1" in records[5]["error"]
    assert "'window' need 'adapter'" in records[6]["error"]
    assert "'subtract_scale' needs 'subtract_text'" in records[7]["error"]
    windowed, full, styled = (Image.open(out / records[i]["outputs"][0]) for i in (1, 2, 3))
    assert read_parameters(out / records[1]["outputs"][0])["window"] == [0.5, 1.0]
    assert read_parameters(out / records[4]["outputs"][0])["subtract_scale"] == 0.5
    assert list(windowed.getdata()) != list(full.getdata())
    assert list(styled.getdata()) != list(full.getdata())
    assert tiny_pipe.image_adapters == []


# ------------------------------------------------------------------------ demo
def test_demo_ip_adapter_tab_takes_a_window_and_content_words(tiny_pipe, own_clip_adapter_file, tmp_path):
    pytest.importorskip("gradio")
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError
    from imageprompt.demo.app import build_demo, load_adapters, serve
    from PIL import Image

    from imageprompt.images import read_parameters

    Image.new("RGB", (40, 40), (220, 30, 30)).save(tmp_path / "red.png")
    adapters = load_adapters(tiny_pipe, [str(own_clip_adapter_file)])
    demo = build_demo(tiny_pipe, scheduler="ddim", output_dir=tmp_path / "out", max_steps=20, default_steps=2,
                      adapters=adapters, adapter_names=["own"])
    serve(demo, port=None, block=False, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        fast = dict(num_images=1, steps=4, guidance=2.0, seed=5, width=32, height=32, negative_prompt="")
        _, downloads = client.predict(handle_file(tmp_path / "red.png"), "", 1.0, **fast, begin=0.5, end=1.0,
                                      content="a circle", api_name="/ip_adapter")
        params = read_parameters(downloads[0])
        assert params["adapter_windows"] == [[0.5, 1.0]] and params["adapter_subtract_text"] == "a circle"
        assert adapters[0].window == (0.5, 1.0)
        _, downloads = client.predict(handle_file(tmp_path / "red.png"), "", 1.0, **fast, api_name="/ip_adapter")
        assert "adapter_windows" not in read_parameters(downloads[0]) and adapters[0].window == (0.0, 1.0)
        with pytest.raises(AppError, match="Adapter from"):
            client.predict(handle_file(tmp_path / "red.png"), "", 1.0, **fast, begin=0.8, end=0.2,
                           api_name="/ip_adapter")
    finally:
        demo.close()
    assert tiny_pipe.image_adapters == []


def test_window_and_arithmetic_in_bfloat16(tiny_model):
    """Half precision: the window is still exact, and an image minus itself is still zero."""
    from imageprompt.pipelines.loading import load_pipeline

    pipe = load_pipeline(str(tiny_model[0]), str(tiny_model[1]), device="cpu", dtype="bf16")
    pipe.set_progress_bar_config(disable=True)
    plain = trajectory(pipe, prompt="a red circle")
    state = ip_adapter_state_dict(pipe.unet, "sd15", pipe.sdipc_image_encoder.config)
    pipe.load_ip_adapter(state, image_encoder=pipe.sdipc_image_encoder)
    image, other = two_images()
    pipe.set_ip_adapter_window((0.5, 1.0))
    late = trajectory(pipe, prompt="a red circle", ip_adapter_image=image)
    assert late[0].dtype == torch.bfloat16
    assert torch.equal(late[1], plain[1]) and not torch.equal(late[3], plain[3])
    zero = pipe.encode_ip_adapter_image([image, image], combine="subtract", content_text="a red circle")[0]
    assert zero.dtype == torch.bfloat16 and torch.equal(zero[1], torch.zeros_like(zero[1]))
    mixed = pipe.encode_ip_adapter_image([image, other], combine="norm-average", content_text="a red circle")[0]
    assert mixed.dtype == torch.bfloat16 and torch.isfinite(mixed).all()


def test_window_measurement_on_the_bundled_model_runs():
    """A smoke run of ``python -m imageprompt.world.evaluate_windows`` (the docs' table) on the bundled model."""
    from imageprompt.world.evaluate import load_bundled
    from imageprompt.world.evaluate_windows import KEYS, measure
    from imageprompt.world.measures import EvalSettings

    pipe = load_bundled("cpu")
    rows = measure(pipe, EvalSettings(samples=2, images_per_sample=1, steps=2), windows=(None, (0.5, 1.0)))
    assert [row["window"] for row in rows] == ["text only", "0.5-1"] and all(row["images"] == 2 for row in rows)
    assert all(0.0 <= row[key] <= 1.0 for row in rows for key in KEYS)
    assert pipe.image_adapters == []
