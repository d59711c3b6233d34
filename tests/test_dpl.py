"""Dynamic Prompt Learning (Wang et al., NeurIPS 2023): losses, background, tokens, pipeline and CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imageprompt import dpl
from imageprompt.inversion import Inversion

SOURCE, TARGET = "a red cat and a blue dog", "a red fox and a blue dog"


# ------------------------------------------------------------------ losses on hand-built maps
def square(h, w, top, left, size):
    m = torch.zeros(h, w)
    m[top:top + size, left:left + size] = 1.0
    return m


def test_disjoint_maps_give_zero_disjoint_loss_and_identical_maps_one():
    a, b = square(8, 8, 0, 0, 3), square(8, 8, 4, 4, 3) * 0.5
    assert dpl.disjoint_object_loss(torch.stack([a, b])).item() == 0.0
    assert dpl.disjoint_object_loss(torch.stack([a, a * 3])).item() == pytest.approx(1.0, abs=1e-6)
    assert dpl.disjoint_object_loss(a[None]).item() == 0.0  # one noun: no pair


def test_disjoint_loss_is_the_mean_pairwise_cosine():
    torch.manual_seed(0)
    maps = torch.rand(3, 4, 4)
    flat = maps.reshape(3, -1)
    cos = lambda x, y: float(x @ y / (x.norm() * y.norm()))  # noqa: E731
    expected = (cos(flat[0], flat[1]) + cos(flat[0], flat[2]) + cos(flat[1], flat[2])) / 3
    assert dpl.disjoint_object_loss(maps).item() == pytest.approx(expected, abs=1e-6)


def test_a_map_on_the_background_gives_positive_leakage_loss():
    background = 1.0 - square(8, 8, 2, 2, 4)  # object in the middle
    on_object = square(8, 8, 3, 3, 2)
    leaking = on_object + 0.2 * background
    assert dpl.background_leakage_loss(on_object[None], background).item() == 0.0
    loss = dpl.background_leakage_loss(leaking[None], background).item()
    expected = float((leaking * background).sum() / (leaking.norm() * background.norm()))
    assert loss > 0 and loss == pytest.approx(expected, abs=1e-6)
    # the mean over nouns
    both = dpl.background_leakage_loss(torch.stack([on_object, leaking]), background).item()
    assert both == pytest.approx(expected / 2, abs=1e-6)


def test_attention_balancing_loss_written_out():
    """Attend-and-Excite's loss by hand: softmax(100 * maps[..., 1:-1]) over tokens, 3x3 smoothing, 1 - peak."""
    h = w = 5
    maps = torch.zeros(h, w, 6)
    maps[2, 2, 2] = 0.05  # token 2 peaks at the centre; token 3 is flat
    maps[..., 3] = 0.01
    loss = dpl.attention_balancing_loss(maps, [[2], [3]])
    # softmax over positions 1..4 at the centre: token 2 has e^5, token 3 e^1, the others e^0
    centre = math.exp(5) / (math.exp(5) + math.exp(1) + 2)
    around = 1 / (1 + math.exp(1) + 2)  # token 2 elsewhere: score 0 like positions 1 and 4
    g = [math.exp(-((x / (2 * 0.5)) ** 2)) for x in (-1, 0, 1)]
    kernel = np.outer(g, g) / np.outer(g, g).sum()
    peak_2 = kernel[1, 1] * centre + (1 - kernel[1, 1]) * around
    flat_3 = math.exp(1) / (math.exp(1) + 3)  # token 3 everywhere except the centre
    peak_3 = flat_3  # smoothing a constant region (away from the centre) keeps it
    assert loss.item() == pytest.approx(max(1 - peak_2, 1 - peak_3), abs=1e-5)
    assert dpl.attention_balancing_loss(maps, [[2]]).item() == pytest.approx(1 - peak_2, abs=1e-5)


