"""One identity rule for "the same image encoder", used by image-embedding files and tuning files alike:
an fp16 (or bf16) copy of the encoder is the same encoder, a re-initialised one is not."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from imageprompt import tuning
from imageprompt.image_embeds import check_embeds_match, load_image_embeds, save_image_embeds
from imageprompt.model_identity import encoder_identity, identity_mismatch, same_encoder
from imageprompt.tuning import TuningFileError

ENCODER = dict(hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
               image_size=32, patch_size=8, projection_dim=40)


@pytest.fixture(scope="module")
def encoders():
    """``(fp32 original, its fp16 copy, its bf16 copy, a re-initialised encoder of the same architecture)``."""
    torch.manual_seed(0)
    original = CLIPVisionModelWithProjection(CLIPVisionConfig(**ENCODER)).eval()
    torch.manual_seed(1)
    other = CLIPVisionModelWithProjection(CLIPVisionConfig(**ENCODER)).eval()
    return original, copy.deepcopy(original).half(), copy.deepcopy(original).to(torch.bfloat16), other


def test_the_rule(encoders):
    original, half, bf16, other = encoders
    assert half.visual_projection.weight.dtype == torch.float16
    assert not torch.equal(half.visual_projection.weight.float(), original.visual_projection.weight)  # rounded
    assert same_encoder(half, original) and same_encoder(original, half) and same_encoder(bf16, original)
    assert not same_encoder(other, original)
    assert identity_mismatch(encoder_identity(other), encoder_identity(original)) == \
        "same architecture but different weights (visual_projection differs)"
    torch.manual_seed(0)
    wider = CLIPVisionModelWithProjection(CLIPVisionConfig(**{**ENCODER, "projection_dim": 32})).eval()
    assert identity_mismatch(encoder_identity(original), encoder_identity(wider)) == \
        "vision tower differs (projection_dim: 40 in file, 32 here)"
    scaled = copy.deepcopy(original)
    with torch.no_grad():
        scaled.visual_projection.weight.mul_(1.05)
    assert not same_encoder(scaled, original)
    # the identity goes into file headers: JSON and back gives the same verdicts
    stored = json.loads(json.dumps(encoder_identity(original)))
    assert identity_mismatch(stored, encoder_identity(half)) is None
    assert identity_mismatch(stored, encoder_identity(other)) is not None


def test_embeddings_file_takes_the_fp16_copy_and_refuses_another_encoder(encoders, tmp_path):
    original, half, _, other = encoders

    def records(encoder):
        return [{"name": "style", "kind": "sd15", "encoder": encoder_identity(encoder)}]

    path = save_image_embeds(tmp_path / "e.safetensors", [torch.randn(2, 1, 40)], records(original))
    _, metadata = load_image_embeds(path)
    check_embeds_match(metadata, records(half), "e.safetensors")  # no error
    with pytest.raises(ValueError, match=r"adapter 0 was made with another image encoder \(style\).*"
                                         r"visual_projection differs"):
        check_embeds_match(metadata, records(other), "e.safetensors")


def test_tuning_file_takes_the_fp16_copy_and_refuses_another_encoder(encoders, tmp_path):
    from safetensors.torch import save_file

    original, half, _, other = encoders
    torch.manual_seed(2)
    text_projection = torch.nn.Linear(32, 40, bias=False)
    made_for = SimpleNamespace(sdipc_image_encoder=original, converter=SimpleNamespace(text_projection=text_projection),
                               clip_name="tiny-clip")
    header = {"format": tuning.FORMAT, "format_version": tuning.FORMAT_VERSION, "settings": "{}",
              "clip": json.dumps(tuning.clip_identity(made_for)), "clip_name": "tiny-clip"}
    path = tmp_path / "t.safetensors"
    save_file({"visual_prompts.prompts": torch.zeros(1)}, str(path), metadata=header)

    half_pipe = SimpleNamespace(sdipc_image_encoder=half, clip_name="tiny-clip",
                                converter=SimpleNamespace(text_projection=copy.deepcopy(text_projection).half()))
    assert tuning.check_tuning_file(half_pipe, path)["clip_name"] == "tiny-clip"
    other_pipe = SimpleNamespace(sdipc_image_encoder=other, converter=made_for.converter, clip_name="other-clip")
    with pytest.raises(TuningFileError, match="another CLIP.*visual_projection differs"):
        tuning.check_tuning_file(other_pipe, path)
