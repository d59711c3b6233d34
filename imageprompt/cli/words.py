"""``imageprompt words``: the words the bundled shapes-world model knows, and prompts that use them."""

from __future__ import annotations

import textwrap

EXAMPLE_PROMPTS = (
    "a red circle on the left",
    "a large blue square in the center on a black background",
    "a small green triangle at the top and a yellow circle at the bottom",
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "words", help="list the words the bundled shapes-world model knows",
        description="The bundled model (checkpoints/shapes-sd) was trained on captions of a world of coloured "
                    "shapes, and its tokenizer knows only their words. Any other word is split into letters the "
                    "model never saw, so it means nothing to it (the commands warn when a prompt has one). "
                    "Stable Diffusion 1.5 (--model) knows English.",
    )
    parser.set_defaults(func=run_words)


def run_words(args) -> int:
    from imageprompt.vocabulary import bundled_vocabulary

    words = bundled_vocabulary()
    print(f"The bundled shapes-world model knows these {len(words)} words:")
    print(textwrap.fill(" ".join(words), width=100, initial_indent="  ", subsequent_indent="  "))
    print("Its captions read like these; prompts in the same form work best:")
    for prompt in EXAMPLE_PROMPTS:
        print(f"  {prompt}")
    return 0