def test_thresholds_decay_as_the_paper_sets_them():
    s = dpl.DPLSettings()
    assert s.thresholds(0) == pytest.approx((0.3, 0.9, 0.7))
    assert s.thresholds(25) == pytest.approx((0.3 / math.e, 0.9 / math.e, 0.7 * math.exp(-0.5)))
    assert (s.lambda_balance, s.lambda_disjoint, s.lambda_background, s.token_steps) == (1.0, 0.05, 0.05, 21)
    with pytest.raises(ValueError, match="token_steps"):
        dpl.DPLSettings(token_steps=-1)
    with pytest.raises(ValueError, match="map_res"):
        dpl.DPLSettings(map_res=0)


# ------------------------------------------------------------------ background from attention
def test_background_mask_from_clustered_self_attention_and_noun_maps():
    h = w = 8
    a, b = square(h, w, 1, 1, 3).bool(), square(h, w, 4, 4, 3).bool()
    bg = ~(a | b)
    regions = [a, b, bg]
    self_maps = torch.zeros(h, w, h * w)  # each pixel attends uniformly within its region
    for region in regions:
        self_maps[region] = region.flatten().float() / region.sum()
    cross = torch.zeros(h, w, 8)
    cross[..., 2] = a.float() * 0.6 + 0.02  # noun 1 on object a (a little everywhere)
    cross[..., 5] = b.float() * 0.4 + 0.01
    mask = dpl.background_mask(self_maps, cross, [[2], [5]], dpl.DPLSettings(num_segments=3))
    assert mask.shape == (h, w) and mask.dtype == torch.float32
    assert torch.equal(mask.bool(), bg)
    # at a coarser map size the mask is resized (nearest)
    small = dpl.background_mask(self_maps, F.avg_pool2d(cross.permute(2, 0, 1), 2).permute(1, 2, 0), [[2], [5]],
                                dpl.DPLSettings(num_segments=3))
    assert small.shape == (4, 4)


def test_kmeans_separates_clear_clusters_deterministically():
    gen = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(20, 3, generator=gen) * 0.1 + c for c in (0.0, 5.0, -5.0)])
    labels = dpl.kmeans(points, 3)
    assert torch.equal(labels, dpl.kmeans(points, 3))
    for k in range(3):
        assert len(set(labels[k * 20:(k + 1) * 20].tolist())) == 1
    assert len(set(labels.tolist())) == 3


# ------------------------------------------------------------------ tokens and gradients
def test_dynamic_tokens_change_only_states_from_their_position_on(p2p_pipe):
    ids = p2p_pipe.tokenize([SOURCE])
    positions = dpl.noun_groups(p2p_pipe.tokenizer, SOURCE, ["cat"], 77)[0]
    base = p2p_pipe.text_encoder(ids)[0]
    same = p2p_pipe.text_encoder.get_input_embeddings()(ids[:, positions])[0]
    assert torch.allclose(dpl.encode_with_tokens(p2p_pipe.text_encoder, ids, positions, same), base, atol=1e-6)
    step = torch.randn(same.shape, generator=torch.Generator().manual_seed(0))  # not constant: LayerNorm removes that
    moved = dpl.encode_with_tokens(p2p_pipe.text_encoder, ids, positions, same + step)
    first = positions[0]
    assert torch.allclose(moved[:, :first], base[:, :first], atol=1e-6)  # CLIP's text encoder is causal
    assert (moved[:, first] - base[:, first]).abs().max() > 1e-3


