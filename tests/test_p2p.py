"""Prompt-to-prompt: alignment, the fast path against a textbook reference, edit behaviour, errors, the CLI."""

from __future__ import annotations

import pytest
import torch
from imageprompt.pipelines.loading import load_pipeline

from imageprompt.attention_maps import render_attention_maps, token_labels
from imageprompt.cli.main import main
from imageprompt.images import read_parameters
from imageprompt.p2p import (
    PromptToPromptController,
    global_alignment,
    refinement_mapper,
    replacement_mapper,
    step_alphas,
    validate_edit,
    word_token_spans,
)

SOURCE, TARGET = "a red cat on the beach", "a red dog on the beach"
STEPS = 4


@pytest.fixture
def noise():
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))


def latents_of(pipe, noise, **kw):
    kw = {"num_inference_steps": STEPS, "output_type": "latent", "latents": noise, **kw}
    return pipe(**kw)


# ------------------------------------------------------- textbook reference
def textbook_editor(ctl, layer, query, key, value, attention_mask=None, attend=None):
    """Hertz et al.'s reference: every probability matrix of every row and layer is materialised."""
    probs = (query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5).softmax(-1)
    prompts = ctl.num_prompts
    base, own = probs[-prompts], probs[-prompts + 1:]
    height = ctl.latent_size[0] // layer.scale
    record = layer.is_cross and height == ctl.map_res
    if layer.is_cross:
        if ctl.step < ctl.num_steps:
            alpha = ctl.alphas[ctl.step][:, None, None, :]
            if ctl.mode == "replace":
                edited = torch.einsum("hpw,twn->thpn", base, ctl.mapper)
            elif ctl.mode == "refine":
                keep = ctl.keep[:, None, None, :]
                edited = base[:, :, ctl.index].permute(2, 0, 1, 3) * keep + own * (1 - keep)
            else:
                edited = base.expand_as(own)
            if ctl.weights is not None:
                edited = edited * ctl.weights[:, None, None, :]
            own = edited * alpha + own * (1 - alpha)
    elif ctl.self_window[0] <= ctl.step < ctl.self_window[1] and height <= ctl.self_res:
        own = base.expand_as(own)
    probs = torch.cat([probs[:-prompts], base[None], own])
    if record:  # the edited maps, as the authors' store keeps them
        ctl.record(layer, probs[-prompts:])
    return probs @ value


EDITS = [
    dict(source_prompt=SOURCE, target_prompt=TARGET, mode="replace", blend_words=["cat", "dog"],
         weights={"dog": 2.0}, word_cross_steps={"dog": 0.5}, self_res=16, map_res=16, self_steps=0.5),
    dict(source_prompt=SOURCE, target_prompt="a big red cat on the snowy beach", mode="refine", self_res=8,
         map_res=8),
    dict(source_prompt=SOURCE, mode="reweight", weights={"beach": 3.0}, cross_steps=(0.25, 1.0)),
]


@pytest.mark.parametrize("edit", EDITS, ids=[e["mode"] for e in EDITS])
def test_fast_path_matches_textbook_reference(p2p_pipe, tiny_pipe, noise, edit, monkeypatch):
    fast = latents_of(p2p_pipe, noise, **edit)
    with monkeypatch.context() as m:
        m.setattr(PromptToPromptController, "edit_attention", textbook_editor)
        m.setattr(PromptToPromptController, "probs_rows", lambda ctl, layer, rows: 0)
        reference = latents_of(p2p_pipe, noise, **edit)
    assert (fast.images - reference.images).abs().max().item() <= 1e-4
    assert torch.allclose(fast.attention_maps, reference.attention_maps, atol=1e-5)
    # the edit did something: the target is not the plain sampling of its own prompt
    plain = tiny_pipe(prompt=edit.get("target_prompt", SOURCE), latents=noise, num_inference_steps=STEPS,
                      output_type="latent")
    assert (fast.images[1:] - plain.images).abs().max().item() > 1e-3


