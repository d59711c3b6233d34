"""SD-IPC tuning: visual prompts in the vision tower, LoRA, the tuning file, resume, and the command line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imageprompt import tuning
from imageprompt.tuning import TuningConfig, TuningFileError

SMALL = dict(num_tokens=4, batch_size=2)


@pytest.fixture(scope="module")
def pipe(tiny_model):
    """A pipeline of our own: tuning adds hooks and LoRA layers, which other tests' shared pipeline must not see."""
    from imageprompt.pipelines.loading import load_pipeline

    model_dir, clip_dir = tiny_model
    pipe = load_pipeline(str(model_dir), str(clip_dir), device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    tuning.remove_tuning(pipe)


@pytest.fixture
def clean(pipe):
    tuning.remove_tuning(pipe)
    yield pipe
    tuning.remove_tuning(pipe)


@pytest.fixture
def images(red_image, noise_image):
    return [red_image, noise_image, Image.new("RGB", (40, 40), (30, 60, 220))]


def fresh_prompts(pipe, tokens=4, seed=0):
    torch.manual_seed(seed)
    prompts = tuning.DeepVisualPrompts.for_encoder(pipe.sdipc_image_encoder, tokens)
    return tuning.attach_visual_prompts(pipe.sdipc_image_encoder, prompts.eval())


def variation(pipe, image, seed=0):
    return pipe(image=image, num_inference_steps=2, generator=torch.Generator().manual_seed(seed),
                output_type="np").images


# ------------------------------------------------------------ the encoder
def test_prompts_enter_every_layer_and_keep_the_encoder_interface(clean, red_image):
    pipe = clean
    pixels = tuning.clip_pixel_values(pipe, [red_image])
    plain = pipe.encode_images([red_image], "cpu")
    assert torch.equal(pipe.sdipc_image_encoder(pixels).image_embeds, plain)  # same preprocessing as the pipeline

    prompts = fresh_prompts(pipe)
    seen, layers = [], pipe.sdipc_image_encoder.vision_model.encoder.layers
    handles = [layer.register_forward_pre_hook(  # runs after the prompt hook: sees what layer i gets
        lambda m, a, k, i=i: seen.append((i, a[0] if a else k["hidden_states"])), with_kwargs=True)
        for i, layer in enumerate(layers)]
    out = pipe.sdipc_image_encoder(pixels)
    for handle in handles:
        handle.remove()
    patches = (pipe.sdipc_image_encoder.config.image_size // pipe.sdipc_image_encoder.config.patch_size) ** 2
    assert out.image_embeds.shape == plain.shape
    assert out.last_hidden_state.shape[1] == 1 + 4 + patches
    assert not torch.allclose(out.image_embeds, plain)
    assert [i for i, _ in seen] == list(range(len(layers)))
    for i, hidden in seen:  # layer i reads its own tokens right after CLS
        assert torch.allclose(hidden[:, 1:5], prompts.tokens(i, 1, hidden))

    tuning.remove_tuning(pipe)
    assert torch.equal(pipe.sdipc_image_encoder(pixels).image_embeds, plain)
    assert not hasattr(pipe.sdipc_image_encoder, tuning.PROMPTS_ATTR)


# ----------------------------------------------------------- the loss
def test_online_tuning_lowers_the_loss_on_its_image(clean, red_image):
    pipe = clean
    data = tuning.prepare_images(pipe, [red_image])
    prompts = fresh_prompts(pipe)
    start = prompts.prompts.detach().clone()
    before = tuning.evaluation_loss(pipe, data)
    out = tuning.tune_online(pipe, data, TuningConfig.online(steps=6, lr=5e-2, **SMALL), progress=False)
    after = tuning.evaluation_loss(pipe, data)
    assert tuning.visual_prompts_of(pipe) is prompts  # continued from the attached prompts
    assert not torch.equal(prompts.prompts, start)
    assert len(out.losses) == 6 and all(np.isfinite(out.losses))
    assert after < before


def test_domain_tuning_with_lora_lowers_the_loss_on_its_images(clean, images):
    pipe = clean
    data = tuning.prepare_images(pipe, images)
    fresh_prompts(pipe)
    tuning.add_unet_lora(pipe.unet, rank=2)  # LoRA starts as the identity (B = 0)
    before = tuning.evaluation_loss(pipe, data)
    config = TuningConfig.domain(steps=6, lr=5e-2, lora_rank=2, lora_lr=1e-2, **SMALL)
    tuning.tune_domain(pipe, data, config, progress=False)
    after = tuning.evaluation_loss(pipe, data)
    lora = tuning.lora_parameters(pipe.unet)
    assert lora and any(k.endswith("lora_B.imageprompt_sdipc.weight") and v.abs().sum() > 0 for k, v in lora.items())
    assert all(".attn2.to_k." in k or ".attn2.to_v." in k for k in lora)
    assert not any(p.requires_grad for n, p in pipe.unet.named_parameters() if "lora_" not in n)
    assert after < before


def test_config_is_checked():
    with pytest.raises(ValueError, match="steps"):
        TuningConfig(steps=0).check()
    with pytest.raises(ValueError, match="mixed_precision"):
        TuningConfig(mixed_precision="fp8").check()


# ------------------------------------------------------------- the file
def test_saved_file_loads_and_gives_identical_images(clean, red_image, tmp_path):
    pipe = clean
    untuned = variation(pipe, red_image)
    tuning.tune_online(pipe, [red_image], TuningConfig.online(steps=2, lr=5e-2, lora_rank=2, lora_lr=1e-2,
                                                                **SMALL), progress=False)
    tuned = variation(pipe, red_image)
    path = tuning.save_tuning(pipe, tmp_path / "ref.safetensors")
    assert not np.array_equal(tuned, untuned)

    tuning.remove_tuning(pipe)
    np.testing.assert_array_equal(variation(pipe, red_image), untuned)
    settings = tuning.load_tuning(pipe, path)
    np.testing.assert_array_equal(variation(pipe, red_image), tuned)
    assert settings["mode"] == "online" and settings["steps"] == 2 and settings["lora"] == {"rank": 2, "alpha": 2}

    meta = tuning.read_tuning_metadata(path)
    assert meta["format"] == tuning.FORMAT
    assert meta["clip"]["vision_config"]["hidden_size"] == pipe.sdipc_image_encoder.config.hidden_size
    assert "visual_prompts.prompts" in meta["keys"] and any(k.startswith("unet_lora.") for k in meta["keys"])


def test_file_for_another_clip_is_refused(clean, red_image, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    pipe = clean
    tuning.tune_online(pipe, [red_image], TuningConfig.online(steps=1, **SMALL), progress=False)
    path = tuning.save_tuning(pipe, tmp_path / "ref.safetensors")
    tuning.remove_tuning(pipe)
    own = pipe.sdipc_image_encoder
    try:
        torch.manual_seed(123)  # same architecture, other weights
        pipe.sdipc_image_encoder = CLIPVisionModelWithProjection(own.config).eval()
        with pytest.raises(TuningFileError, match="another CLIP.*visual_projection differs"):
            tuning.load_tuning(pipe, path)
        assert tuning.visual_prompts_of(pipe) is None  # refused before changing anything
        wider = CLIPVisionConfig(**{**own.config.to_dict(), "hidden_size": 64})
        pipe.sdipc_image_encoder = CLIPVisionModelWithProjection(wider).eval()
        with pytest.raises(TuningFileError, match="hidden_size: 48 in file, 64 here"):
            tuning.load_tuning(pipe, path)
    finally:
        pipe.sdipc_image_encoder = own
    tuning.load_tuning(pipe, path)  # its own CLIP takes it


def test_clip_identity_survives_half_precision_but_not_other_weights():
    torch.manual_seed(0)
    weight = torch.randn(48, 64) * 0.02
    weight[0, :8] = 1e-6  # values fp16 cannot hold exactly
    print_ = tuning.weight_fingerprint(weight)
    assert tuning.same_weight(tuning.weight_fingerprint(weight.half()), print_)
    assert tuning.same_weight(tuning.weight_fingerprint(weight.bfloat16()), print_)
    assert not tuning.same_weight(tuning.weight_fingerprint(torch.randn(48, 64) * 0.02), print_)
    assert not tuning.same_weight(tuning.weight_fingerprint(weight * 1.05), print_)


def test_files_that_are_not_tunings_are_refused(tmp_path, red_image):
    from safetensors.torch import save_file

    png = tmp_path / "x.png"
    red_image.save(png)
    with pytest.raises(TuningFileError, match="not a safetensors file"):
        tuning.read_tuning_metadata(png)
    save_file({"w": torch.zeros(2)}, tmp_path / "lora.safetensors")
    with pytest.raises(TuningFileError, match="not an imageprompt SD-IPC tuning file"):
        tuning.read_tuning_metadata(tmp_path / "lora.safetensors")
    with pytest.raises(TuningFileError, match="no such tuning file"):
        tuning.read_tuning_metadata(tmp_path / "missing.safetensors")


def test_resume_replays_the_same_run(clean, images, tmp_path):
    pipe = clean
    data = tuning.prepare_images(pipe, images[:2])
    config = TuningConfig.domain(steps=4, lr=5e-2, seed=7, **SMALL)
    ckpt = tmp_path / "run.checkpoint.safetensors"
    full = tuning.tune(pipe, data, config, progress=False, checkpoint=ckpt, checkpoint_every=2, data_id="d")
    final = {k: v.clone() for k, v in tuning.visual_prompts_of(pipe).state_dict().items()}
    assert ckpt.exists()

    tuning.remove_tuning(pipe)
    resumed = tuning.tune(pipe, data, config, progress=False, checkpoint=ckpt, checkpoint_every=2, resume=True,
                          data_id="d")
    assert resumed.start_step == 2 and resumed.losses == full.losses[2:]
    for k, v in tuning.visual_prompts_of(pipe).state_dict().items():
        torch.testing.assert_close(v, final[k], rtol=0, atol=1e-6)

    tuning.remove_tuning(pipe)
    with pytest.raises(TuningFileError, match="differs in lr"):
        tuning.tune(pipe, data, TuningConfig.domain(steps=4, lr=1e-2, seed=7, **SMALL), progress=False,
                    checkpoint=ckpt, resume=True, data_id="d")
    tuning.remove_tuning(pipe)
    with pytest.raises(TuningFileError, match="differs in data"):
        tuning.tune(pipe, data, config, progress=False, checkpoint=ckpt, resume=True, data_id="other")


# -------------------------------------------------------- command line
def run_cli(*argv):
    from imageprompt.cli.main import main

    return main([str(a) for a in argv])


def model_args(tiny_model):
    return ["--model", tiny_model[0], "--clip", tiny_model[1], "--device", "cpu"]


def test_cli_tune_online_then_vary_tuned(tiny_model, red_image, tmp_path):
    from imageprompt.images import read_parameters

    red_image.save(tmp_path / "red.png")
    out = tmp_path / "red.safetensors"
    assert run_cli("tune", "online", tmp_path / "red.png", "--out", out, "--steps", 2, "--tokens", 4,
                   "--batch-size", 1, *model_args(tiny_model)) == 0
    assert tuning.read_tuning_metadata(out)["settings"]["data"] == ["red.png"]
    assert run_cli("vary", tmp_path / "red.png", "--tuned", out, "--out", tmp_path / "o", "--steps", 2,
                   "--seed", 3, *model_args(tiny_model)) == 0
    params = read_parameters(tmp_path / "o" / "red-vary-tuned-3.png")  # the name says it was tuned
    assert params["tuned"]["file"] == "red.safetensors" and params["tuned"]["num_tokens"] == 4


def test_cli_vary_online_steps(tiny_model, red_image, tmp_path):
    from imageprompt.images import read_parameters

    red_image.save(tmp_path / "red.png")
    assert run_cli("vary", tmp_path / "red.png", "--online-steps", 2, "--out", tmp_path / "o", "--steps", 2,
                   "--seed", 5, *model_args(tiny_model)) == 0
    params = read_parameters(tmp_path / "o" / "red-vary-tuned-5.png")
    assert params["online_tuning"]["steps"] == 2 and params["online_tuning"]["seed"] == 5


def test_cli_tune_domain_from_jsonl(tiny_model, images, tmp_path, capsys):
    for i, im in enumerate(images[:2]):
        im.save(tmp_path / f"{i}.png")
    (tmp_path / "data.jsonl").write_text('{"image": "0.png"}\n\n"1.png"\n')
    out = tmp_path / "dom.safetensors"
    assert run_cli("tune", "domain", tmp_path / "data.jsonl", "--out", out, "--steps", 2, "--tokens", 4,
                   "--batch-size", 2, "--checkpoint-every", 1, "--resume", *model_args(tiny_model)) == 0
    meta = tuning.read_tuning_metadata(out)
    assert meta["settings"]["images"] == 2 and meta["settings"]["mode"] == "domain"
    assert not (tmp_path / "dom.checkpoint.safetensors").exists()  # removed once the file is written
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["vary", "{img}", "--tuned", "{img}", "--out", "{tmp}/o"], "not a safetensors file"),
    (["tune", "domain", "{tmp}/none", "--out", "{tmp}/x.safetensors"], "no such folder or file"),
    (["tune", "domain", "{tmp}/bad.jsonl", "--out", "{tmp}/x.safetensors"], "bad.jsonl:2: not JSON"),
    (["tune", "online", "{img}", "--out", "{tmp}/x.bin"], "must end in .safetensors"),
    (["tune", "online", "{tmp}/none.png", "--out", "{tmp}/x.safetensors"], "no such file"),
])
def test_cli_rejects_bad_input_before_loading(argv, message, red_image, tmp_path, capsys, monkeypatch):
    import imageprompt.cli.main

    red_image.save(tmp_path / "red.png")
    (tmp_path / "bad.jsonl").write_text('{"image": "red.png"}\n{oops\n')
    import imageprompt.cli.tune

    for module in (imageprompt.cli.main, imageprompt.cli.tune):
        monkeypatch.setattr(module, "load_pipeline_from_args", lambda args: pytest.fail("model loaded"))
    argv = [a.format(img=tmp_path / "red.png", tmp=tmp_path) for a in argv]
    assert run_cli(*argv, "--model", tmp_path / "none") == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "x.safetensors").exists()