def test_gradients_reach_only_the_dynamic_tokens(p2p_pipe):
    from diffusers import DDIMScheduler

    pipe = type(p2p_pipe).from_pipe(p2p_pipe, scheduler=DDIMScheduler.from_config(p2p_pipe.scheduler.config))
    ids = pipe.tokenize([SOURCE])
    groups = dpl.noun_groups(pipe.tokenizer, SOURCE, ["cat", "dog"], 77)
    positions = sorted(p for g in groups for p in g)
    tokens = pipe.text_encoder.get_input_embeddings()(ids[:, positions])[0].detach()
    latent = pipe.unet.config.sample_size
    recorder = dpl.AttentionRecorder((latent, latent), dpl.default_resolution(pipe.unet.config, latent))
    modules = [pipe.unet, pipe.text_encoder]
    before = [p.detach().clone() for m in modules for p in m.parameters()]
    background = torch.zeros(recorder.map_res, recorder.map_res)
    background[0] = 1.0
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, latent, latent, generator=gen)
    settings = dpl.DPLSettings(balance_beta=0.0, disjoint_beta=0.0, background_beta=0.0, token_steps=3)
    with recorder.attached(pipe.unet):
        new, losses = dpl.optimise_tokens(pipe, recorder, ids, positions, groups, tokens, latents, 500, 0,
                                          background, settings)
    assert set(losses) == {"balance", "disjoint", "background", "total"}
    assert (new - tokens).abs().max() > 0  # the tokens moved
    for m in modules:
        assert all(p.grad is None for p in m.parameters())
    after = [p.detach() for m in modules for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(p.editors == () for p in pipe.unet.attn_processors.values())  # the recorder is detached again


def test_recorder_keeps_fused_layers_equal_and_records_explicit_maps(p2p_pipe):
    latent = p2p_pipe.unet.config.sample_size
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, latent, latent, generator=gen)
    cond = p2p_pipe.encode_text([SOURCE], "cpu")[0]
    plain = p2p_pipe.unet(x, 10, encoder_hidden_states=cond).sample
    recorder = dpl.AttentionRecorder((latent, latent), latent, latent)
    recorder.record_cross = recorder.record_self = True
    with torch.no_grad(), recorder.attached(p2p_pipe.unet):
        recorded = p2p_pipe.unet(x, 10, encoder_hidden_states=cond).sample
    assert torch.allclose(plain, recorded, atol=1e-5)
    maps = recorder.cross_maps()
    assert maps.shape == (latent, latent, 77)
    assert torch.allclose(maps.sum(-1), torch.ones(latent, latent), atol=1e-5)
    assert recorder.self_sum.shape == (latent, latent, latent * latent) and recorder.self_count >= 1


