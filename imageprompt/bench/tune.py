"""Measurements of SD-IPC tuning: a speed/memory row for ``imageprompt bench`` and subject fidelity.

- Row ``sdipc online tuning, 30 iterations``: seconds for the whole online
  tuning of one reference (encoding it, then 30 iterations of batch 4) and peak
  memory, with SD 1.5 shapes in the benchmark's dtype (fp16 or bf16 mixed
  precision on a GPU). Its "s/image" column holds the total seconds.
- :func:`subject_fidelity`: :mod:`imageprompt.world.evaluate`'s SD-IPC variation and
  edit rows (colour, shape, position kept) untuned, domain-tuned and
  online-tuned. Run it on the bundled model::

      python -m imageprompt.bench.tune fidelity            # --quick: evaluate's small settings
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

from imageprompt.bench.common import measure

ONLINE_ITERATIONS = 30
DOMAIN_SEED = 20_241  # domain-tuning scenes: other draws than evaluate's references


def online_tuning_row(ctx):
    from imageprompt.tuning import TuningConfig, remove_tuning, tune_online

    pipe = ctx.imageprompt_pipeline()
    image = ctx.reference_image()
    config = TuningConfig.online(steps=ONLINE_ITERATIONS, resolution=ctx.size)

    def call():
        try:
            tune_online(pipe, [image], config, progress=False)
        finally:
            remove_tuning(pipe)  # the image encoder is shared with the other rows

    result = measure(ctx, call, images=1)
    result.note = f"seconds for {ONLINE_ITERATIONS} iterations (batch {config.batch_size}) incl. encoding"
    return result


# -------------------------------------------------------------- fidelity
class OnlineTuned:
    """A pipeline that first tunes online on each reference image, then generates from it.

    Lets any measurement that calls ``pipe(image=[...], ...)`` (such as those of
    :mod:`imageprompt.world.evaluate`) measure online tuning unchanged: generator ``k``
    of the batch still goes with the same output image.
    """

    def __init__(self, pipe, config):
        self.pipe, self.config = pipe, config

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, image, prompt=None, generator=None, num_images_per_prompt: int = 1, **kwargs):
        import numpy as np
        import torch

        from imageprompt.pipelines import ImagePromptPipelineOutput
        from imageprompt.tuning import remove_tuning, tune_online

        images = list(image) if isinstance(image, (list, tuple)) else [image]
        per = num_images_per_prompt
        out = []
        for i, reference in enumerate(images):
            text = prompt[i] if isinstance(prompt, list) else prompt
            gens = generator[i * per : (i + 1) * per] if isinstance(generator, list) else generator
            tune_online(self.pipe, [reference], self.config, progress=False)
            try:
                out.append(self.pipe(image=reference, prompt=text, generator=gens, num_images_per_prompt=per,
                                     **kwargs).images)
            finally:
                remove_tuning(self.pipe)
        if isinstance(out[0], list):  # PIL images
            return ImagePromptPipelineOutput(images=[im for chunk in out for im in chunk])
        stack = torch.cat if isinstance(out[0], torch.Tensor) else np.concatenate
        return ImagePromptPipelineOutput(images=stack(out))


ROWS = {f"sdipc online tuning, {ONLINE_ITERATIONS} iterations (s total)": online_tuning_row}

MEASURED = ("SD-IPC variation", "SD-IPC edit")


def subject_fidelity(pipe, settings=None, online_steps: int = ONLINE_ITERATIONS, domain_images: int = 100,
                     domain_steps: int = 300, seed: int = 0, measurements=MEASURED) -> list:
    """:mod:`imageprompt.world.evaluate`'s SD-IPC rows untuned, domain-tuned and online-tuned.

    Same references, prompts and generator seeds in every condition; the
    condition is appended to the measurement name. Domain tuning uses
    ``domain_images`` shapes-world scenes drawn from :data:`DOMAIN_SEED`
    (``0`` skips it); ``online_steps=0`` skips online tuning.
    """
    from imageprompt import world
    from imageprompt.tuning import TuningConfig, remove_tuning, tune_domain
    from imageprompt.world import evaluate

    settings = settings or evaluate.EvalSettings()
    pipe.set_progress_bar_config(disable=True)
    remove_tuning(pipe)
    conditions = [("untuned", lambda: pipe)]
    if domain_images:
        def domain_tuned():
            scenes = world.sample_scenes(DOMAIN_SEED, 0, domain_images)
            tune_domain(pipe, [s.image for s in scenes], TuningConfig.domain(steps=domain_steps, seed=seed),
                        progress=False)
            return pipe

        conditions.append((f"domain-tuned {domain_images} images, {domain_steps} steps", domain_tuned))
    if online_steps:
        config = TuningConfig.online(steps=online_steps, seed=seed)
        conditions.append((f"online-tuned {online_steps} iterations", lambda: OnlineTuned(pipe, config)))

    rows = []
    for label, prepare in conditions:
        target = prepare()
        try:
            for name in measurements:
                for r in evaluate.MEASUREMENTS[name](target, settings):
                    rows.append(replace(r, measurement=f"{r.measurement} [{label}]"))
        finally:
            remove_tuning(pipe)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imageprompt.bench.tune",
                                     description="Subject fidelity of SD-IPC with and without tuning, measured "
                                                 "as imageprompt.world.evaluate measures it.")
    parser.add_argument("what", choices=["fidelity"])
    parser.add_argument("--model", help="default: the bundled shapes model")
    parser.add_argument("--clip", help="default: the bundled shapes CLIP")
    parser.add_argument("--device")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--quick", action="store_true", help="evaluate's quick settings")
    parser.add_argument("--samples", type=int, help="references per measurement (default: evaluate's)")
    parser.add_argument("--online-steps", type=int, default=ONLINE_ITERATIONS, help="0 skips online tuning")
    parser.add_argument("--domain-images", type=int, default=100, help="0 skips domain tuning")
    parser.add_argument("--domain-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from imageprompt.pipelines.loading import load_pipeline
    from imageprompt.world import evaluate

    settings = evaluate.EvalSettings.quick() if args.quick else evaluate.EvalSettings()
    if args.samples:
        settings.samples = args.samples
    if args.model is None and args.clip is None:
        from imageprompt.checkpoints import BUNDLED_CLIP, BUNDLED_MODEL

        args.model, args.clip = str(BUNDLED_MODEL), str(BUNDLED_CLIP)
    pipe = load_pipeline(args.model, args.clip, args.dtype, args.device)
    start = time.perf_counter()
    rows = subject_fidelity(pipe, settings, args.online_steps, args.domain_images, args.domain_steps, args.seed)
    print(f"{pipe.model_name}: {settings.samples} references x {settings.images_per_sample} images, "
          f"{settings.steps} steps, {pipe.device}, {time.perf_counter() - start:.0f} s")
    print(evaluate.format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
