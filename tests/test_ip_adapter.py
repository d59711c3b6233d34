"""IP-Adapter in imageprompt's attention layer, checked against diffusers' own IP-Adapter support."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imageprompt.loading import ModelLoadError
from imageprompt.testing import ip_adapter_state_dict

# A tiny "ViT-H": projection_dim (40) and hidden size (48) differ from the UNet's cross_attention_dim (32),
# so a mixed-up dimension cannot go unnoticed.
TINY_ENCODER = dict(hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                    image_size=32, patch_size=8, projection_dim=40)


# ----------------------------------------------------- official-format files
def write_official(state: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        flat = {f"{part}.{k}": v.contiguous() for part in state for k, v in state[part].items()}
        save_file(flat, str(path))
    else:
        torch.save(state, str(path))
    return path


@pytest.fixture(scope="module")
def adapter_repo(tmp_path_factory, tiny_pipe):
    """A local folder laid out like h94/IP-Adapter: models/<weights> and models/image_encoder."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    root = tmp_path_factory.mktemp("ip-repo")
    torch.manual_seed(1)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_ENCODER)).save_pretrained(root / "models" / "image_encoder")
    config = CLIPVisionConfig(**TINY_ENCODER)
    for kind, seed in (("sd15", 0), ("plus", 1), ("full-face", 2)):
        state = ip_adapter_state_dict(tiny_pipe.unet, kind, config, seed)
        write_official(state, root / "models" / f"ip-{kind}.safetensors")
        write_official(state, root / "models" / f"ip-{kind}.bin")
    return root


@pytest.fixture
def pipe(tiny_pipe):
    yield tiny_pipe
    tiny_pipe.unload_ip_adapter()


def diffusers_pipeline(tiny_model, adapter_repo, weight_names: list[str]):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    model_dir, _ = tiny_model
    ref = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.load_ip_adapter(str(adapter_repo), subfolder="models", weight_name=weight_names)
    ref.set_progress_bar_config(disable=True)
    return ref


def two_images():
    rng = np.random.default_rng(3)
    a = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    b = Image.new("RGB", (36, 44), (30, 200, 60))
    return a, b


SAMPLE = dict(num_inference_steps=3, guidance_scale=7.5, height=32, width=32, output_type="np")


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("kind,suffix", [("sd15", "safetensors"), ("plus", "bin"), ("full-face", "safetensors")])
def test_official_checkpoint_matches_diffusers(kind, suffix, tiny_model, adapter_repo, pipe):
    weight = f"ip-{kind}.{suffix}"
    ref = diffusers_pipeline(tiny_model, adapter_repo, [weight])
    image, _ = two_images()
    expected = ref("a red circle", ip_adapter_image=image, generator=torch.Generator().manual_seed(0), **SAMPLE).images

    pipe.load_ip_adapter(str(adapter_repo), subfolder="models", weight_name=weight)
    got = pipe(prompt="a red circle", ip_adapter_image=image, generator=torch.Generator().manual_seed(0),
               **SAMPLE).images
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert kind == pipe.image_adapters[0].kind


def test_two_adapters_per_block_scales_and_masks_match_diffusers(tiny_model, adapter_repo, pipe):
    from diffusers.image_processor import IPAdapterMaskProcessor

    weights = ["ip-sd15.safetensors", "ip-plus.safetensors"]
    a, b = two_images()
    left = Image.fromarray(np.pad(np.full((32, 16), 255, np.uint8), ((0, 0), (0, 16))))
    masks = IPAdapterMaskProcessor().preprocess([left], height=32, width=32)
    masks = [masks.reshape(1, 1, 32, 32), None]
    scale = [{"up": {"block_1": [0.0, 0.7]}}, 0.5]
    kwargs = dict(ip_adapter_image=[a, [a, b]], cross_attention_kwargs={"ip_adapter_masks": masks}, **SAMPLE)

    ref = diffusers_pipeline(tiny_model, adapter_repo, weights)
    ref.set_ip_adapter_scale(scale)
    expected = ref("a cat", generator=torch.Generator().manual_seed(1), **kwargs).images

    pipe.load_ip_adapter(str(adapter_repo), subfolder="models", weight_name=weights)
    pipe.set_ip_adapter_scale(scale)
    from imageprompt.ip_adapter import image_branches

    branches = list(image_branches(pipe.unet).values())
    assert sorted({br.scale[0] for br in branches}) == [0.0, 0.7]  # InstantStyle: only up block 1 layer 1
    got = pipe(prompt="a cat", generator=torch.Generator().manual_seed(1), **kwargs).images
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_scale_zero_is_plain_sampling_and_scale_changes_output(adapter_repo, pipe):
    image, _ = two_images()
    plain = pipe(prompt="a cat", generator=torch.Generator().manual_seed(0), **SAMPLE).images
    pipe.load_ip_adapter(str(adapter_repo), subfolder="models", weight_name="ip-sd15.safetensors")
    outs = {}
    for s in (0.0, 1.0):
        pipe.set_ip_adapter_scale(s)
        outs[s] = pipe(prompt="a cat", ip_adapter_image=image, generator=torch.Generator().manual_seed(0),
                       **SAMPLE).images
    np.testing.assert_array_equal(outs[0.0], plain)
    assert np.abs(outs[1.0] - plain).max() > 1e-3