def test_fidelity_measure_runs_on_the_tiny_model(clean):
    from imageprompt.bench.tune import OnlineTuned, subject_fidelity
    from imageprompt.world.evaluate import EvalSettings

    settings = EvalSettings(samples=2, images_per_sample=1, steps=2)
    rows = subject_fidelity(clean, settings, online_steps=1, domain_images=2, domain_steps=1,
                            measurements=("SD-IPC variation",))
    names = {r.measurement for r in rows}
    assert names == {"SD-IPC variation [untuned]", "SD-IPC variation [domain-tuned 2 images, 1 steps]",
                     "SD-IPC variation [online-tuned 1 iterations]"}
    assert all(0.0 <= r.value <= 1.0 and r.n == 2 for r in rows)
    assert tuning.visual_prompts_of(clean) is None  # every condition cleans up

    # online tuning per reference keeps each generator with its image
    red, blue = Image.new("RGB", (32, 32), (220, 30, 30)), Image.new("RGB", (32, 32), (30, 30, 220))
    wrapped = OnlineTuned(clean, TuningConfig.online(steps=1, **SMALL))
    both = wrapped(image=[red, blue], num_inference_steps=2, output_type="np",
                   generator=[torch.Generator().manual_seed(s) for s in (1, 2)]).images
    alone = wrapped(image=blue, num_inference_steps=2, output_type="np", generator=[torch.Generator().manual_seed(2)])
    np.testing.assert_array_equal(both[1], alone.images[0])


def test_bench_row_is_registered():
    from imageprompt.bench.main import all_rows

    assert "sdipc online tuning, 30 iterations (s total)" in all_rows()
    assert tuning.describe({"mode": "online", "steps": 30, "other": 1}) == {
        "mode": "online", "steps": 30, "lr": None, "batch_size": None, "num_tokens": None, "seed": None,
        "final_loss": None, "lora": None}