# ------------------------------------------------------------------ the pipeline
@pytest.fixture
def ddim_pipe(p2p_pipe):
    from diffusers import DDIMScheduler

    pipe = type(p2p_pipe).from_pipe(p2p_pipe, scheduler=DDIMScheduler.from_config(p2p_pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_dpl_inversion_returns_per_step_embeddings_and_bad_words_are_refused(ddim_pipe, noise_image):
    photo = noise_image.resize((32, 32))
    log = {}
    settings = dpl.DPLSettings(token_steps=2)
    result = dpl.dpl_inversion(ddim_pipe, photo, SOURCE, ["cat", "dog"], num_inference_steps=3, num_inner_steps=2,
                               settings=settings, log=log)
    assert result.method == "dpl" and len(result.cond_embeds) == 3 and len(result.uncond_embeds) == 3
    assert [sorted(t) for t in result.cond_tokens] == [["cat", "dog"]] * 3
    ids = ddim_pipe.tokenize([SOURCE])
    groups = dpl.noun_groups(ddim_pipe.tokenizer, SOURCE, ["cat", "dog"], 77)
    for embeds, tokens in zip(result.cond_embeds, result.cond_tokens):  # the embeddings are the tokens encoded
        again = dpl.encode_with_tokens(ddim_pipe.text_encoder, ids, groups[0] + groups[1],
                                       torch.cat([tokens["cat"], tokens["dog"]]))
        assert torch.allclose(embeds, again, atol=1e-5)
    assert len(log["losses"]) == 3 and log["background"].ndim == 2
    plain = ddim_pipe.encode_text([SOURCE], "cpu")[0]
    first = dpl.noun_groups(ddim_pipe.tokenizer, SOURCE, ["cat"], 77)[0][0]
    for embeds in result.cond_embeds:  # tokens before the first noun are the prompt's own
        assert torch.allclose(embeds[:, :first], plain[:, :first], atol=1e-5)
    assert any((e - plain).abs().max() > 1e-4 for e in result.cond_embeds)
    with pytest.raises(ValueError, match="'tree' is not in the source prompt"):
        ddim_pipe.invert(photo, SOURCE, "dpl", 3, words=["cat", "tree"])
    with pytest.raises(ValueError, match="needs the nouns"):
        ddim_pipe.invert(photo, SOURCE, "dpl", 3)
    with pytest.raises(ValueError, match="dpl"):
        ddim_pipe.invert(photo, SOURCE, "nope", 3)


def test_edit_uses_the_per_step_source_embeddings_in_the_source_row(ddim_pipe):
    latent, steps = ddim_pipe.unet.config.sample_size, 3
    gen = torch.Generator().manual_seed(2)
    conds = [torch.randn(1, 77, ddim_pipe.text_encoder.config.hidden_size, generator=gen) for _ in range(steps)]
    nulls = [torch.randn(1, 77, ddim_pipe.text_encoder.config.hidden_size, generator=gen) for _ in range(steps)]
    start = torch.randn(1, 4, latent, latent, generator=gen)
    dim = ddim_pipe.text_encoder.config.hidden_size
    tokens = [{"cat": torch.randn(1, dim, generator=gen), "dog": torch.randn(1, dim, generator=gen)}
              for _ in range(steps)]
    inversion = Inversion(start, nulls, [start] * (steps + 1), "dpl", steps, 7.5, cond_embeds=conds,
                          cond_tokens=tokens)
    seen = []
    hook = ddim_pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True)
    try:
        ddim_pipe(SOURCE, TARGET, inversion=inversion, num_inference_steps=steps, output_type="latent")
    finally:
        hook.remove()
    ids = ddim_pipe.tokenize([TARGET])
    dog = dpl.noun_groups(ddim_pipe.tokenizer, TARGET, ["dog"], 77)[0]
    plain = ddim_pipe.encode_text([TARGET], "cpu")[0]
    assert len(seen) == steps
    for step, context in enumerate(seen):  # rows: null source, null target, cond source, cond target
        assert torch.allclose(context[2], conds[step][0]) and torch.allclose(context[0], nulls[step][0])
        # the target keeps "dog" (its learned token goes in) and has no "cat" ("fox" stays the word's own)
        expected = dpl.encode_with_tokens(ddim_pipe.text_encoder, ids, dog, tokens[step]["dog"])
        assert torch.allclose(context[3], expected[0], atol=1e-5)
        assert torch.allclose(context[3, :dog[0]], plain[0, :dog[0]], atol=1e-5)
        assert not torch.allclose(context[3], plain[0], atol=1e-3)


def test_dpl_composes_with_every_edit_mode_and_local_blend(ddim_pipe, noise_image):
    photo = noise_image.resize((32, 32))
    inversion = ddim_pipe.invert(photo, SOURCE, "dpl", 2, num_inner_steps=1, words=["cat", "dog"],
                                 dpl_settings=dpl.DPLSettings(token_steps=1))
    runs = {
        "replace": dict(target_prompt=TARGET, blend_words=["cat", "fox"]),
        "refine": dict(target_prompt="a red cat and a big blue dog", mode="refine"),
        "reweight": dict(mode="reweight", weights={"dog": 2.0}),
    }
    sources = []
    for kwargs in runs.values():
        out = ddim_pipe(SOURCE, inversion=inversion, num_inference_steps=2, output_type="latent", **kwargs)
        assert out.images.shape[0] == 2 and torch.isfinite(out.images).all()
        sources.append(out.images[0])
    for other in sources[1:]:  # the source row does not depend on the edit
        assert torch.allclose(sources[0], other, atol=1e-5)
    with pytest.raises(ValueError, match="guidance"):
        ddim_pipe(SOURCE, TARGET, inversion=inversion, num_inference_steps=2, guidance_scale=3.0)


# ------------------------------------------------------------------ the command line
def test_cli_inverts_with_dpl_end_to_end(tmp_path, tiny_model, noise_image, capsys):
    from imageprompt.cli.main import main
    from imageprompt.images import read_parameters

    model_dir, clip_dir = tiny_model
    photo = tmp_path / "photo.png"
    noise_image.resize((32, 32)).save(photo)
    out = tmp_path / "out"
    code = main(["p2p", "--image", str(photo), "--invert", "dpl", "--dpl-words", "cat", "dog", "--source", SOURCE,
                 "--target", TARGET, "--inner-steps", "1", "--steps", "2", "--out", str(out),
                 "--model", str(model_dir), "--clip", str(clip_dir)])
    assert code == 0, capsys.readouterr().err
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["photo-edit.png", "photo-source.png"]
    meta = read_parameters(out / "photo-edit.png")
    assert meta["invert"] == "dpl" and meta["dpl_words"] == ["cat", "dog"] and meta["inner_steps"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--invert", "dpl"], "--invert dpl needs --dpl-words"),
    (["--invert", "dpl", "--dpl-words", "tree"], "--dpl-words 'tree' is not in --source"),
    (["--invert", "null-text", "--dpl-words", "cat"], "--dpl-words needs --invert dpl"),
])
def test_cli_refuses_bad_dpl_options_before_loading(tmp_path, noise_image, capsys, argv, message):
    from imageprompt.cli.main import main

    photo = tmp_path / "photo.png"
    noise_image.save(photo)
    code = main(["p2p", "--image", str(photo), "--source", SOURCE, "--target", TARGET, "--out", str(tmp_path / "o"),
                 "--model", str(tmp_path / "missing"), *argv])
    assert code != 0 and message in capsys.readouterr().err


