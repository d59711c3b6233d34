"""Real-image inversion: DDIM, null-text and negative-prompt inversion on the tiny model."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from imageprompt import inversion as inv

SOURCE, TARGET = "a red cat on the beach", "a red dog on the beach"


@pytest.fixture
def photo(noise_image):
    return noise_image.resize((32, 32))


def test_ddim_step_inverts_ddim_inverse_step_and_matches_scheduler(p2p_pipe):
    scheduler = p2p_pipe.scheduler
    scheduler.set_timesteps(5)
    gen = torch.Generator().manual_seed(0)
    x, noise = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    inverse = inv.inverse_scheduler(scheduler)
    alphas = scheduler.alphas_cumprod
    for t in scheduler.timesteps:
        up = inv.ddim_inverse_step(inverse, noise, t, x)
        assert not torch.allclose(up, x, atol=1e-3)
        assert torch.allclose(inv.ddim_step(scheduler, noise, t, up), x, atol=1e-5)
        # DDIM (Song et al. 2021, Eq. 12, eta 0) written out: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps
        t_prev = int(t) - 1000 // 5
        a_t, a_prev = alphas[int(t)], alphas[t_prev] if t_prev >= 0 else alphas[0]
        x0 = (up - (1 - a_t).sqrt() * noise) / a_t.sqrt()
        assert torch.allclose(inv.ddim_step(scheduler, noise, t, up), a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * noise,
                              atol=1e-6)


def fixed_noise_unet(sample, timestep, encoder_hidden_states=None, return_dict=True, **kwargs):
    """A 'UNet' whose prediction depends on the timestep only: then DDIM inversion is exact."""
    t = float(timestep)
    grid = torch.arange(sample[0].numel(), dtype=sample.dtype).reshape(sample.shape[1:])
    noise = torch.sin(grid * 0.37 + t / 100.0).expand_as(sample)
    return (noise,) if not return_dict else type("Out", (), {"sample": noise})()


@pytest.mark.parametrize("method", ["ddim", "negative-prompt"])
def test_inversion_then_edit_reconstructs_photo_exactly_for_a_latent_free_model(p2p_pipe, photo, method,
                                                                                 monkeypatch):
    monkeypatch.setattr(p2p_pipe.unet, "forward", fixed_noise_unet)
    result = p2p_pipe.invert(photo, SOURCE, method, num_inference_steps=5)
    assert len(result.trajectory) == 6 and result.latents is result.trajectory[-1]
    assert (result.latents - result.trajectory[0]).abs().max() > 0.1  # it did move towards noise
    out = p2p_pipe(SOURCE, TARGET, inversion=result, num_inference_steps=5, output_type="latent")
    expected = inv.encode_image(p2p_pipe, photo, 32, 32)
    assert (out.images - expected).abs().max().item() < 1e-4


def test_negative_prompt_inversion_uses_source_embedding(p2p_pipe, photo):
    result = p2p_pipe.invert(photo, SOURCE, "negative-prompt", num_inference_steps=2)
    cond, _ = p2p_pipe.encode_text([SOURCE], "cpu")
    assert torch.equal(result.uncond_embeds, cond)
    assert torch.equal(result.uncond_at(0), result.uncond_at(1))


def test_null_text_lowers_the_step_error(p2p_pipe, photo):
    scheduler, unet = p2p_pipe.scheduler, p2p_pipe.unet
    scheduler.set_timesteps(2)
    timesteps = scheduler.timesteps
    cond, _ = p2p_pipe.encode_text([SOURCE], "cpu")
    empty, _ = p2p_pipe.encode_text([""], "cpu")
    trajectory = inv.ddim_inversion(p2p_pipe, inv.encode_image(p2p_pipe, photo, 32, 32), cond, timesteps)
    nulls = inv.null_text_inversion(p2p_pipe, trajectory, cond, empty, timesteps, 7.5, num_inner_steps=10,
                                    epsilon=0.0)
    assert len(nulls) == 2 and nulls[0].shape == empty.shape and not nulls[0].requires_grad
    assert all(p.grad is None for p in unet.parameters())  # only the embedding was optimised

    @torch.no_grad()
    def step_error(null):
        t, x = timesteps[0], trajectory[-1]
        u, c = (unet(x, t, encoder_hidden_states=e).sample for e in (null, cond))
        return F.mse_loss(inv.ddim_step(scheduler, u + 7.5 * (c - u), t, x), trajectory[-2]).item()

    assert step_error(nulls[0]) < 0.97 * step_error(empty)


class BarRecorder:
    def __init__(self):
        self.bars = []

    @contextlib.contextmanager
    def __call__(self, total=None, **kwargs):
        bar = {"total": total, "n": 0}
        self.bars.append(bar)

        class Bar:
            def update(self, n=1):
                bar["n"] += n

        yield Bar()


@pytest.mark.parametrize("epsilon, calls_per_step", [(1e6, 3), (0.0, 5)])
def test_null_text_stops_early_and_completes_its_progress_bar(p2p_pipe, photo, monkeypatch, epsilon,
                                                              calls_per_step):
    recorder, calls = BarRecorder(), []
    monkeypatch.setattr(p2p_pipe, "progress_bar", recorder)
    handle = p2p_pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        p2p_pipe.invert(photo, SOURCE, "null-text", num_inference_steps=2, num_inner_steps=3,
                        early_stop_epsilon=epsilon)
    finally:
        handle.remove()
    ddim_bar, null_bar = recorder.bars
    assert null_bar == {"total": 6, "n": 6}  # steps x inner steps, filled even when stopping early
    assert len(calls) == 2 + 2 * calls_per_step  # DDIM inversion, then cond + inner + final per step


def test_edit_uses_the_null_embedding_of_each_step(p2p_pipe, photo):
    result = p2p_pipe.invert(photo, SOURCE, "null-text", num_inference_steps=3, num_inner_steps=2)
    seen = []
    handle = p2p_pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"][:2].clone()), with_kwargs=True)
    try:
        p2p_pipe(SOURCE, TARGET, inversion=result, num_inference_steps=3, output_type="latent")
    finally:
        handle.remove()
    assert len(seen) == 3
    for step, context in enumerate(seen):
        assert torch.equal(context, result.uncond_embeds[step].expand(2, -1, -1))
    assert not torch.equal(result.uncond_embeds[0], result.uncond_embeds[2])


def test_inversion_errors(p2p_pipe, photo):
    from diffusers import EulerDiscreteScheduler

    with pytest.raises(ValueError, match="unknown inversion 'edict'"):
        p2p_pipe.invert(photo, SOURCE, "edict", num_inference_steps=2)
    result = p2p_pipe.invert(photo, SOURCE, "negative-prompt", num_inference_steps=2)
    with pytest.raises(ValueError, match="the inversion ran 2 steps"):
        p2p_pipe(SOURCE, TARGET, inversion=result, num_inference_steps=3)
    with pytest.raises(ValueError, match="already fixes the starting latents"):
        p2p_pipe(SOURCE, TARGET, inversion=result, num_inference_steps=2, latents=result.latents)
    nulls = inv.Inversion(result.latents, [result.uncond_embeds] * 2, result.trajectory, "null-text", 2, 7.5)
    with pytest.raises(ValueError, match="tuned for guidance 7.5"):
        p2p_pipe(SOURCE, TARGET, inversion=nulls, num_inference_steps=2, guidance_scale=5.0)
    ddim = p2p_pipe.scheduler
    try:
        p2p_pipe.scheduler = EulerDiscreteScheduler.from_config(ddim.config)
        with pytest.raises(ValueError, match="needs the DDIM scheduler"):
            p2p_pipe.invert(photo, SOURCE, "ddim", num_inference_steps=2)
    finally:
        p2p_pipe.scheduler = ddim


# Direct Inversion (Ju et al., ICLR 2024) and inversion safety


def test_direct_inversion_reconstructs_photo_exactly_for_a_latent_free_model(p2p_pipe, photo, monkeypatch):
    monkeypatch.setattr(p2p_pipe.unet, "forward", fixed_noise_unet)
    result = p2p_pipe.invert(photo, SOURCE, "direct", num_inference_steps=5)
    assert result.method == "direct" and result.uncond_embeds is None and len(result.trajectory) == 6
    out = p2p_pipe(SOURCE, TARGET, inversion=result, num_inference_steps=5, output_type="latent")
    expected = inv.encode_image(p2p_pipe, photo, 32, 32)
    assert (out.images[:1] - expected).abs().max().item() < 1e-5


def test_direct_inversion_reconstructs_better_than_ddim_on_the_tiny_model(p2p_pipe, photo):
    expected = inv.encode_image(p2p_pipe, photo, 32, 32)
    errors = {}
    for method in ("ddim", "direct"):
        result = p2p_pipe.invert(photo, SOURCE, method, num_inference_steps=4)
        out = p2p_pipe(SOURCE, TARGET, inversion=result, num_inference_steps=4, output_type="latent")
        errors[method] = (out.images[:1] - expected).abs().max().item()
    assert errors["ddim"] > 1e-2  # guidance 7.5 takes plain DDIM off the inverted path
    assert errors["direct"] < 1e-5  # the source branch ends on the photo's latent


def test_direct_correction_moves_the_source_row_only(p2p_pipe, photo, monkeypatch):
    result = p2p_pipe.invert(photo, SOURCE, "direct", num_inference_steps=3)
    stepped, seen = [], []
    step = p2p_pipe.scheduler.step

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        stepped.append(out[0].clone())
        return out

    def callback(pipe, i, t, tensors):
        seen.append(tensors["latents"].clone())
        return tensors

    monkeypatch.setattr(p2p_pipe.scheduler, "step", recording_step)
    p2p_pipe(SOURCE, [TARGET, "a red cat on the snow"], inversion=result, num_inference_steps=3,
             output_type="latent", callback_on_step_end=callback)
    assert len(stepped) == len(seen) == 3
    for i, (raw, corrected) in enumerate(zip(stepped, seen)):
        assert torch.equal(corrected[1:], raw[1:])  # the targets are not offset (no local blend here)
        assert torch.allclose(corrected[0], result.trajectory[2 - i][0], atol=1e-6)  # the source is back on z*
        assert not torch.allclose(raw[0], corrected[0], atol=1e-4)  # and it needed the correction


def test_direct_correction_function():
    trajectory = [torch.full((1, 4, 2, 2), float(k)) for k in range(3)]
    result = inv.Inversion(trajectory[-1], None, trajectory, "direct", 2, 7.5)
    latents = torch.randn(3, 4, 2, 2)
    out = inv.direct_correction(latents, result, 0)
    assert torch.allclose(out[0], trajectory[1][0]) and torch.equal(out[1:], latents[1:])
    assert not torch.equal(out, latents)  # the input is left as it was
    assert torch.allclose(inv.direct_correction(latents, result, 1)[0], trajectory[0][0])


def test_inversion_refuses_non_ddim_schedulers_and_eta(p2p_pipe, photo):
    from diffusers import EulerDiscreteScheduler

    result = p2p_pipe.invert(photo, SOURCE, "direct", num_inference_steps=2)
    with pytest.raises(ValueError, match="deterministic DDIM sampling \\(eta 0\\), got eta 0.5"):
        p2p_pipe(SOURCE, TARGET, inversion=result, num_inference_steps=2, eta=0.5)
    with pytest.raises(ValueError, match="got eta 1"):
        inv.check_sampler(p2p_pipe.scheduler, eta=1)
    inv.check_sampler(p2p_pipe.scheduler, eta=0.0)
    ddim = p2p_pipe.scheduler
    try:
        p2p_pipe.scheduler = EulerDiscreteScheduler.from_config(ddim.config)
        for method in ("direct", "null-text"):
            with pytest.raises(ValueError, match="needs the DDIM scheduler, the pipeline has EulerDiscreteScheduler"):
                p2p_pipe.invert(photo, SOURCE, method, num_inference_steps=2)
        with pytest.raises(ValueError, match="needs the DDIM scheduler"):
            p2p_pipe(SOURCE, TARGET, inversion=result, num_inference_steps=2)
    finally:
        p2p_pipe.scheduler = ddim
    p2p_pipe(SOURCE, TARGET, inversion=result, num_inference_steps=2, output_type="latent")  # eta 0 is fine


def test_inversion_runs_in_float32_under_bf16(tiny_model, photo):
    from diffusers import DDIMScheduler
    from imageprompt.pipelines import StableDiffusionPromptToPromptPipeline
    from imageprompt.pipelines.loading import load_pipeline

    model_dir, clip_dir = tiny_model
    base = load_pipeline(str(model_dir), str(clip_dir), device="cpu", dtype="bf16")
    pipe = StableDiffusionPromptToPromptPipeline.from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    assert pipe.unet.dtype == torch.bfloat16
    dtypes = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: dtypes.append((module.dtype, args[0].dtype)))
    try:
        for method in ("direct", "null-text"):
            result = pipe.invert(photo, SOURCE, method, num_inference_steps=2, num_inner_steps=2)
            assert result.latents.dtype == torch.bfloat16 and all(x.dtype == torch.bfloat16 for x in result.trajectory)
            assert all(torch.isfinite(x.float()).all() for x in result.trajectory)
            if method == "null-text":
                assert all(u.dtype == torch.bfloat16 for u in result.uncond_embeds)
    finally:
        handle.remove()
    assert dtypes and set(dtypes) == {(torch.float32, torch.float32)}  # every inversion pass ran in fp32
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16  # restored after
    out = pipe(SOURCE, TARGET, inversion=result, num_inference_steps=2, output_type="latent")
    assert out.images.dtype == torch.bfloat16 and torch.isfinite(out.images.float()).all()


def test_cli_p2p_real_photo_direct_inversion(tiny_model, tmp_path, noise_image):
    from imageprompt.cli.main import main
    from imageprompt.images import read_parameters

    model_dir, clip_dir = tiny_model
    photo = tmp_path / "photo.png"
    noise_image.save(photo)
    out = tmp_path / "out"
    code = main(["p2p", "--source", SOURCE, "--target", "a red cat on the snow", "--image", str(photo),
                 "--invert", "direct", "--steps", "2", "--model", str(model_dir), "--clip", str(clip_dir),
                 "--device", "cpu", "--out", str(out)])
    assert code == 0
    params = read_parameters(out / "photo-edit.png")
    assert params["invert"] == "direct" and params["input"] == "photo.png" and params["inner_steps"] is None
    assert (out / "photo-source.png").exists()


def test_direct_is_a_cli_and_batch_inversion(tmp_path, noise_image):
    from imageprompt.cli.p2p import INVERSIONS
    from imageprompt.jobs import JobDefaults
    from imageprompt.jobs.schema import validate_row

    # dpl: imageprompt.dpl; flow: SD3's flow-ODE inversion (imageprompt.inversion_flow)
    assert "direct" in inv.METHODS and set(INVERSIONS) == {*inv.METHODS, "dpl", "flow"}
    noise_image.save(tmp_path / "photo.png")
    row = {"kind": "p2p", "prompt": SOURCE, "target": TARGET, "image": "photo.png", "invert": "direct"}
    checked = validate_row(1, row, JobDefaults(), tmp_path)
    assert checked.error is None and checked.params["invert"] == "direct"
    wrong = validate_row(2, dict(row, invert="edict"), JobDefaults(), tmp_path)
    assert "must be one of null-text, negative-prompt, ddim, direct" in wrong.error
