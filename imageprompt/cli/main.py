"""The ``imageprompt`` command line.

Each subcommand lives in a module that defines ``register(subparsers)``, listed
in :data:`COMMAND_MODULES`; this file holds ``vary``/``edit`` and the entry
point, whose error handling turns known failures into one line and a non-zero
exit (``--debug`` shows the traceback). Shared options: :mod:`imageprompt.cli.common`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import sys
import warnings
from pathlib import Path

from imageprompt.cli.common import (
    EXIT_FAILURE,
    EXIT_USAGE,
    SEED_MAX,
    CommandError,
    adapter_inputs,
    add_model_options,
    add_sampling_options,
    base_parameters,
    cap_prompt_options,
    check_out_dir,
    finite_float,
    free_names,
    load_pipeline_from_args,
    user_errors,
    warn_fitted,
    warn_unknown_words,
    write_outputs,
)
from imageprompt.images import generators
from imageprompt.progress import SAMPLING, labelled

# Modules that add subcommands (each defines register(subparsers)); kept import-light.
COMMAND_MODULES = [
    "imageprompt.cli.main",  # vary, edit
    "imageprompt.bench.main",
    "imageprompt.cli.adapter",  # train-adapter
    "imageprompt.world.train_controlnet",  # train-controlnet
    "imageprompt.cli.p2p",  # p2p
    "imageprompt.cli.style",  # style-aligned
    "imageprompt.cli.demo",
    "imageprompt.cli.batch",
    "imageprompt.cli.tune",  # tune domain|online
    "imageprompt.world.evaluate",  # eval --suite world
    "imageprompt.cli.words",  # words: the bundled model's vocabulary
]


# -------------------------------------------------------------- vary / edit
def register(subparsers) -> None:
    from imageprompt.cli.adapter import add_adapter_options
    from imageprompt.cli.toolbox import add_toolbox_options
    from imageprompt.cli.tune import add_tuning_options

    vary = subparsers.add_parser("vary", help="variations of an image (SD-IPC)",
                                 description="Image variation by SD-IPC's closed-form image-to-prompt conversion.")
    vary.add_argument("image", help="reference image")
    add_sampling_options(vary)
    add_model_options(vary)
    add_tuning_options(vary)
    add_adapter_options(vary)
    add_toolbox_options(vary)
    vary.set_defaults(func=run_sdipc, method="sdipc-variation")

    edit = subparsers.add_parser("edit", help="edit an image with text (SD-IPC)",
                                 description="Image + text editing: the converted image prompt blended with text.")
    edit.add_argument("image", help="reference image")
    edit.add_argument("--prompt", required=True, help="the edit text, e.g. 'on the beach'")
    edit.add_argument("--alpha", type=finite_float, default=0.5,
                      help="weight of the text at positions EOS..76 (0.5-0.6)")
    add_sampling_options(edit)
    add_model_options(edit)
    add_tuning_options(edit)
    add_adapter_options(edit)
    add_toolbox_options(edit)
    edit.set_defaults(func=run_sdipc, method="sdipc-edit")


def run_sdipc(args) -> int:
    from imageprompt.cli.adapter import apply_adapter_options, check_adapter_options
    from imageprompt.cli.toolbox import apply_toolbox_options, check_toolbox_options
    from imageprompt.cli.tune import apply_tuning_options, check_tuning_options
    from imageprompt.images import load_image, sha256_file

    if args.method == "sdipc-edit" and not args.prompt.strip():
        raise CommandError("--prompt is empty")
    cap_prompt_options(args, "prompt", "negative_prompt")
    out_dir = check_out_dir(args.out)
    image = load_image(args.image)  # validate input before loading any model
    digest = sha256_file(args.image)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    if seed + args.num - 1 > SEED_MAX:
        raise CommandError(f"--seed {seed} with --num {args.num}: image i uses seed+i, which must stay at most "
                           f"{SEED_MAX}")
    check_tuning_options(args)
    check_adapter_options(args)
    toolbox = check_toolbox_options(args)
    pipe = load_pipeline_from_args(args)
    warn_fitted(pipe, encoded=[("", args.image, image), *adapter_inputs(args)])
    prompt = getattr(args, "prompt", None)
    alpha = getattr(args, "alpha", None)
    warn_unknown_words(pipe, [("--prompt", prompt), ("--negative-prompt", args.negative_prompt)])
    params = base_parameters(pipe, args, args.method)
    params.update(prompt=prompt, alpha=alpha, input=Path(args.image).name, input_sha256=digest)
    params.update(apply_tuning_options(pipe, args, [image], seed))
    adapter = apply_adapter_options(pipe, args, image)
    params.update(adapter["parameters"])
    extras = apply_toolbox_options(pipe, args, toolbox)
    params.update(extras["parameters"])

    names = free_names(out_dir, output_names(args, seed), args.overwrite)
    done = []
    for start in range(0, args.num, args.batch_size):
        count = min(args.batch_size, args.num - start)
        call = dict(image=image, prompt=prompt, alpha=alpha if alpha is not None else 0.5,
                    negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                    guidance_scale=args.guidance, num_images_per_prompt=count, height=args.height,
                    width=args.width, generator=generators(seed + start, count))
        with labelled(pipe, SAMPLING):
            result = pipe(**{**call, **adapter["pipeline"], **extras["pipeline"]})
        seeds = [seed + start + i for i in range(count)]
        metas = [dict(params, seed=s, width=im.size[0], height=im.size[1]) for s, im in zip(seeds, result.images)]
        done += write_outputs(result.images, out_dir, names[start:start + count], metas, args.overwrite)
    for path in done:
        print(path)
    return 0


def output_names(args, seed: int) -> list[str]:
    """``INPUT-KIND-SEED.png`` per image, KIND naming what made it: ``vary``/``edit`` (SD-IPC), ``adapter-vary``/
    ``adapter-edit`` (with --adapter), with ``-tuned`` after it for tuned SD-IPC (--tuned, --online-steps)."""
    kind = "vary" if args.method == "sdipc-variation" else "edit"
    if getattr(args, "adapter", None):
        kind = f"adapter-{kind}"
    if getattr(args, "tuned", None) or getattr(args, "online_steps", None):
        kind = f"{kind}-tuned"
    return [f"{Path(args.image).stem}-{kind}-{seed + i}.png" for i in range(args.num)]


# ----------------------------------------------------------------- entry
def check_package() -> None:
    """Exit with a sentence, not an ``AttributeError``, when ``imageprompt`` was imported as a namespace package:
    ``python -m imageprompt`` run from the folder that holds a clone named ``imageprompt`` (with an editable
    install) finds the clone before the package inside it."""
    import imageprompt

    if not hasattr(imageprompt, "__version__"):
        where = ", ".join(getattr(imageprompt, "__path__", [])) or "a folder"
        sys.exit(f"imageprompt: error: the folder {where} (a clone?) hides the installed imageprompt package: "
                 "run the command from another folder, such as the clone itself")


def build_parser() -> argparse.ArgumentParser:
    import imageprompt

    check_package()
    parser = argparse.ArgumentParser(prog="imageprompt", description="Prompt Stable Diffusion with images.")
    parser.add_argument("--version", action="version", version=f"imageprompt {imageprompt.__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args``, except that an unknown option is reported with its subcommand's usage
    (``imageprompt vary IMG --nmu 2`` shows ``vary``'s), not the top-level one."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        command = parser  # the deepest subcommand named, such as `tune online`
        while True:
            found = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
            chosen = found and found[0].choices.get(getattr(args, found[0].dest, None))
            if not chosen:
                break
            command = chosen
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _one_line_warnings(message, category, filename, lineno, file=None, line=None):
    print(f"imageprompt: warning: {message}", file=sys.stderr)


def _quiet_libraries() -> None:
    """Keep library chatter (load bars, deprecation notes) out of the user's terminal."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    warnings.simplefilter("ignore", FutureWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.showwarning = _one_line_warnings
    import logging

    for name in ("huggingface_hub", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    _quiet_libraries()
    import logging

    logging.basicConfig(format="imageprompt: %(message)s", level=logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("imageprompt: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        if isinstance(err, user_errors()):
            print(f"imageprompt: error: {err}", file=sys.stderr)
            return EXIT_FAILURE
        print(f"imageprompt: error: unexpected {type(err).__name__}: {err} (rerun with --debug for details)",
              file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
