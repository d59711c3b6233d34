"""Page parts shared by the tabs: the image upload, the "Advanced options" controls, the result views."""

from __future__ import annotations

import random
from dataclasses import dataclass

import gradio as gr
from imageprompt.demo.context import DemoContext
from imageprompt.demo.limits import EXAMPLES_DIR, SEED_MAX
from imageprompt.demo.showcase import EXAMPLES
from imageprompt.demo.validation import readable_upload_errors


@dataclass
class SamplingControls:
    """The components of the "Advanced options" accordion; ``inputs`` is the order the handlers take them in."""

    num_images: gr.Slider | None
    steps: gr.Slider
    guidance: gr.Slider
    seed: gr.Number | None
    width: gr.Slider
    height: gr.Slider
    negative_prompt: gr.Textbox

    @property
    def inputs(self) -> list:
        parts = [self.num_images, self.steps, self.guidance, self.seed, self.width, self.height, self.negative_prompt]
        return [p for p in parts if p is not None]


def image_input(label: str = "Image", elem_id: str | None = None) -> gr.Image:
    # filepath: the handler opens only the file gradio wrote into its upload folder
    image = gr.Image(label=label, type="filepath", image_mode=None, sources=["upload", "clipboard"], height=280,
                     elem_id=elem_id)
    image.preprocess = readable_upload_errors(image.preprocess)
    return image


def shapes_examples(tab: str, inputs: list) -> gr.Examples:
    """The tab's examples of :data:`imageprompt.demo.showcase.EXAMPLES`, image names made paths."""
    rows = [[str(EXAMPLES_DIR / v) if str(v).endswith(".png") else v for v in row] for row in EXAMPLES[tab]]
    return gr.Examples(rows, inputs, label="Examples (shapes world)")


def sampling_controls(ctx: DemoContext, guidance: float = 7.5, num: bool = True, seed: bool = True) -> SamplingControls:
    """Steps, guidance, seed (with a randomise button), size, number of images, negative prompt."""
    low, high = ctx.size_range
    native = ctx.native_size
    with gr.Row():
        num_images = gr.Slider(1, ctx.max_images, value=1, step=1, label="Number of images") if num else None
        steps = gr.Slider(1, ctx.max_steps, value=ctx.default_steps, step=1, label="Steps")
        guidance_slider = gr.Slider(0.0, 20.0, value=guidance, step=0.5, label="Guidance scale")
    seed_box = None
    if seed:
        with gr.Row(equal_height=True):
            seed_box = gr.Number(value=0, precision=0, minimum=0, maximum=SEED_MAX,
                                 label="Seed (image i uses seed + i)", scale=3)
            dice = gr.Button("Random seed", scale=1, size="sm")
        dice.click(lambda: random.randint(0, SEED_MAX), None, seed_box, queue=False, api_visibility="private")
    with gr.Row():
        width = gr.Slider(low, high, value=native, step=ctx.size_step, label="Width")
        height = gr.Slider(low, high, value=native, step=ctx.size_step, label="Height")
    negative = gr.Textbox(label="Negative prompt", placeholder="(empty prompt)", max_lines=2)
    return SamplingControls(num_images, steps, guidance_slider, seed_box, width, height, negative)


def result_outputs(name: str, label: str = "Results") -> tuple[gr.Gallery, gr.File]:
    gallery = gr.Gallery(label=label, columns=2, height=420, object_fit="contain", buttons=["download", "fullscreen"],
                         format="png", interactive=False, elem_id=f"{name}-gallery")
    files = gr.File(label="Download PNGs (parameters in the PNG metadata)", file_count="multiple", interactive=False,
                    elem_id=f"{name}-files")
    return gallery, files


# ------------------------------------------------------- prompt-to-prompt
def edit_controls() -> dict:
    """Target prompt, mode, blend and weight words (the step fractions: :func:`step_controls`)."""
    target = gr.Textbox(label="Target prompt", placeholder="the source prompt with words changed", max_lines=2)
    mode = gr.Radio(["replace", "refine", "reweight"], value="replace", label="Mode",
                    info="replace: same word count · refine: words added or removed · reweight: only word weights")
    with gr.Row():
        blend = gr.Textbox(label="Blend words (only their region changes)", placeholder="e.g. circle", max_lines=1)
        weights = gr.Textbox(label="Word weights", placeholder="e.g. blue=2, large=0.5", max_lines=1)
    return dict(target=target, mode=mode, blend=blend, weights=weights)


def step_controls() -> dict:
    with gr.Row():
        cross = gr.Slider(0.0, 1.0, value=0.8, step=0.05, label="Cross-attention steps (fraction)")
        self_ = gr.Slider(0.0, 1.0, value=0.4, step=0.05, label="Self-attention steps (fraction)")
        threshold = gr.Slider(0.0, 1.0, value=0.3, step=0.05, label="Blend threshold")
    with gr.Row():
        exclude = gr.Textbox(value="", label="Blend: exclude words (their region never changes)",
                             placeholder="e.g. square", max_lines=1)
        start = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="Blend start (fraction of the steps)")
    return dict(cross=cross, self=self_, threshold=threshold, exclude=exclude, start=start)


def p2p_outputs(name: str) -> tuple[gr.Gallery, gr.Image, gr.File]:
    with gr.Row():
        gallery = gr.Gallery(label="Source and edit", columns=2, height=320, object_fit="contain",
                             buttons=["download", "fullscreen"], interactive=False, elem_id=f"{name}-gallery")
        maps = gr.Image(label="Cross-attention maps (per word, source row then edit row)", type="filepath",
                        interactive=False, height=320, elem_id=f"{name}-maps")
    files = gr.File(label="Download PNGs (parameters in the PNG metadata)", file_count="multiple", interactive=False,
                    elem_id=f"{name}-files")
    return gallery, maps, files