def test_no_self_attention_probabilities_and_explicit_cross_only_where_needed(p2p_pipe, noise, monkeypatch):
    shapes, explicit = [], []
    softmax = torch.Tensor.softmax
    monkeypatch.setattr(torch.Tensor, "softmax", lambda t, *a, **k: shapes.append(t.shape) or softmax(t, *a, **k))
    original = PromptToPromptController.edit_probs

    def spy(self, layer, probs):
        explicit.append((self.step, self.latent_size[0] // layer.scale))
        return original(self, layer, probs)

    monkeypatch.setattr(PromptToPromptController, "edit_probs", spy)
    latents_of(p2p_pipe, noise, source_prompt=SOURCE, target_prompt=TARGET, cross_steps=0.5, self_steps=1.0,
               self_res=16, map_res=8)
    assert shapes and all(s[-1] == 77 for s in shapes)  # only cross-attention probabilities, never self
    # the tiny UNet has 3 cross-attention layers at 16 rows and 1 at 8: steps 0-1 edit all, steps 2-3 record at 8
    per_step = [sorted(h for s, h in explicit if s == step) for step in range(STEPS)]
    assert per_step == [[8, 16, 16, 16], [8, 16, 16, 16], [8], [8]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_editor_runs_in_half_precision(p2p_pipe, dtype):
    from imageprompt.attention import Layer, run_editors

    ctl = PromptToPromptController(p2p_pipe.tokenizer, SOURCE, TARGET, blend_words=["cat"], weights={"dog": 2.0})
    ctl.setup(4, (16, 16), default_res=16)
    gen = torch.Generator().manual_seed(0)
    for cross, keys in ((True, 77), (False, 256)):
        q = torch.randn(4, 2, 256, 16, generator=gen)
        k, v = torch.randn(4, 2, keys, 16, generator=gen), torch.randn(4, 2, keys, 16, generator=gen)
        layer = Layer("layer", cross, "up", 1, 0)
        full = run_editors(layer, [ctl], q, k, v)
        half = run_editors(layer, [ctl], q.to(dtype), k.to(dtype), v.to(dtype))
        assert half.dtype == dtype and torch.isfinite(half).all()
        assert torch.allclose(half.float(), full, atol=0.05)


def test_pipeline_runs_in_bfloat16(tiny_model, noise):
    from imageprompt.pipelines import StableDiffusionPromptToPromptPipeline

    base = load_pipeline(*map(str, tiny_model), device="cpu", dtype="bf16")
    pipe = StableDiffusionPromptToPromptPipeline.from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(SOURCE, TARGET, blend_words=["cat", "dog"], weights={"dog": 2.0}, self_res=16, map_res=16,
               latents=noise, num_inference_steps=2, output_type="latent")
    assert out.images.dtype == torch.bfloat16 and torch.isfinite(out.images).all()
    assert torch.isfinite(out.attention_maps).all()


# ---------------------------------------------------------- edit behaviour
def test_replace_keeps_source_branch_identical_to_plain_sampling(p2p_pipe, tiny_pipe, noise):
    edit = latents_of(p2p_pipe, noise, source_prompt=SOURCE, target_prompt=TARGET, blend_words=["cat", "dog"],
                      map_res=16)
    plain = tiny_pipe(prompt=SOURCE, latents=noise, num_inference_steps=STEPS, output_type="latent").images
    assert (edit.images[:1] - plain).abs().max().item() <= 1e-4


def test_no_control_steps_give_plain_sampling_of_target(p2p_pipe, tiny_pipe, noise):
    edit = latents_of(p2p_pipe, noise, source_prompt=SOURCE, target_prompt=TARGET, cross_steps=0.0, self_steps=0.0)
    plain = tiny_pipe(prompt=TARGET, latents=noise, num_inference_steps=STEPS, output_type="latent").images
    assert (edit.images[1:] - plain).abs().max().item() <= 1e-4
    controlled = latents_of(p2p_pipe, noise, source_prompt=SOURCE, target_prompt=TARGET, self_res=16)
    assert (controlled.images[1:] - plain).abs().max().item() > 1e-3


def test_local_blend_keeps_latents_outside_the_mask(p2p_pipe, noise):
    # random weights give flat maps (normalised 0.82-0.97): a high threshold leaves a partial mask
    out = latents_of(p2p_pipe, noise, source_prompt=SOURCE, target_prompt=TARGET, blend_words=["cat", "dog"],
                     blend_threshold=0.93, map_res=16, cross_steps=0.5)
    mask = out.blend_mask
    assert mask.shape == (1, 1, 16, 16) and 0 < mask.float().mean() < 1
    source, target = out.images[:1], out.images[1:]
    outside = ~mask.expand_as(target)
    assert torch.equal(target[outside], source.expand_as(target)[outside])
    assert (target[~outside] - source.expand_as(target)[~outside]).abs().max() > 1e-3


def test_blend_start_and_exclude(p2p_pipe, noise):
    kw = dict(source_prompt=SOURCE, target_prompt=TARGET, blend_words=["cat", "dog"], blend_threshold=0.93,
              map_res=16)
    never = latents_of(p2p_pipe, noise, blend_start=1.0, **kw)  # blending starts after the last step
    plain = latents_of(p2p_pipe, noise, source_prompt=SOURCE, target_prompt=TARGET, map_res=16)
    assert never.blend_mask is None and torch.equal(never.images, plain.images)
    late = latents_of(p2p_pipe, noise, blend_start=0.5, **kw)
    full = latents_of(p2p_pipe, noise, **kw)
    assert late.blend_mask is not None and not torch.allclose(late.images, full.images, atol=1e-3)
    excluded = latents_of(p2p_pipe, noise, blend_exclude=["beach"], **kw)
    assert (excluded.blend_mask <= full.blend_mask).all()  # exclusion only removes from the mask
    assert excluded.blend_mask.sum() < full.blend_mask.sum()


def test_sdipc_image_prompt_source_matches_sdipc_edit(p2p_pipe, tiny_pipe, noise, red_image):
    out = latents_of(p2p_pipe, noise, source_prompt="on the beach", target_prompt="on the snow", image=red_image,
                     alpha=0.6)
    sdipc = tiny_pipe(image=red_image, prompt="on the beach", alpha=0.6, latents=noise, num_inference_steps=STEPS,
                      output_type="latent").images
    assert (out.images[:1] - sdipc).abs().max().item() <= 1e-4
    assert not torch.allclose(out.images[1:], sdipc, atol=1e-3)


def test_pil_output_and_attention_maps(p2p_pipe):
    out = p2p_pipe(SOURCE, TARGET, num_inference_steps=2, generator=torch.Generator().manual_seed(0), map_res=16)
    assert len(out.images) == 2 and out.images[0].size == (32, 32)
    assert out.attention_maps.shape == (2, 16, 16, 77)
    assert torch.allclose(out.attention_maps.sum(-1), torch.ones(2, 16, 16), atol=1e-4)  # averaged probabilities
    assert out.tokens == [SOURCE.split(), TARGET.split()]
    picture = render_attention_maps(out.attention_maps, out.tokens, out.images, size=64)
    assert picture.size == (6 * 64, 2 * (64 + 18))
    tiles = [picture.crop((c * 64, 0, c * 64 + 64, 64)).tobytes() for c in range(6)]
    assert len(set(tiles)) == 6  # one distinct heat map per token
    caption = picture.crop((0, 64, 64, 82)).convert("L")
    assert min(caption.getdata()) < 128  # the label is drawn


# ----------------------------------------------------------- alignment
def test_word_spans_and_replacement_mapper_spreads_split_words(tiny_pipe):
    tok = tiny_pipe.tokenizer
    spans = word_token_spans(tok, "a zebu on the beach")
    zebu = spans[1][1]
    assert len(zebu) > 1 and spans[2][1][0] == zebu[-1] + 1  # unknown word: several tokens
    mapper = replacement_mapper(tok, "a cat on the beach", "a zebu on the beach", 77)
    assert mapper[0, 0] == 1 and mapper[1, 1] == 1
    assert torch.allclose(mapper[2, zebu], torch.full((len(zebu),), 1 / len(zebu)))
    shift = len(zebu) - 1
    assert mapper[3, 3 + shift] == 1 and mapper[6, 6 + shift] == 1  # "on" and EOS follow in order
    assert torch.allclose(mapper.sum(1)[: 77 - shift], torch.ones(77 - shift))  # attention mass is kept


def test_global_alignment_and_refinement_keep_new_tokens(tiny_pipe):
    assert global_alignment([1, 2, 3, 4], [1, 2, 9, 3, 4]) == [0, 1, -1, 2, 3]
    assert global_alignment([1, 2, 3], [1, 3]) == [0, 2]
    index, keep = refinement_mapper(tiny_pipe.tokenizer, "a cat on the beach", "a big cat on the beach", 77)
    assert keep[:8].tolist() == [1, 1, 0, 1, 1, 1, 1, 1]
    assert index[:8].tolist()[:2] == [0, 1] and index[3:8].tolist() == [2, 3, 4, 5, 6]
    assert index[8] == 8 and index[-1] == 76  # padding maps to the same position (the authors' rule)


def test_step_alphas_per_word(tiny_pipe):
    alphas = step_alphas(tiny_pipe.tokenizer, "a red dog", 10, 0.8, {"dog": (0.2, 0.5)}, 77)
    assert alphas[:8, 1].tolist() == [1] * 8 and alphas[8:, 1].tolist() == [0, 0]
    assert alphas[:, 3].tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]


def test_edit_cross_modes(tiny_pipe):
    tok = tiny_pipe.tokenizer
    base = torch.rand(2, 5, 77).softmax(-1)
    own = torch.rand(1, 2, 5, 77).softmax(-1)
    ctl = PromptToPromptController(tok, "a cat", "a big cat", mode="refine", cross_steps=1.0)
    ctl.setup(2, (16, 16))
    edited = ctl.edit_cross(base, own)
    assert torch.equal(edited[0, ..., 2], own[0, ..., 2])  # "big" is new: its own attention
    assert torch.equal(edited[0, ..., 3], base[..., 2])  # "cat" takes the source's "cat"
    ctl = PromptToPromptController(tok, "a cat", None, mode="reweight", weights={"cat": 3.0}, cross_steps=1.0)
    ctl.setup(2, (16, 16))
    edited = ctl.edit_cross(base, own)
    assert torch.allclose(edited[0, ..., 2], 3 * base[..., 2]) and torch.equal(edited[0, ..., 1], base[..., 1])


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, message", [
    (dict(target_prompt="a red dog on a sunny beach"), "source has 6 words and the target 7"),
    (dict(target_prompt=TARGET, weights={"snow": 2.0}), "weight word 'snow' is not in the target"),
    (dict(target_prompt=TARGET, blend_words=["tree"]), "blend word 'tree' is in neither"),
    (dict(target_prompt=TARGET, cross_steps=1.5), "`cross_steps` must lie in [0, 1]"),
    (dict(target_prompt=TARGET, self_steps=-0.1), "`self_steps` must lie in [0, 1]"),
    (dict(target_prompt=TARGET, word_cross_steps={"dog": (0.6, 0.2)}), "cross_steps of 'dog'"),
    (dict(target_prompt=TARGET, mode="swap"), "unknown mode 'swap'"),
    (dict(mode="reweight"), "reweight needs at least one word weight"),
    (dict(target_prompt=TARGET, map_res=4), "`map_res` 4 names no cross-attention layer"),
    (dict(target_prompt=TARGET, blend_exclude=["beach"]), "give `blend_words` too"),
    (dict(target_prompt=TARGET, blend_words=["cat"], blend_exclude=["tree"]), "blend-exclude word 'tree'"),
    (dict(target_prompt=TARGET, blend_words=["cat"], blend_start=1.5), "`blend_start` must be a fraction"),
])
def test_bad_input_fails_before_sampling(p2p_pipe, kwargs, message):
    calls = []
    handle = p2p_pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError) as err:
            p2p_pipe(SOURCE, num_inference_steps=2, **kwargs)
    finally:
        handle.remove()
    assert message in str(err.value)
    assert not calls


