"""One editor protocol: each layer's facts computed once, editors that chain, compositions of techniques.

The expected values are written out here (explicit softmax attention, AdaIN by hand), independently of
imageprompt.attention's chain and of each technique's module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imageprompt.attention import AttentionEditor, Layer, editor_attached, imageprompt_processors, run_editors
from imageprompt.attention_maps import AttentionMapRecorder
from imageprompt.dpl import AttentionRecorder
from imageprompt.p2p import PromptToPromptController
from imageprompt.style_aligned import StyleAlignedController

SOURCE, TARGET = "a red circle on the left", "a blue circle on the left"
SAMPLE = dict(num_inference_steps=3, output_type="np", height=32, width=32)


def noise(pipe, seed=0):
    side = SAMPLE["height"] // pipe.vae_scale_factor
    return torch.randn(1, pipe.unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ layer facts
def test_layer_facts_come_from_the_modules(tiny_pipe):
    processors = imageprompt_processors(tiny_pipe.unet)
    for name, proc in processors.items():
        module = tiny_pipe.unet.get_submodule(name.rsplit(".processor", 1)[0])
        assert proc.layer.is_cross == bool(module.is_cross_attention)  # the module's own flag, not the name
        assert proc.layer.name == name
    by_place = {(p.layer.place, p.layer.scale) for p in processors.values()}
    # the tiny UNet: attention in down block 0 (full grid), the mid block (one level down), up block 1 (full grid)
    assert by_place == {("down", 1), ("mid", 2), ("up", 1)}
    selfs = sorted((p.layer for p in processors.values() if not p.layer.is_cross), key=lambda f: f.index)
    assert [f.place for f in selfs] == ["down", "mid", "up", "up"] and [f.index for f in selfs] == [0, 1, 2, 3]
    assert Layer("x", True, "mid", 2, 0).size((16, 15)) == (8, 8)  # rows and columns rounded up, as the UNet pads


# ------------------------------------------------------------------ the chain
class Tagger(AttentionEditor):
    def __init__(self, tag, log):
        self.tag, self.log = tag, log

    def edit_attention(self, layer, query, key, value, attention_mask, attend):
        self.log.append(self.tag)
        return attend(query * 2 if self.tag == "double" else query, key, value, attention_mask)


def test_editors_chain_in_attach_order_and_detach_on_error(tiny_pipe):
    log = []
    procs = list(imageprompt_processors(tiny_pipe.unet).values())[:1]
    first, second = Tagger("first", log), Tagger("double", log)
    with pytest.raises(RuntimeError, match="boom"), editor_attached(tiny_pipe.unet, first, procs):
        with editor_attached(tiny_pipe.unet, second, procs):
            assert procs[0].editors == (first, second)
            q, k, v = (torch.randn(2, 2, 4, 8) for _ in range(3))
            out = run_editors(procs[0].layer, procs[0].editors, q, k, v)
            want = ((2 * q) @ k.transpose(-1, -2) / np.sqrt(8)).softmax(-1) @ v
            torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
            assert log == ["first", "double"]
            raise RuntimeError("boom")
    assert procs[0].editors == ()


# ------------------------------------------------------------------ p2p + StyleAligned
def _adain(x, ref, eps=1e-5):
    mean, std = x.mean(-2, keepdim=True), (x.var(-2, keepdim=True) + eps).sqrt()
    return (x - mean) / std * (ref.var(-2, keepdim=True) + eps).sqrt() + ref.mean(-2, keepdim=True)


def test_p2p_self_replacement_after_style_aligned_matches_the_textbook(p2p_pipe):
    """Rows [uncond src, uncond tgt, cond src, cond tgt]. StyleAligned shares row 0's keys and values of each half
    after AdaIN; prompt-to-prompt then gives the target the source's attention probabilities."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 2, 16, 8) * 1.5 + 0.3 for _ in range(3))
    style = StyleAlignedController(2)
    p2p = PromptToPromptController(p2p_pipe.tokenizer, SOURCE, TARGET, self_steps=1.0, self_res=4)
    p2p.setup(4, (4, 4))
    layer = Layer("up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor", False, "up", 1, 3)
    got = run_editors(layer, [style, p2p], q, k, v)
    want = []
    for half in (slice(0, 2), slice(2, 4)):
        qh, kh, vh = q[half], k[half], v[half]
        qa, ka = _adain(qh, qh[:1]), _adain(kh, kh[:1])
        keys = torch.cat([ka, ka[:1].expand_as(ka)], dim=-2)
        values = torch.cat([vh, vh[:1].expand_as(vh)], dim=-2)
        probs = (qa @ keys.transpose(-1, -2) / np.sqrt(8)).softmax(-1)
        if half.start == 2:  # the conditional half: the target reads the source's probabilities
            probs = torch.stack([probs[0], probs[0]])
        want.append(probs @ values)
    torch.testing.assert_close(got, torch.cat(want), atol=1e-4, rtol=0)


def test_p2p_inside_style_aligned_keeps_the_source_and_styles_the_edit(tiny_pipe, p2p_pipe):
    latents = noise(p2p_pipe)
    alone = p2p_pipe(SOURCE, TARGET, latents=latents, **SAMPLE).images
    procs = [p for p in imageprompt_processors(p2p_pipe.unet).values() if not p.is_cross_attention]
    with editor_attached(p2p_pipe.unet, StyleAlignedController(2), procs):
        styled = p2p_pipe(SOURCE, TARGET, latents=latents, **SAMPLE).images
    np.testing.assert_allclose(styled[0], alone[0], atol=1e-5)  # the reference (the source) is untouched
    assert np.abs(styled[1] - alone[1]).max() > 1e-4  # the edit takes the reference's style (a tiny random UNet)


# ------------------------------------------------------------------ p2p + map recording + DPL
def test_p2p_with_a_map_recorder_and_dpls_recorder(p2p_pipe):
    latents = noise(p2p_pipe)
    side = latents.shape[-1]
    kw = dict(latents=latents, map_res=side, cross_steps=1.0, **SAMPLE)
    alone = p2p_pipe(SOURCE, TARGET, **kw)
    recorder = AttentionMapRecorder(2, (side, side), map_res=side)
    dpl = AttentionRecorder((side, side), map_res=side)
    dpl.record_cross = True
    with recorder.attached(p2p_pipe.unet), dpl.attached(p2p_pipe.unet):
        both = p2p_pipe(SOURCE, TARGET, **kw)
    np.testing.assert_array_equal(both.images, alone.images)  # recorders change nothing
    torch.testing.assert_close(both.attention_maps, alone.attention_maps)
    maps = recorder.attention_maps()  # attached before the edit: the maps as the UNet computed them
    torch.testing.assert_close(maps[0], alone.attention_maps[0], atol=1e-6, rtol=0)  # the source is not edited
    assert (maps[1] - alone.attention_maps[1]).abs().max() > 1e-4  # the target's maps are, after the recorder
    torch.testing.assert_close(dpl.cross_maps(), maps[1], atol=1e-6, rtol=0)  # DPL reads the last row: the target
    assert all(p.editors == () for p in imageprompt_processors(p2p_pipe.unet).values())
