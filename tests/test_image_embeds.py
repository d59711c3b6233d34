"""Image-embedding arithmetic, InstantStyle's content subtraction, and embedding files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_ip_adapter import TINY_ENCODER, two_images

from imageprompt.image_embeds import combine_embeds, load_image_embeds, subtract_content
from imageprompt.testing import ip_adapter_state_dict

SAMPLE = dict(num_inference_steps=3, guidance_scale=7.5, height=32, width=32, output_type="np")


@pytest.fixture
def pipe(tiny_pipe):
    yield tiny_pipe
    tiny_pipe.unload_ip_adapter()


def load_own_clip_adapter(pipe, kind="sd15"):
    """An adapter whose image encoder is the pipeline's own CLIP (as for the bundled adapter)."""
    state = ip_adapter_state_dict(pipe.unet, kind, pipe.sdipc_image_encoder.config)
    pipe.load_ip_adapter(state, image_encoder=pipe.sdipc_image_encoder)


def sample(pipe, **kwargs):
    return pipe(prompt="a cat", generator=torch.Generator().manual_seed(0), **SAMPLE, **kwargs).images


# ------------------------------------------------------------------ pure arithmetic
def test_combine_modes_by_hand():
    a, b, c = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 2.0]), torch.tensor([1.0, -1.0])
    e = torch.stack([a, b, c])
    assert torch.equal(combine_embeds(e, "concat"), e)
    torch.testing.assert_close(combine_embeds(e, "add"), torch.tensor([[4.0, 5.0]]))
    torch.testing.assert_close(combine_embeds(e, "average"), torch.tensor([[4 / 3, 5 / 3]]))
    torch.testing.assert_close(combine_embeds(e, "subtract"), torch.tensor([[3.0 - 0.5, 4.0 - 0.5]]))
    # norm-average of a and b: unit vectors (0.6, 0.8) and (0, 1), mean (0.3, 0.9), rescaled to the mean norm 3.5
    mean = torch.tensor([0.3, 0.9])
    torch.testing.assert_close(combine_embeds(e[:2], "norm-average"), (mean / mean.norm() * 3.5)[None])


def test_average_of_one_image_is_that_image_in_any_shape():
    e = torch.randn(1, 257, 48, generator=torch.Generator().manual_seed(0))  # plus-style hidden states of one image
    for mode in ("average", "add", "norm-average"):
        torch.testing.assert_close(combine_embeds(e, mode), e)  # norm-average: x / |x| * |x|, rounding only
    assert torch.equal(combine_embeds(e, "average"), e)
    twice = torch.cat([e, e])
    assert torch.equal(combine_embeds(twice, "average"), e)  # (x + x) / 2 == x exactly
    assert torch.equal(combine_embeds(twice, "subtract"), torch.zeros_like(e))


def test_arithmetic_errors():
    with pytest.raises(ValueError, match="combine mode must be one of concat, add, subtract, average, norm-average"):
        combine_embeds(torch.zeros(2, 4), "median")
    with pytest.raises(ValueError, match="'subtract' needs at least two images"):
        combine_embeds(torch.zeros(1, 4), "subtract")
    with pytest.raises(ValueError, match="at least one image"):
        combine_embeds(torch.zeros(4), "average")
    with pytest.raises(ValueError, match="not in CLIP's joint image-text space"):
        subtract_content(torch.zeros(1, 257, 48), torch.zeros(1, 48))
    with pytest.raises(ValueError, match="use the text tower of the adapter's own CLIP"):
        subtract_content(torch.zeros(1, 40), torch.zeros(1, 32))


# -------------------------------------------------------------- on a pipeline
def test_average_of_one_image_samples_as_that_image(pipe):
    load_own_clip_adapter(pipe)
    image, _ = two_images()
    direct = sample(pipe, ip_adapter_image=image)
    averaged = pipe.encode_ip_adapter_image(image, combine="average")
    assert averaged[0].shape == (2, 1, pipe.sdipc_image_encoder.config.projection_dim)
    np.testing.assert_array_equal(sample(pipe, ip_adapter_image_embeds=averaged), direct)
    # concat of several images keeps every image: (2, n, D)
    assert pipe.encode_ip_adapter_image([image, image])[0].shape[1] == 2


