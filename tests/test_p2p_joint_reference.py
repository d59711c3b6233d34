"""Prompt-to-prompt on one joint attention layer (SD3's MM-DiT), computed the textbook way and compared with
:class:`imageprompt.p2p_joint.JointPromptToPrompt`.

The expected values are written out by hand from the definitions in ``docs/sd3.md``: one softmax over image and
text keys per query; for the target's image queries, the image-key block is the source's (self-attention
injection) and the text-key block is the source's read through the word alignment, token by token (the positions
are counted here from the tokenizers' own tokens, not from :mod:`imageprompt.p2p_align`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from imageprompt.joint_attention import JointLayer
from imageprompt.p2p import PromptToPromptSettings
from imageprompt.p2p_joint import JointPromptToPrompt
from imageprompt.testing import TEST_WORDS
from imageprompt.tokenizer_writer import write_clip_tokenizer, write_t5_tokenizer

N_IMG, T5_LEN, HEADS, DIM = 4, 12, 3, 8  # image tokens: a 2 x 2 patch grid
T = 77 + T5_LEN


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import CLIPTokenizer, T5TokenizerFast

    folder = tmp_path_factory.mktemp("tok")
    return (CLIPTokenizer.from_pretrained(write_clip_tokenizer(TEST_WORDS, folder / "clip")),
            T5TokenizerFast.from_pretrained(write_t5_tokenizer(TEST_WORDS, folder / "t5")))


def _qkv(rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, HEADS, N_IMG + T, DIM, generator=g) for _ in range(3)]


def _run(controller, q, k, v):
    return controller.edit_attention(JointLayer("block.0", 0, N_IMG), q, k, v, None,
                                     lambda q_, k_, v_, m: F.scaled_dot_product_attention(q_, k_, v_))


def _softmax(q, k):
    return (q @ k.transpose(-1, -2) / DIM ** 0.5).softmax(-1)


def test_replace_with_self_injection_by_hand(tokenizers):
    clip, t5 = tokenizers
    source, target = "a red cat", "a zebra cat"  # "zebra" is not one token: the later tokens shift
    settings = PromptToPromptSettings("replace", cross_steps=1.0, self_steps=1.0, blend_words=["cat"])
    controller = JointPromptToPrompt(clip, t5, source, target, settings, T5_LEN)
    controller.setup(1, (4, 4), 2)
    q, k, v = _qkv(4)  # rows: uncond source, uncond target, source, target
    got = _run(controller, q, k, v)

    p = _softmax(q, k)
    src, tgt = p[2], p[3].clone()
    tgt[:, :N_IMG, :N_IMG] = src[:, :N_IMG, :N_IMG]  # self-attention injection: the image x image block
    zebra = len(clip.encode("zebra", add_special_tokens=False))
    assert zebra > 1
    text_src, text_new = src[:, :N_IMG, N_IMG:], torch.zeros(HEADS, N_IMG, T)
    # CLIP part: BOS, "a" <- "a", each zebra token <- "red" / count, then "cat", EOS, padding in order
    text_new[..., 0], text_new[..., 1] = text_src[..., 0], text_src[..., 1]
    for j in range(2, 2 + zebra):
        text_new[..., j] = text_src[..., 2] / zebra
    for j in range(2 + zebra, 77):
        text_new[..., j] = text_src[..., min(j - zebra + 1, 76)]
    # T5 part (no BOS): "a" <- "a", zebra's pieces <- "red" / count, then "cat", "</s>", padding in order
    pieces = len(t5.encode("zebra", add_special_tokens=False))
    base = 77
    text_new[..., base] = text_src[..., base]
    for j in range(1, 1 + pieces):
        text_new[..., base + j] = text_src[..., base + 1] / pieces
    for j in range(1 + pieces, T5_LEN):
        text_new[..., base + j] = text_src[..., base + min(j - pieces + 1, T5_LEN - 1)]
    tgt[:, :N_IMG, N_IMG:] = text_new
    expected = torch.cat([F.scaled_dot_product_attention(q[:2], k[:2], v[:2]),
                          torch.stack([src @ v[2], tgt @ v[3]])])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # local blend reads the edited image x CLIP-token maps, averaged over heads, on the patch grid
    maps = torch.stack([src[:, :N_IMG, N_IMG:N_IMG + 77], tgt[:, :N_IMG, N_IMG:N_IMG + 77]])
    maps = maps.mean(1).reshape(2, 2, 2, 77)
    torch.testing.assert_close(controller.attention_maps(), maps, atol=1e-6, rtol=1e-5)


def test_reweight_without_self_injection_by_hand(tokenizers):
    clip, t5 = tokenizers
    settings = PromptToPromptSettings("reweight", weights={"cat": 3.0}, cross_steps=1.0, self_steps=0.0)
    controller = JointPromptToPrompt(clip, t5, "a red cat", None, settings, T5_LEN)
    controller.setup(1, (4, 4), 2)
    q, k, v = _qkv(2, seed=1)  # no guidance: source, target
    got = _run(controller, q, k, v)
    p = _softmax(q, k)
    tgt = p[1].clone()
    tgt[:, :N_IMG, N_IMG:] = p[0, :, :N_IMG, N_IMG:]  # the source's text block (reweight's target is the source prompt)
    tgt[:, :N_IMG, N_IMG + 3] *= 3.0  # "cat": CLIP position 3 (BOS a red cat)
    tgt[:, :N_IMG, N_IMG + 77 + 2] *= 3.0  # T5 position 2 (a red cat </s>)
    expected = torch.stack([p[0] @ v[0], tgt @ v[1]])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_refine_by_hand(tokenizers):
    clip, t5 = tokenizers
    settings = PromptToPromptSettings("refine", cross_steps=1.0, self_steps=0.0)
    controller = JointPromptToPrompt(clip, t5, "a cat", "a red cat", settings, T5_LEN)
    controller.setup(1, (4, 4), 2)
    q, k, v = _qkv(2, seed=3)
    got = _run(controller, q, k, v)
    p = _softmax(q, k)
    src, tgt = p[0, :, :N_IMG, N_IMG:], p[1].clone()
    text = tgt[:, :N_IMG, N_IMG:]  # a view: written in place
    own_red_clip, own_red_t5 = text[..., 2].clone(), text[..., 77 + 1].clone()
    # CLIP: BOS a red cat EOS <- BOS a (new) cat EOS; after the target's EOS (position 4), position j <- j
    for j, i in ((0, 0), (1, 1), (3, 2), (4, 3), *((j, j) for j in range(5, 77))):
        text[..., j] = src[..., i]
    text[..., 2] = own_red_clip
    # T5 (no BOS): a red cat </s> <- a (new) cat </s>; then position j <- j
    for j, i in ((0, 0), (2, 1), (3, 2), *((j, j) for j in range(4, T5_LEN))):
        text[..., 77 + j] = src[..., 77 + i]
    text[..., 77 + 1] = own_red_t5
    expected = torch.stack([p[0] @ v[0], tgt @ v[1]])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_outside_the_windows_the_fused_kernel_runs(tokenizers):
    clip, t5 = tokenizers
    settings = PromptToPromptSettings("replace", cross_steps=(0.5, 1.0), self_steps=(0.5, 1.0))
    controller = JointPromptToPrompt(clip, t5, "a red cat", "a blue cat", settings, T5_LEN)
    controller.setup(2, (4, 4), 2)  # step 0 is outside both windows
    q, k, v = _qkv(2, seed=2)
    torch.testing.assert_close(_run(controller, q, k, v), F.scaled_dot_product_attention(q, k, v))
    assert controller.attention_maps() is None


def test_wrong_text_length_and_unet_levels_are_refused(tokenizers):
    clip, t5 = tokenizers
    with pytest.raises(ValueError, match="joint layers"):
        JointPromptToPrompt(clip, t5, "a red cat", "a blue cat", PromptToPromptSettings("replace", self_res=16),
                            T5_LEN)
    controller = JointPromptToPrompt(clip, t5, "a red cat", "a blue cat", PromptToPromptSettings("replace"), 5)
    q, k, v = _qkv(2)
    with pytest.raises(RuntimeError, match="77 \\+ 5 text tokens"):
        _run(controller, q, k, v)