def test_negative_image_prompt_changes_unconditional_branch(adapter_repo, pipe):
    a, b = two_images()
    pipe.load_ip_adapter(str(adapter_repo / "models" / "ip-plus.safetensors"))
    run = dict(prompt="a cat", ip_adapter_image=a, **SAMPLE)
    base = pipe(generator=torch.Generator().manual_seed(0), **run).images
    neg = pipe(generator=torch.Generator().manual_seed(0), negative_ip_adapter_image=b, **run).images
    # the default negative for plus is a zero image: passing its embeddings explicitly must equal `base`
    pos, zero = pipe.image_adapters[0].encode(pipe, [a], None, "cpu")
    embeds = pipe(generator=torch.Generator().manual_seed(0), prompt="a cat", **SAMPLE,
                  ip_adapter_image_embeds=[torch.cat([zero[None], pos[None]])]).images
    np.testing.assert_allclose(embeds, base, atol=1e-6)
    assert np.abs(neg - base).max() > 1e-3


def test_composes_with_sdipc_prompt_and_editor_hook(adapter_repo, pipe, red_image):
    """The IP-Adapter branch on top of SD-IPC conditioning, with a prompt-to-prompt-style editor on the same layers."""
    from imageprompt.attention import AttentionEditor, editor_attached, imageprompt_processors
    from imageprompt.attention import attend as fused

    a, _ = two_images()
    pipe.load_ip_adapter(str(adapter_repo / "models" / "ip-sd15.safetensors"))
    calls = []

    class SwapEditor(AttentionEditor):
        def edit_attention(self, layer, q, k, v, mask, attend):
            # p2p "replace": the second half of the batch reuses the first half's attention probabilities
            calls.append(layer.name)
            probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
            half = q.shape[0] // 2
            probs = torch.cat([probs[:half], probs[:half]]) if half else probs
            first = max(half, 1)
            assert torch.allclose(probs[:first] @ v[:first], fused(q, k, v)[:first], atol=1e-5)
            return probs @ v

    kw = dict(image=red_image, ip_adapter_image=a, **SAMPLE)
    before = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    cross = [p for p in imageprompt_processors(pipe.unet).values() if p.is_cross_attention]
    with editor_attached(pipe.unet, SwapEditor(), cross):
        edited = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert len(calls) == len(cross) * 3  # every cross-attention layer, every step
    assert all(p.image_branch is not None for p in cross)
    assert np.isfinite(edited).all() and np.abs(edited - before).max() > 1e-4


def test_bin_pickle_with_code_is_refused_without_running(tmp_path):
    from imageprompt.adapter_files import read_checkpoint

    marker = tmp_path / "executed"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "ip-adapter.bin"
    with open(bad, "wb") as f:
        pickle.dump({"image_proj": Exploit(), "ip_adapter": {}}, f, protocol=2)  # torch.save's protocol
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ModelLoadError, match="refused: not a plain"):
        warnings.simplefilter("always")
        read_checkpoint(bad)
    assert not [w for w in caught if "pickle protocol" in str(w.message)]  # the file is refused, quietly
    assert not marker.exists()
    with pytest.raises(ModelLoadError, match=r"must be \.safetensors or \.bin"):
        read_checkpoint(tmp_path / "weights.pt")