def test_subtracting_an_image_from_itself_is_the_zero_embedding(pipe):
    """sd15-format adapters read zeros as "no image" (their unconditional input and the image drop of training):
    the image minus itself gives zeros in both guidance branches, the same whatever the image."""
    load_own_clip_adapter(pipe)
    a, b = two_images()
    embeds = pipe.encode_ip_adapter_image([a, a], combine="subtract")[0]
    assert torch.equal(embeds[1], torch.zeros_like(embeds[1])) and torch.equal(embeds[0], embeds[1])
    from_a = sample(pipe, ip_adapter_image_embeds=[embeds])
    from_b = sample(pipe, ip_adapter_image_embeds=pipe.encode_ip_adapter_image([b, b], combine="subtract"))
    zeros = sample(pipe, ip_adapter_image_embeds=[torch.zeros(2, 1, pipe.sdipc_image_encoder.config.projection_dim)])
    np.testing.assert_array_equal(from_a, from_b)
    np.testing.assert_array_equal(from_a, zeros)
    assert np.abs(sample(pipe, ip_adapter_image=a) - from_a).max() > 1e-3  # the image itself does act


def test_content_subtraction_uses_clips_projected_text_embedding(pipe, tiny_model):
    from transformers import CLIPModel, CLIPTokenizer

    load_own_clip_adapter(pipe)
    image, _ = two_images()
    plain = pipe.encode_ip_adapter_image(image)[0]
    styled = pipe.encode_ip_adapter_image(image, content_text="a red circle", content_scale=0.5)[0]
    # the reference: CLIP's text_embeds (text_projection of the pooled EOS state), written out here
    clip = CLIPModel.from_pretrained(tiny_model[1]).eval()
    tok = CLIPTokenizer.from_pretrained(tiny_model[1])
    ids = tok(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = clip.text_model(ids).last_hidden_state
        eos = (ids == tok.eos_token_id).int().argmax(1)
        text = clip.text_projection(hidden[torch.arange(1), eos])
    torch.testing.assert_close(styled[1], plain[1] - 0.5 * text, atol=1e-5, rtol=0)
    assert torch.equal(styled[0], plain[0])  # the negative stays the zero embedding
    # an explicit text tower gives the same
    again = pipe.encode_ip_adapter_image(image, content_text="a red circle", content_scale=0.5, text_encoder=clip,
                                         tokenizer=tok)[0]
    torch.testing.assert_close(again, styled, atol=1e-6, rtol=0)


def test_content_subtraction_errors(pipe):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    image, _ = two_images()
    torch.manual_seed(1)
    other = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_ENCODER)).eval()
    pipe.load_ip_adapter(ip_adapter_state_dict(pipe.unet, "sd15", other.config), image_encoder=other)
    with pytest.raises(ValueError, match="text tower of the adapter's own CLIP.*text_encoder="):
        pipe.encode_ip_adapter_image(image, content_text="a cat")
    pipe.load_ip_adapter(ip_adapter_state_dict(pipe.unet, "plus", other.config), image_encoder=other)
    with pytest.raises(ValueError, match="sd15-format adapter.*'plus'"):
        pipe.encode_ip_adapter_image(image, content_text="a cat")
    with pytest.raises(ValueError, match="combine mode must be one of"):
        pipe.encode_ip_adapter_image(image, combine="median")
    with pytest.raises(ValueError, match="non-empty string"):
        pipe.encode_ip_adapter_image(image, content_text=" ")
    with pytest.raises(ValueError, match="`combine` has 2 entries for 1 loaded adapters"):
        pipe.encode_ip_adapter_image(image, combine=["average", "add"])
    with pytest.raises(ValueError, match="'subtract' needs at least two images"):
        pipe.encode_ip_adapter_image(image, combine="subtract")


