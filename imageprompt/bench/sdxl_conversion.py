"""SDXL image-to-prompt: which way to the penultimate layer? ``python -m imageprompt.bench.sdxl_conversion``.

Measures :func:`imageprompt.conversion_xl.conversion_report` (both :data:`~imageprompt.conversion_xl.MODES`,
fed each text's own projected embedding: what a perfect image embedding would be) on

- the tiny random SDXL text towers (ViT-L-shaped and bigG-shaped, :mod:`imageprompt.testing_xl`), and
- the bundled shapes-world CLIP's text tower: the only *trained* CLIP text tower here (no SDXL or CLIP
  weights can be installed on these machines).

Then converts 64 shapes-world *pictures* with the bundled CLIP's vision tower and compares each mode with the
pictures' captions. Prints markdown tables; the figures and the choice are in ``docs/sdxl.md``.
"""

from __future__ import annotations

import tempfile

import torch

COLORS, SHAPES, PLACES = ("red", "green", "blue", "yellow"), ("circle", "square", "triangle"), ("left", "right")
KEYS = ("identity_pinv", "identity_ln", "baseline_eos", "last_eos", "ln-inverse_eos", "last_tail", "ln-inverse_tail",
        "last_rel_err_eos", "ln-inverse_rel_err_eos")


def world_prompts() -> list[str]:
    """24 captions in the shapes world's words."""
    return [f"a {c} {s} on the {p}" for c in COLORS for s in SHAPES for p in PLACES]


def measure(atol: float = 0.3) -> dict[str, dict[str, float]]:
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    from imageprompt.checkpoints import BUNDLED_CLIP
    from imageprompt.conversion_xl import conversion_report
    from imageprompt.testing_xl import build_sdxl_components

    prompts = world_prompts()
    with tempfile.TemporaryDirectory() as tmp:
        parts = build_sdxl_components(tmp)
    rows = {
        "tiny SDXL ViT-L text (random)": conversion_report(parts["text_encoder"], parts["tokenizer"],
                                                           parts["clip_l"].text_projection, prompts, atol=atol),
        "tiny SDXL bigG text (random)": conversion_report(parts["text_encoder_2"], parts["tokenizer_2"],
                                                          parts["text_encoder_2"].text_projection, prompts, atol=atol),
    }
    clip = CLIPModel.from_pretrained(BUNDLED_CLIP).eval()
    tower = CLIPTextModel(clip.config.text_config).eval()
    getattr(tower, "text_model", tower).load_state_dict(clip.text_model.state_dict())
    rows["bundled shapes CLIP text (trained)"] = conversion_report(
        tower, CLIPTokenizer.from_pretrained(BUNDLED_CLIP), clip.text_projection, prompts, atol=atol)
    return rows


@torch.no_grad()
def measure_images(count: int = 64, seed: int = 4242, atol: float = 0.3) -> dict[str, float]:
    """The real use, on the bundled CLIP: shapes-world *pictures* converted with each mode, against their
    captions' states (cosine): ``normed_eos`` is SD 1.x's target (the caption's final-layer-normed EOS state),
    ``*_eos`` / ``*_tail`` the penultimate ones at EOS / over EOS..76, as in :func:`conversion_report`."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTextModel, CLIPTokenizer

    from imageprompt.checkpoints import BUNDLED_CLIP
    from imageprompt.conversion import eos_positions
    from imageprompt.conversion_xl import MODES, closed_form, measure_text_stats, text_states, to_penultimate
    from imageprompt.world.scenes import sample_scenes

    clip = CLIPModel.from_pretrained(BUNDLED_CLIP).eval()
    tokenizer = CLIPTokenizer.from_pretrained(BUNDLED_CLIP)
    tower = CLIPTextModel(clip.config.text_config).eval()
    getattr(tower, "text_model", tower).load_state_dict(clip.text_model.state_dict())
    scenes = sample_scenes(seed, 0, count)
    captions = [scene.caption for scene in scenes]
    pixels = CLIPImageProcessor.from_pretrained(BUNDLED_CLIP)(images=[s.image for s in scenes],
                                                              return_tensors="pt").pixel_values
    e = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
    stats = measure_text_stats(tower, tokenizer, captions)
    found = text_states(tower, tokenizer, captions)
    inverse = torch.linalg.pinv(clip.text_projection.weight.float(), atol=atol)
    h = closed_form(e, inverse, stats["normed_norm"])
    cos = torch.nn.functional.cosine_similarity
    report = {"normed_eos": cos(h, found["normed"], dim=-1).mean().item()}
    eos = eos_positions(found["ids"], tokenizer.eos_token_id)
    after = torch.arange(found["ids"].shape[1])[None, :] >= eos[:, None]
    for mode in MODES:
        x = to_penultimate(h, getattr(tower, "text_model", tower).final_layer_norm, stats, mode)
        report[f"{mode}_eos"] = cos(x, found["penultimate"], dim=-1).mean().item()
        report[f"{mode}_tail"] = ((cos(x[:, None], found["penultimate_all"], dim=-1) * after).sum()
                                  / after.sum()).item()
    return report


def main() -> int:
    torch.set_num_threads(1)
    rows = measure()
    print("| encoder | " + " | ".join(KEYS) + " |")
    print("|---|" + "---|" * len(KEYS))
    for name, report in rows.items():
        print(f"| {name} | " + " | ".join(f"{report[k]:.3f}" for k in KEYS) + " |")
    images = measure_images()
    print("\nbundled shapes CLIP, 64 shapes-world pictures converted, against their captions (cosine):\n")
    print("| " + " | ".join(images) + " |")
    print("|" + "---|" * len(images))
    print("| " + " | ".join(f"{v:.3f}" for v in images.values()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
