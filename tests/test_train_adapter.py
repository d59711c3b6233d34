"""Training an IP-Adapter on a tiny synthetic set: the loss falls, files round-trip through both loaders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from imageprompt.cli.main import main

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Four 32x32 images of coloured shapes with .txt captions."""
    folder = tmp_path_factory.mktemp("shapes")
    for i, (name, color) in enumerate(COLORS.items()):
        image = Image.new("RGB", (32, 32), (255, 255, 255))
        box = (4 + 4 * i, 6, 20 + 4 * i, 22)
        (ImageDraw.Draw(image).ellipse if i % 2 else ImageDraw.Draw(image).rectangle)(box, fill=color)
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {name} {'circle' if i % 2 else 'square'}")
    return folder


def fresh_pipe(tiny_model):
    from imageprompt.pipelines.loading import load_pipeline

    pipe = load_pipeline(str(tiny_model[0]), str(tiny_model[1]), device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_read_pairs_folder_and_jsonl(shapes, tmp_path):
    from imageprompt.train_adapter import read_pairs

    pairs = read_pairs(shapes)
    assert [(p.name, c) for p, c in pairs][:2] == [("0.png", "a red square"), ("1.png", "a green circle")]
    manifest = tmp_path / "data.jsonl"
    manifest.write_text("\n".join(json.dumps({"image": str(p), "caption": c}) for p, c in pairs) + "\n")
    assert read_pairs(manifest) == pairs
    manifest.write_text(json.dumps({"image": "missing.png", "caption": "x"}))
    with pytest.raises(FileNotFoundError, match="1 images missing"):
        read_pairs(manifest)


def test_few_steps_lower_the_loss_and_file_round_trips(tiny_model, shapes, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from imageprompt.adapter_files import read_checkpoint
    from imageprompt.train_adapter import ImageCaptionDataset, read_pairs, train, training_loss

    pipe = fresh_pipe(tiny_model)
    pairs = read_pairs(shapes)
    out = tmp_path / "adapter" / "ip-adapter.safetensors"

    def fixed_loss(parts):
        data = ImageCaptionDataset(pairs, 32, parts.tokenizer, parts.feature_extractor)
        batch = torch.utils.data.default_collate([data[i] for i in range(len(data))])
        with torch.no_grad():
            return training_loss(parts, batch, torch.Generator().manual_seed(0),
                                 timesteps=torch.tensor([100, 300, 500, 700]), drop=False).item()

    from imageprompt.train_adapter import build_training_parts

    before = fixed_loss(build_training_parts(pipe))
    result = train(pipe, pairs, out, steps=12, batch_size=4, resolution=32, learning_rate=3e-3,
                   checkpoint_every=5, progress=False)
    after = fixed_loss(build_training_parts(pipe, init=read_checkpoint(out)))
    assert after < 0.97 * before, (before, after)
    assert result["step"] == 12 and len(result["losses"]) == 12
    assert sorted(p.name for p in (tmp_path / "adapter" / "ip-adapter-checkpoints").iterdir()) == ["step-10",
                                                                                                    "step-5"]

    # official layout: flattened keys, odd layer ids, and to_k_ip moved away from its to_k initialisation
    state = read_checkpoint(out)
    assert set(state["image_proj"]) == {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}
    from imageprompt.attention import cross_attention_layers

    ids = sorted(int(i) for i in cross_attention_layers(pipe.unet).values())
    assert ids == list(range(1, 2 * len(ids), 2))
    assert sorted(k for k in state["ip_adapter"]) == sorted(f"{i}.to_{x}_ip.weight" for i in ids for x in "kv")
    pipe.sdipc_image_encoder.save_pretrained(out.parent / "image_encoder")

    sample = dict(num_inference_steps=2, guidance_scale=7.5, height=32, width=32, output_type="np")
    reference = Image.open(pairs[0][0])
    fresh = fresh_pipe(tiny_model)
    fresh.load_ip_adapter(str(out))
    ours = fresh(prompt="a cat", ip_adapter_image=reference, generator=torch.Generator().manual_seed(0),
                 **sample).images
    ref = StableDiffusionPipeline.from_pretrained(tiny_model[0], safety_checker=None, requires_safety_checker=False)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.load_ip_adapter(str(out.parent), subfolder="", weight_name=out.name)
    ref.set_progress_bar_config(disable=True)
    theirs = ref("a cat", ip_adapter_image=reference, generator=torch.Generator().manual_seed(0), **sample).images
    np.testing.assert_allclose(ours, theirs, atol=2e-5)


def test_cli_train_checkpoint_resume_bin(tiny_model, shapes, tmp_path, capsys):
    from imageprompt.adapter_files import read_checkpoint

    out = tmp_path / "run" / "adapter.bin"
    common = [str(shapes), "--out", str(out), "--model", str(tiny_model[0]), "--clip", str(tiny_model[1]),
              "--resolution", "32", "--batch-size", "2", "--checkpoint-every", "2"]
    assert main(["train-adapter", *common, "--steps", "3"]) == 0
    assert (out.parent / "image_encoder" / "config.json").exists()
    assert (out.parent / "adapter-checkpoints" / "step-2" / "optimizer.pt").exists()
    first = read_checkpoint(out)
    assert main(["train-adapter", *common, "--steps", "4", "--resume", "latest"]) == 0
    err = capsys.readouterr()
    assert "resuming from" in err.out + err.err
    second = read_checkpoint(out)
    assert not torch.equal(first["image_proj"]["proj.weight"], second["image_proj"]["proj.weight"])
    # the .bin and its image encoder load as they are
    fresh_pipe(tiny_model).load_ip_adapter(str(out))


def test_cli_train_bad_input_fails_before_loading(shapes, tmp_path, capsys):
    assert main(["train-adapter", str(shapes), "--out", str(tmp_path / "x.pt")]) == 1
    assert "must end in .safetensors or .bin" in capsys.readouterr().err
    assert main(["train-adapter", str(tmp_path / "none"), "--out", str(tmp_path / "x.bin")]) == 1
    assert "not a folder of images nor a .jsonl" in capsys.readouterr().err
    assert main(["train-adapter", str(shapes), "--out", str(tmp_path / "x.bin"), "--resume", "latest"]) == 1
    assert "no checkpoints" in capsys.readouterr().err
    assert not list(tmp_path.glob("x*"))
