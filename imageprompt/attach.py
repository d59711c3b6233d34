"""imageprompt's techniques on any diffusers pipeline: processors, an editor and the step callback for a ``with``.

::

    with attach(pipe, PromptToPromptSettings("replace"), [source, target]) as callback:
        images = pipe(prompt=[source, target], latents=noise.expand(2, -1, -1, -1),
                      callback_on_step_end=callback).images

:func:`attach` puts imageprompt's processors on ``pipe.unet`` (:mod:`imageprompt.attention`; the ones it
found come back at the end), chains the technique's editor on them (``editor_attached``) and yields
an :class:`Attachment`, a :class:`~imageprompt.steps.DenoisingSteps` callback for ``callback_on_step_end``. Its
technique is set up on the first UNet call of each pipeline call (the latent size and the number of denoising
steps, which img2img's ``strength`` shortens, are known only then), so one ``with`` serves several calls and any
diffusers pipeline that has ``callback_on_step_end``: text-to-image, img2img, inpainting, ControlNet, SDXL. The
image adapters' step windows (:func:`~imageprompt.ip_adapter.set_adapter_step`) follow the same steps.
Our own pipelines sample through it too (``ImagePromptMixin.sample``): one path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

from imageprompt.attention import AttentionEditor, ImagePromptAttnProcessor, imageprompt_processors
from imageprompt.ip_adapter import set_adapter_step
from imageprompt.masactrl import MasaCtrlSettings, MutualSelfAttentionController
from imageprompt.p2p import PromptToPromptController, PromptToPromptSettings, default_resolution
from imageprompt.steps import DenoisingSteps
from imageprompt.style_aligned import StyleAlignedController, StyleAlignedSettings, shared_group_norm


def denoising_steps(num_calls: int, order: int) -> int:
    """Denoising steps of a loop of ``num_calls`` UNet calls (Heun's ``2n - 1`` calls are ``n`` steps)."""
    order = max(int(order), 1)
    return (num_calls + order - 1) // order


def make_editor(pipe, technique, prompts: Sequence[str] | None = None) -> AttentionEditor | None:
    """The editor of ``technique``: an editor as it is, or one made from a technique's settings and ``prompts``
    (the source first)."""
    if technique is None or isinstance(technique, AttentionEditor):
        return technique
    if isinstance(technique, (PromptToPromptSettings, MasaCtrlSettings, StyleAlignedSettings)):
        if not prompts or isinstance(prompts, str) or len(prompts) < 2:
            raise ValueError("give the prompts: the source (or style reference) first, then at least one more")
        if isinstance(technique, StyleAlignedSettings):
            return StyleAlignedController(len(prompts), settings=technique)
        kind = PromptToPromptController if isinstance(technique, PromptToPromptSettings) \
            else MutualSelfAttentionController
        return kind(pipe.tokenizer, prompts[0], list(prompts[1:]), settings=technique,
                    length=pipe.tokenizer.model_max_length)
    raise TypeError(f"attach takes PromptToPromptSettings, MasaCtrlSettings, StyleAlignedSettings or an "
                    f"AttentionEditor, got {type(technique).__name__}")


class Attachment(DenoisingSteps):
    """The step callback of :func:`attach` (pass it as ``callback_on_step_end``); ``editor`` is the technique's
    controller (prompt-to-prompt's attention maps and blend mask are read off it after the call)."""

    def __init__(self, pipe, editor=None, before_step: Sequence[Callable] = (), after_step=None,
                 tensor_inputs: Sequence[str] = ("latents",), then=None, then_inputs: Sequence[str] = ()):
        self.pipe, self.editor, self.num_steps, self.fresh = pipe, editor, None, True
        steps = getattr(editor, "set_step", None)
        if after_step is None:  # the editor's own end of step (prompt-to-prompt's local blend)
            after_step = [self.end_step] if hasattr(editor, "end_step") else []
        super().__init__([self.adapter_step, *([steps] if steps else []), *before_step], [*after_step, self.done],
                         tensor_inputs, then, then_inputs)

    def adapter_step(self, step: int) -> None:
        set_adapter_step(self.pipe.unet, step, self.num_steps)

    def end_step(self, pipe, step, tensors):
        tensors["latents"] = self.editor.end_step(tensors["latents"])
        return tensors

    def done(self, pipe, step, tensors):
        if step + 1 >= self.num_steps:  # the next UNet call starts another pipeline call
            self.fresh = True
            set_adapter_step(pipe.unet, None)
        return tensors

    def first_call(self, module, args, kwargs) -> None:
        """A UNet forward pre-hook: on the first call of a pipeline call, set the technique up and run step 0's
        hooks (diffusers sets ``num_timesteps`` before its loop)."""
        if not self.fresh:
            return
        self.fresh = False
        sample = args[0] if args else kwargs["sample"]
        self.num_steps = denoising_steps(unet_calls(self.pipe), getattr(self.pipe.scheduler, "order", 1))
        size = tuple(sample.shape[-2:])
        if hasattr(self.editor, "setup"):
            self.editor.setup(self.num_steps, size, sample.device, default_resolution(module.config, size[0]))
        self.start()

    def legacy_callback(self, step: int, timestep, latents) -> None:
        """The same hooks for a pipeline that has only the older ``callback(step, timestep, latents)``, called after
        each denoising step (T2I-Adapter's ``StableDiffusionAdapterPipeline``: ``callback=attachment.legacy_callback``);
        the latents are replaced in place. The user's ``callback_on_step_end`` is not run there."""
        tensors = {"latents": latents}
        for hook in self.after_step:
            tensors = hook(self.pipe, step, tensors)
        if tensors["latents"] is not latents:
            latents.copy_(tensors["latents"])
        if step + 1 < self.num_steps:
            for hook in self.before_step:
                hook(step + 1)


def unet_calls(pipe) -> int:
    """The UNet calls of the loop about to run: diffusers' ``num_timesteps``, or, in pipelines that do not set it,
    the scheduler's timesteps from its begin index (img2img starts part-way)."""
    try:
        return int(pipe.num_timesteps)
    except AttributeError:
        begin = getattr(pipe.scheduler, "begin_index", None) or 0
        return len(pipe.scheduler.timesteps) - begin


def foreign_ip_adapter(unet) -> bool:
    """Whether diffusers' own IP-Adapter processors are on ``unet`` (ours would drop their image branch)."""
    return any("IPAdapter" in type(p).__name__ for p in unet.attn_processors.values())


@contextlib.contextmanager
def attach(pipe, technique=None, prompts: Sequence[str] | None = None, *, before_step: Sequence[Callable] = (),
           after_step: Sequence[Callable] | None = None, tensor_inputs: Sequence[str] = ("latents",),
           callback_on_step_end=None, callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",)):
    """``technique`` (prompt-to-prompt, MasaCtrl or StyleAligned settings with ``prompts``, an editor, or None:
    only the image adapters' step windows) on ``pipe.unet`` for the ``with`` block; yields the step callback.

    ``before_step`` / ``after_step`` hooks and ``tensor_inputs`` are :class:`~imageprompt.steps.DenoisingSteps`'
    (``after_step`` given replaces the editor's ``end_step``: call it there); ``callback_on_step_end`` is the
    user's, run after ours. Processors, editors, group-norm hooks and adapter steps are restored on exit.
    """
    unet = pipe.unet
    editor = make_editor(pipe, technique, prompts)
    procs = {n: p for n, p in unet.attn_processors.items() if not n.startswith("encoder_hid_proj.")}
    ours = all(isinstance(p, ImagePromptAttnProcessor) for p in procs.values())
    if not ours and foreign_ip_adapter(unet):
        raise ValueError("diffusers' IP-Adapter is loaded on this UNet: load it through an imageprompt pipeline "
                         "(`load_ip_adapter`) and pass its `ip_adapter_image_embeds`, or unload it first")
    original = None if ours else unet.attn_processors
    callback = Attachment(pipe, editor, before_step, after_step, tensor_inputs, callback_on_step_end,
                          callback_on_step_end_tensor_inputs)
    imageprompt_processors(unet)
    handle = unet.register_forward_pre_hook(callback.first_call, with_kwargs=True, prepend=True)  # before others'
    try:
        with contextlib.ExitStack() as stack:
            if editor is not None:
                stack.enter_context(editor.attached(unet))
            if isinstance(editor, StyleAlignedController) and editor.settings.share_group_norm:
                stack.enter_context(shared_group_norm(unet, editor.num_prompts))
            yield callback
    finally:
        handle.remove()
        set_adapter_step(unet, None)
        if original is not None:
            unet.set_attn_processor(original)