def test_validate_edit_returns_target():
    assert validate_edit("a cat", None, "reweight", {"cat": 2}) == "a cat"
    assert validate_edit("a cat", "a big cat", "refine") == "a big cat"


# ------------------------------------------------------------------ CLI
def test_cli_p2p_end_to_end(tiny_model, tmp_path, capsys):
    model_dir, clip_dir = tiny_model
    out = tmp_path / "out"
    maps = tmp_path / "maps.png"
    code = main(["p2p", "--source", SOURCE, "--target", TARGET, "--blend", "cat", "dog", "--weight", "dog=2",
                 "--cross-steps", "0.6", "--cross-steps", "dog=0.3", "--self-steps", "0.5", "--map-res", "16",
                 "--steps", "2", "--seed", "7", "--save-attention", str(maps), "--model", str(model_dir),
                 "--clip", str(clip_dir), "--device", "cpu", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "p2p-source-7.png"), str(out / "p2p-edit-7.png"), str(maps)]
    source, edit = read_parameters(out / "p2p-source-7.png"), read_parameters(out / "p2p-edit-7.png")
    assert (source["role"], edit["role"]) == ("source", "edit")
    assert edit["source"] == SOURCE and edit["target"] == TARGET and edit["mode"] == "replace"
    assert edit["weights"] == {"dog": 2.0} and edit["word_cross_steps"] == {"dog": 0.3}
    assert edit["cross_steps"] == 0.6 and edit["self_steps"] == 0.5 and edit["seed"] == 7 and edit["steps"] == 2
    assert read_parameters(maps)["role"] == "attention"
    assert edit["blend_exclude"] is None and edit["blend_start"] == 0.0