# ------------------------------------------------------------------- files
def test_save_load_round_trip_and_reuse(pipe, tmp_path):
    load_own_clip_adapter(pipe)
    a, b = two_images()
    embeds = pipe.encode_ip_adapter_image([a, b], combine="norm-average")
    path = pipe.save_ip_adapter_image_embeds(tmp_path / "style.safetensors", embeds, extra={"combine": "norm-average"})
    raw, metadata = load_image_embeds(path)
    assert torch.equal(raw[0], embeds[0])
    assert metadata["adapters"][0]["kind"] == "sd15" and metadata["guidance"] is True
    assert metadata["extra"] == {"combine": "norm-average"}
    loaded = pipe.load_ip_adapter_image_embeds(path)
    np.testing.assert_array_equal(sample(pipe, ip_adapter_image_embeds=loaded),
                                  sample(pipe, ip_adapter_image_embeds=embeds))
    no_cfg = pipe.load_ip_adapter_image_embeds(path, do_classifier_free_guidance=False)
    assert torch.equal(no_cfg[0], embeds[0][1:])


def test_embeddings_file_errors(pipe, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    load_own_clip_adapter(pipe)
    image, _ = two_images()
    embeds = pipe.encode_ip_adapter_image(image)
    with pytest.raises(ValueError, match=r"saved as \.safetensors"):
        pipe.save_ip_adapter_image_embeds(tmp_path / "e.pt", embeds)
    with pytest.raises(ValueError, match=r"must have 1 row\(s\)"):
        pipe.save_ip_adapter_image_embeds(tmp_path / "e.safetensors", embeds, do_classifier_free_guidance=False)
    path = pipe.save_ip_adapter_image_embeds(tmp_path / "e.safetensors", embeds)
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_image_embeds(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="no such image-embeddings file"):
        load_image_embeds(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an imageprompt image-embeddings file"):
        load_image_embeds(tmp_path / "other.safetensors")
    # another image encoder made them: refused
    torch.manual_seed(1)
    other = CLIPVisionModelWithProjection(CLIPVisionConfig(**{**TINY_ENCODER, "projection_dim": 32})).eval()
    pipe.load_ip_adapter(ip_adapter_state_dict(pipe.unet, "sd15", other.config), image_encoder=other)
    with pytest.raises(ValueError, match="adapter 0 was made with another image encoder.*visual_projection differs"):
        pipe.load_ip_adapter_image_embeds(path)
    pipe.load_ip_adapter(ip_adapter_state_dict(pipe.unet, "plus", other.config), image_encoder=other)
    with pytest.raises(ValueError, match="was made with kind 'sd15'"):
        pipe.load_ip_adapter_image_embeds(path)


# ------------------------------------------------------------ command line
def write_own_clip_adapter(pipe, folder):
    """An sd15-format adapter file whose image_encoder/ is the pipeline's own CLIP vision tower."""
    from test_ip_adapter import write_official

    state = ip_adapter_state_dict(pipe.unet, "sd15", pipe.sdipc_image_encoder.config, seed=4)
    path = write_official(state, folder / "adapter.safetensors")
    pipe.sdipc_image_encoder.save_pretrained(folder / "image_encoder")
    pipe.feature_extractor.save_pretrained(folder / "image_encoder")
    return path


@pytest.fixture
def own_clip_adapter_file(tiny_pipe, tmp_path):
    return write_own_clip_adapter(tiny_pipe, tmp_path / "adapter")


def test_cli_combine_subtract_window_save_and_reuse(tiny_model, own_clip_adapter_file, tmp_path, red_image):
    from PIL import Image

    from imageprompt.cli.main import main
    from imageprompt.images import read_parameters

    red_image.save(tmp_path / "ref.png")
    two_images()[0].save(tmp_path / "extra.png")
    common = ["--model", str(tiny_model[0]), "--clip", str(tiny_model[1]), "--steps", "3", "--height", "32",
              "--width", "32", "--seed", "5", "--adapter", str(own_clip_adapter_file),
              "--adapter-window", "0.3-1"]
    saved = tmp_path / "embeds.safetensors"
    assert main(["vary", str(tmp_path / "ref.png"), "--adapter-image", str(tmp_path / "extra.png"),
                 "--adapter-combine", "norm-average", "--adapter-subtract-text", "a red circle",
                 "--adapter-subtract-scale", "0.5", "--save-embeds", str(saved), "--out", str(tmp_path / "a"),
                 *common]) == 0
    params = read_parameters(tmp_path / "a" / "ref-adapter-vary-5.png")
    assert params["adapter_windows"] == [[0.3, 1.0]] and params["adapter_combine"] == "norm-average"
    assert params["adapter_subtract_text"] == "a red circle" and params["adapter_subtract_scale"] == 0.5
    embeds, metadata = load_image_embeds(saved)
    assert embeds[0].shape[:2] == (2, 1) and metadata["extra"]["combine"] == "norm-average"
    assert main(["vary", str(tmp_path / "ref.png"), "--embeds", str(saved), "--out", str(tmp_path / "b"),
                 *common]) == 0  # the saved embeddings give the same picture
    first = np.asarray(Image.open(tmp_path / "a" / "ref-adapter-vary-5.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "b" / "ref-adapter-vary-5.png")), first)
    assert read_parameters(tmp_path / "b" / "ref-adapter-vary-5.png")["adapter_embeds"] == "embeds.safetensors"
    # the text tower named explicitly (a CLIPModel folder): the same content subtraction, the same picture
    assert main(["vary", str(tmp_path / "ref.png"), "--adapter-image", str(tmp_path / "extra.png"),
                 "--adapter-combine", "norm-average", "--adapter-subtract-text", "a red circle",
                 "--adapter-subtract-scale", "0.5", "--adapter-text-encoder", str(tiny_model[1]),
                 "--out", str(tmp_path / "t"), *common]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "t" / "ref-adapter-vary-5.png")), first)
    # prompt-to-prompt reads the same file for its adapter
    assert main(["p2p", "--source", "a red circle", "--target", "a blue circle", "--embeds", str(saved),
                 "--out", str(tmp_path / "c"), *common]) == 0
    assert (tmp_path / "c" / "p2p-edit-5.png").is_file()


def test_cli_embedding_option_errors(tiny_model, own_clip_adapter_file, tmp_path, red_image, capsys):
    from imageprompt.cli.main import main

    red_image.save(tmp_path / "ref.png")
    base = ["vary", str(tmp_path / "ref.png"), "--out", str(tmp_path / "o"), "--model", str(tiny_model[0]),
            "--clip", str(tiny_model[1])]
    adapter = ["--adapter", str(own_clip_adapter_file)]
    cases = [
        (["--adapter-combine", "average"], "--adapter-combine need --adapter"),
        ([*adapter, "--adapter-combine", "median"], "--adapter-combine must be one of concat, add"),
        ([*adapter, "--embeds", str(tmp_path / "none.safetensors")], "no such image-embeddings file"),
        ([*adapter, "--embeds", str(own_clip_adapter_file)], "not an imageprompt image-embeddings file"),
        ([*adapter, "--embeds", "x.safetensors", "--adapter-image", str(tmp_path / "ref.png")],
         "--embeds replaces the image prompts; leave out --adapter-image"),
        ([*adapter, "--save-embeds", "e.pt"], "must end in .safetensors"),
        ([*adapter, "--adapter-subtract-text", " "], "--adapter-subtract-text is empty"),
        ([*adapter, "--adapter-window", "0-0.5", "--adapter-window", "0.5-1"], "2 --adapter-window values for 1"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 1
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # argparse: usage error, exit 2
        main([*base, *adapter, "--adapter-window", "0.7-0.2"])
    assert stop.value.code == 2 and "needs 0 <= BEGIN < END <= 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
