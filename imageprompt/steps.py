"""Per-step logic of imageprompt's techniques, run through diffusers' step callback.

diffusers' denoising loops call ``callback_on_step_end(pipe, i, t, tensors)`` after
every UNet call ``i``. A second-order scheduler (Heun, KDPM2) makes two calls in one
denoising step, so the techniques, whose windows are fractions of the *denoising
steps* (prompt-to-prompt's ``int(f * (n + 1))``, the IP-Adapter step windows), count
them as diffusers' own progress bar does:

- call ``i`` belongs to denoising step ``i // scheduler.order``;
- the step is complete after call ``i`` when ``(i + 1) % order == 0`` or ``i`` is the last call.

:class:`DenoisingSteps` is a :class:`~diffusers.callbacks.PipelineCallback`: before the
first call of each step it runs the ``before_step`` hooks (``hook(step)``), after the
last call of each step the ``after_step`` hooks (``hook(pipe, step, tensors) -> tensors``),
then the user's own callback with diffusers' arguments, unchanged (one repair: a callback that turns
classifier-free guidance off, as diffusers' ``SDCFGCutoffCallback`` does, keeps the conditional half of every
prompt's embeddings, :func:`conditional_half`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback


def step_of_call(call: int, order: int) -> int:
    """The denoising step that UNet call ``call`` belongs to (diffusers' ``i // scheduler.order``)."""
    return call // max(int(order), 1)


def completes_step(call: int, order: int, num_calls: int) -> bool:
    """Whether UNet call ``call`` is the last one of its denoising step."""
    return (call + 1) % max(int(order), 1) == 0 or call == num_calls - 1


class DenoisingSteps(PipelineCallback):
    """imageprompt's per-step hooks and the user's ``callback_on_step_end``, as one diffusers callback.

    Args:
        before_step: ``hook(step)`` run before the first UNet call of each denoising step; :meth:`start`
            runs them for step 0 (call it before the pipeline's loop).
        after_step: ``hook(pipe, step, tensors) -> tensors`` run after the last UNet call of each step.
        tensor_inputs: the loop tensors the hooks read or replace.
        then: the user's callback (a function, a ``PipelineCallback`` or ``MultiPipelineCallbacks``), called
            after every UNet call as diffusers calls it.
        then_inputs: the tensors the user's function asks for (``callback_on_step_end_tensor_inputs``).
    """

    def __init__(self, before_step: Sequence[Callable] = (), after_step: Sequence[Callable] = (),
                 tensor_inputs: Sequence[str] = (), then: Callable | None = None, then_inputs: Sequence[str] = ()):
        super().__init__()
        self.before_step, self.after_step, self.then = list(before_step), list(after_step), then
        if isinstance(then, (PipelineCallback, MultiPipelineCallbacks)):
            then_inputs = then.tensor_inputs
        self._inputs = list(dict.fromkeys([*tensor_inputs, *(then_inputs or ())]))

    @property
    def tensor_inputs(self) -> list[str]:
        return self._inputs

    def start(self) -> None:
        for hook in self.before_step:
            hook(0)

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        order = getattr(pipeline.scheduler, "order", 1)
        step = step_of_call(step_index, order)
        if completes_step(step_index, order, pipeline.num_timesteps):
            for hook in self.after_step:
                callback_kwargs = hook(pipeline, step, callback_kwargs)
            if step_index + 1 < pipeline.num_timesteps:
                for hook in self.before_step:
                    hook(step + 1)
        if self.then is not None:
            guided = pipeline.do_classifier_free_guidance
            before = dict(callback_kwargs)
            callback_kwargs.update(self.then(pipeline, step_index, timestep, callback_kwargs) or {})
            if guided and not pipeline.do_classifier_free_guidance:
                conditional_half(before, callback_kwargs)
        return callback_kwargs


def conditional_half(before: dict, after: dict) -> None:
    """After a callback turned classifier-free guidance off: the conditional half of each ``[negative, positive]``
    tensor. diffusers' CFG cutoff callbacks keep ``[-1:]``, the conditional row of a batch of one; our pipelines
    sample several prompts (an edit's source and targets, a style set) in one batch."""
    for name in ("prompt_embeds", "add_text_embeds", "add_time_ids"):
        old, new = before.get(name), after.get(name)
        if old is not None and new is not None and new.shape[0] < old.shape[0] // 2:
            after[name] = old[old.shape[0] // 2:]