def test_cli_p2p_blend_exclude_and_start(tiny_model, tmp_path, capsys):
    model_dir, clip_dir = tiny_model
    out = tmp_path / "out"
    code = main(["p2p", "--source", SOURCE, "--target", TARGET, "--blend", "cat", "dog", "--blend-exclude", "beach",
                 "--blend-start", "0.5", "--steps", "2", "--seed", "7", "--model", str(model_dir),
                 "--clip", str(clip_dir), "--device", "cpu", "--out", str(out)])
    assert code == 0
    edit = read_parameters(out / "p2p-edit-7.png")
    assert edit["blend_exclude"] == ["beach"] and edit["blend_start"] == 0.5


def test_cli_p2p_real_photo(tiny_model, tmp_path, noise_image, capsys):
    model_dir, clip_dir = tiny_model
    photo = tmp_path / "photo.png"
    noise_image.save(photo)
    out = tmp_path / "out"
    code = main(["p2p", "--source", SOURCE, "--target", "a red cat on the snow", "--image", str(photo),
                 "--invert", "negative-prompt", "--steps", "2", "--model", str(model_dir), "--clip", str(clip_dir),
                 "--device", "cpu", "--out", str(out)])
    assert code == 0
    params = read_parameters(out / "photo-edit.png")
    assert params["invert"] == "negative-prompt" and params["input"] == "photo.png"
    assert (out / "photo-source.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--target", "a red dog on a beach today"], "source has 6 words and the target 7"),
    (["--target", TARGET, "--weight", "snow=2"], "weight word 'snow' is not in the target"),
    (["--target", TARGET, "--weight", "dog"], "--weight expects WORD=NUMBER"),
    (["--target", TARGET, "--blend", "tree"], "blend word 'tree' is in neither"),
    (["--target", TARGET, "--blend-exclude", "beach"], "give `blend_words` too"),
    (["--target", TARGET, "--blend", "cat", "--blend-exclude", "tree"], "blend-exclude word 'tree'"),
    (["--target", TARGET, "--cross-steps", "1.5"], "must be in [0, 1]"),
    (["--target", TARGET, "--mode", "swap"], "unknown mode 'swap'"),
    (["--target", TARGET, "--invert", "ddim"], "--invert needs --image"),
])
def test_cli_p2p_errors_before_loading(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    code = main(["p2p", "--source", SOURCE, *args, "--model", str(tmp_path / "missing"), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and message in err and err.startswith("imageprompt: error:") and len(err.splitlines()) == 1
    assert not out.exists()


def test_token_labels(tiny_pipe):
    assert token_labels(tiny_pipe.tokenizer, "a cat") == ["a", "cat"]
    # an unknown word: its pieces, in order, each labelled (none empty), between the known words
    pieces = token_labels(tiny_pipe.tokenizer, "a zebu cat")
    assert pieces[0] == "a" and pieces[-1] == "cat" and len(pieces) > 3
    assert "".join(pieces[1:-1]) == "zebu" and all(pieces)