# ------------------------------------------------------------------ the bundled model
@pytest.fixture(scope="module")
def bundled_ddim():
    from diffusers import DDIMScheduler
    from imageprompt.pipelines import StableDiffusionPromptToPromptPipeline

    from imageprompt.world.evaluate import load_bundled

    pipe = load_bundled("cpu")
    ddim = DDIMScheduler.from_config(pipe.scheduler.config)
    p2p = StableDiffusionPromptToPromptPipeline.from_pipe(pipe, scheduler=ddim)
    p2p.set_progress_bar_config(disable=True)
    return p2p


def test_dpl_reconstructs_a_two_object_scene_as_well_as_null_text(bundled_ddim):
    """The source output (the reconstruction) of a DPL-inverted two-object scene, with the paper's
    settings and 6 DDIM steps, against the photo: at least null-text inversion's PSNR (measured:
    24.3 dB against 23.9 dB)."""
    from skimage.metrics import peak_signal_noise_ratio

    from imageprompt.world.evaluate_dpl import two_object_cases

    scene, source, target, *_ = two_object_cases(1)[0]
    photo = np.asarray(scene.image)
    psnr = {}
    for method in ("null-text", "dpl"):
        words = [o.shape for o in scene.objects] if method == "dpl" else None
        inversion = bundled_ddim.invert(scene.image, source, method, num_inference_steps=6, words=words)
        out = bundled_ddim(source, target, inversion=inversion, num_inference_steps=6)
        psnr[method] = peak_signal_noise_ratio(photo, np.asarray(out.images[0]), data_range=255)
    print(psnr)
    assert psnr["dpl"] >= psnr["null-text"] > 20, psnr


def test_batch_rows_invert_with_dpl(tmp_path, tiny_pipe, noise_image):
    import json

    from imageprompt.images import read_parameters
    from imageprompt.jobs import JobDefaults, JobOptions, run_job

    noise_image.resize((32, 32)).save(tmp_path / "photo.png")
    edit = {"kind": "p2p", "image": "photo.png", "prompt": SOURCE, "target": TARGET}
    rows = [{**edit, "invert": "dpl", "dpl_words": ["cat", "dog"]},
            {**edit, "invert": "dpl"},  # no nouns
            {**edit, "invert": "dpl", "dpl_words": ["tree"]},  # not in the prompt
            {**edit, "invert": "null-text", "dpl_words": ["cat"]}]  # nouns without dpl
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    run_job(jobs, out, pipe=tiny_pipe, defaults=JobDefaults(steps=2, guidance=7.5, height=32, width=32),
            options=JobOptions(progress=False))
    records = {r["line"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert records[1]["status"] == "done", records[1]
    assert read_parameters(out / records[1]["outputs"][-1])["dpl_words"] == ["cat", "dog"]
    assert "go together" in records[2]["error"] and "go together" in records[4]["error"]
    assert '"tree" is not a word' in records[3]["error"]