def test_size_mismatch_names_expected_and_found(tmp_path, adapter_repo, pipe):
    from transformers import CLIPVisionConfig

    # an SD 1.5 adapter's layer widths against the tiny UNet: cross_attention_dim 768 instead of 32
    state = ip_adapter_state_dict(pipe.unet, "sd15", CLIPVisionConfig(**TINY_ENCODER))
    state["ip_adapter"] = {k: torch.zeros(v.shape[0], 768) for k, v in state["ip_adapter"].items()}
    path = write_official(state, tmp_path / "models" / "other.safetensors")
    with pytest.raises(ModelLoadError, match=r"to_k_ip is 32x768, this UNet expects 32x32"):
        pipe.load_ip_adapter(str(path), image_encoder=str(adapter_repo / "models" / "image_encoder"))
    # image encoder mismatch: a ViT-H adapter (1024) with the tiny encoder (40)
    state = ip_adapter_state_dict(pipe.unet, "sd15", CLIPVisionConfig(**{**TINY_ENCODER, "projection_dim": 1024}))
    path = write_official(state, tmp_path / "models" / "vith.safetensors")
    with pytest.raises(ModelLoadError, match=r"projection_dim\) is 1024 in the checkpoint, expected 40"):
        pipe.load_ip_adapter(str(path), image_encoder=str(adapter_repo / "models" / "image_encoder"))
    assert pipe.image_adapters == []


def test_missing_image_encoder_says_where_it_looked(tmp_path, adapter_repo, pipe):
    lone = tmp_path / "ip-sd15.safetensors"
    lone.write_bytes((adapter_repo / "models" / "ip-sd15.safetensors").read_bytes())
    with pytest.raises(ModelLoadError, match=f"looked in {tmp_path / 'image_encoder'}.*--image-encoder"):
        pipe.load_ip_adapter(str(lone))
    with pytest.raises(ModelLoadError, match="no such IP-Adapter file"):
        pipe.load_ip_adapter(str(tmp_path / "missing.safetensors"))


def test_adapter_image_required_once_loaded(adapter_repo, pipe):
    pipe.load_ip_adapter(str(adapter_repo / "models" / "ip-sd15.bin"))
    with pytest.raises(ValueError, match="pass `ip_adapter_image`"):
        pipe(prompt="a cat", **SAMPLE)
    pipe.unload_ip_adapter()
    with pytest.raises(ValueError, match="call `load_ip_adapter"):
        pipe(prompt="a cat", ip_adapter_image=two_images()[0], **SAMPLE)


# ------------------------------------------------------ training-free branch
def test_sdipc_branch_scale_zero_is_plain_and_matches_layer_math(pipe, red_image):
    from imageprompt.attention import attend
    from imageprompt.sdipc_branch import disable_sdipc_branch, enable_sdipc_branch

    plain = pipe(prompt="a cat", generator=torch.Generator().manual_seed(0), **SAMPLE).images
    enable_sdipc_branch(pipe, scale=0.0)
    zero = pipe(prompt="a cat", ip_adapter_image=red_image, generator=torch.Generator().manual_seed(0),
                **SAMPLE).images
    np.testing.assert_array_equal(zero, plain)
    pipe.set_ip_adapter_scale(0.8)
    on = pipe(prompt="a cat", ip_adapter_image=red_image, generator=torch.Generator().manual_seed(0),
              **SAMPLE).images
    assert np.abs(on - plain).max() > 1e-3

    # the hook is 0.8 * (the layer's own attention over SD-IPC's variation conditioning)
    from imageprompt.attention import imageprompt_processors

    name, proc = next((n, p) for n, p in imageprompt_processors(pipe.unet).items() if p.image_branch is not None)
    attn = pipe.unet.get_submodule(name[: -len(".processor")])
    tokens = pipe.image_prompt_embeds([red_image], None, 0.5, "cpu")  # (1, 77, D)
    q = torch.randn(1, attn.heads, 10, attn.to_k.out_features // attn.heads)
    got = proc.image_branch(proc, attn, q, [tokens[:, None]])
    k = attn.to_k(tokens).view(1, -1, attn.heads, q.shape[-1]).transpose(1, 2)
    v = attn.to_v(tokens).view(1, -1, attn.heads, q.shape[-1]).transpose(1, 2)
    torch.testing.assert_close(got, 0.8 * attend(q, k, v))
    assert not list(proc.image_branch.parameters())  # no weights of its own
    disable_sdipc_branch(pipe)
    assert pipe.image_adapters == []


def test_sdipc_branch_composes_with_ip_adapter(adapter_repo, pipe, red_image):
    from imageprompt.sdipc_branch import enable_sdipc_branch

    a, _ = two_images()
    pipe.load_ip_adapter(str(adapter_repo / "models" / "ip-sd15.safetensors"))
    enable_sdipc_branch(pipe, scale=0.5)
    assert [x.kind for x in pipe.image_adapters] == ["sd15", "sdipc"]
    out = pipe(prompt="a cat", ip_adapter_image=[a, red_image], generator=torch.Generator().manual_seed(0),
               **SAMPLE).images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()
    pipe.load_ip_adapter(str(adapter_repo / "models" / "ip-plus.safetensors"))  # replaces sd15, keeps the branch
    assert [x.kind for x in pipe.image_adapters] == ["plus", "sdipc"]


# ------------------------------------------------------------ command line
def test_cli_vary_and_edit_with_adapters(tiny_model, adapter_repo, tmp_path, red_image):
    from imageprompt.cli.main import main
    from imageprompt.images import read_parameters

    model = ["--model", str(tiny_model[0]), "--clip", str(tiny_model[1]), "--steps", "2", "--height", "32",
             "--width", "32", "--seed", "5"]
    red_image.save(tmp_path / "ref.png")
    two_images()[1].save(tmp_path / "extra.png")
    weights = str(adapter_repo / "models" / "ip-sd15.safetensors")
    assert main(["vary", str(tmp_path / "ref.png"), "--adapter", weights, "--scale", "0.7",
                 "--adapter-image", str(tmp_path / "extra.png"), "--out", str(tmp_path / "v"), *model]) == 0
    params = read_parameters(tmp_path / "v" / "ref-adapter-vary-5.png")
    assert params["method"] == "ip-adapter-variation" and params["adapters"] == [weights]
    assert params["adapter_scales"] == [0.7] and params["adapter_images"] == ["extra.png"]

    style = '{"up": {"block_1": [0.0, 1.0]}}'
    assert main(["edit", str(tmp_path / "ref.png"), "--prompt", "a cat", "--adapter", weights, "--adapter", "sdipc",
                 "--scale", style, "--scale", "0.5", "--out", str(tmp_path / "e"), *model]) == 0
    params = read_parameters(tmp_path / "e" / "ref-adapter-edit-5.png")
    assert params["method"] == "ip-adapter-edit" and params["adapter_scales"] == [json_loads(style), 0.5]


def json_loads(text):
    import json

    return json.loads(text)


def test_cli_adapter_errors_before_sampling(tiny_model, adapter_repo, tmp_path, red_image, capsys):
    from imageprompt.cli.main import main

    red_image.save(tmp_path / "ref.png")
    model = ["--model", str(tiny_model[0]), "--clip", str(tiny_model[1]), "--steps", "2"]
    bad = tmp_path / "evil.bin"
    with open(bad, "wb") as f:
        pickle.dump({"image_proj": print}, f, protocol=2)  # torch.save's protocol: torch reads it without a warning
    cases = [
        (["--adapter", str(bad)], "refused: not a plain tensor archive"),
        (["--scale", "0.5"], "--scale need --adapter"),
        (["--adapter", "sdipc", "--scale", "0.5", "--scale", "1", "--scale", "2"], "3 --scale values for 1"),
        (["--adapter", str(tmp_path / "nope.safetensors")], "no such IP-Adapter file"),
    ]
    for extra, message in cases:
        assert main(["vary", str(tmp_path / "ref.png"), "--out", str(tmp_path / "o"), *model, *extra]) == 1
        assert message in capsys.readouterr().err
    # a checkpoint for another UNet: fails after the model loads, before any image is written
    from transformers import CLIPVisionConfig

    from imageprompt.testing import TINY_UNET, build_components

    other = build_components(tmp_path / "tok")["unet"].__class__(**{**TINY_UNET, "cross_attention_dim": 48})
    path = write_official(ip_adapter_state_dict(other, "sd15", CLIPVisionConfig(**TINY_ENCODER)),
                          adapter_repo / "models" / "other-base.safetensors")
    assert main(["vary", str(tmp_path / "ref.png"), "--out", str(tmp_path / "o"), *model,
                 "--adapter", str(path)]) == 1
    assert "is 32x48, this UNet expects 32x32" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_official_layout_builder(tiny_pipe):
    """Official ids count every attention processor (attn1, attn2, attn1, ...): the cross-attention ones are odd."""
    from transformers import CLIPVisionConfig

    unet = tiny_pipe.unet
    crosses = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    state = ip_adapter_state_dict(unet, "sd15", CLIPVisionConfig(**TINY_ENCODER))
    ids = list(range(1, 2 * len(crosses), 2))
    assert sorted(state["ip_adapter"]) == sorted(f"{i}.to_{kv}_ip.weight" for i in ids for kv in "kv")
    assert state["image_proj"]["proj.weight"].shape == (4 * 32, TINY_ENCODER["projection_dim"])
    first = unet.get_submodule(crosses[0][: -len(".processor")])
    assert state["ip_adapter"]["1.to_k_ip.weight"].shape == first.to_k.weight.shape
    copied = ip_adapter_state_dict(unet, "sd15", image_proj=state["image_proj"], copy_key_values=True)
    assert torch.equal(copied["ip_adapter"]["1.to_v_ip.weight"], first.to_v.weight.detach())
    assert torch.equal(copied["image_proj"]["norm.bias"], state["image_proj"]["norm.bias"])
    again = ip_adapter_state_dict(unet, "plus", CLIPVisionConfig(**TINY_ENCODER), seed=3)["image_proj"]
    assert again["latents"].shape == (1, 16, 64) and again["proj_out.weight"].shape == (32, 64)
    with pytest.raises(ValueError, match="multiple of its heads of 64"):
        ip_adapter_state_dict(unet, "plus", CLIPVisionConfig(**TINY_ENCODER), resampler_dim=96)


def test_per_block_scales_are_diffusers_set_ip_adapter_scale(tiny_model, adapter_repo, pipe):
    """Each layer's scales after set_ip_adapter_scale, read off diffusers' own IP-Adapter processors."""
    from imageprompt.ip_adapter import image_branches

    weights = ["ip-sd15.safetensors", "ip-plus.safetensors"]
    ref = diffusers_pipeline(tiny_model, adapter_repo, weights)
    pipe.load_ip_adapter(str(adapter_repo), subfolder="models", weight_name=weights)
    # the tiny UNet: down block 0 (one attention), mid, up block 1 (two attentions); blocks 1 / 0 have none
    scales = [0.4, {"mid": 1.0}, {"up": 0.5}, {"down": [0.9]}, {"mid": [0.2], "up": {"block_1": [0.6]}},
              {"down": {"block_0": 0.3}, "up": {"block_1": [0.0, 1.0]}},
              [{"up": {"block_1": [0.0, 0.7]}}, 0.5], [{"down": 0.25}, {"mid": 0.75, "up": {"block_1": 0.1}}]]
    for scale in scales:
        # diffusers refuses one config for two adapters (it checks the count before repeating it): give it two
        ref.set_ip_adapter_scale(scale if isinstance(scale, list) else [scale, scale])
        pipe.set_ip_adapter_scale(scale)
        theirs = {name: list(p.scale) for name, p in ref.unet.attn_processors.items()
                  if name.endswith("attn2.processor")}
        ours = {name: list(branch.scale) for name, branch in image_branches(pipe.unet).items()}
        assert ours == theirs, scale
    # the last one, by hand: adapter 0 only in the down block, adapter 1 mid 0.75 and up 0.1, the rest 0
    by_block = {name.split(".transformer_blocks")[0]: values for name, values in ours.items()}
    assert by_block == {"down_blocks.0.attentions.0": [0.25, 0.0], "mid_block.attentions.0": [0.0, 0.75],
                        "up_blocks.1.attentions.0": [0.0, 0.1], "up_blocks.1.attentions.1": [0.0, 0.1]}
    for wrong in ({"up": {"block_1": [1.0, 0.0, 1.0]}}, {"mid": [1.0, 1.0]}):
        with pytest.raises(ValueError):
            ref.set_ip_adapter_scale([wrong, 0.5])
        with pytest.raises(ValueError, match="expected"):
            pipe.set_ip_adapter_scale([wrong, 0.5])
    # a block without attention (diffusers drops it without a word): said, not ignored
    with pytest.raises(ValueError, match="up has no attention block block_0: its attention blocks are block_1"):
        pipe.set_ip_adapter_scale({"up": {"block_0": 1.0}})
    with pytest.raises(ValueError, match="use 'down', 'mid' and 'up'"):
        pipe.set_ip_adapter_scale({"middle": 1.0})
