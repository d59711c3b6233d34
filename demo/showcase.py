"""The examples each tab of the demo shows, chosen from what the bundled model draws reliably (issue 24).

One list of rows per tab, each row in the order of the tab's ``gr.Examples`` inputs; an image is named by its
file in ``demo/examples/``. ``tests/test_demo_examples.py`` runs every row through the served page at the tab's
defaults (seed 0, one image) on the bundled model and reads the pictures back with the world's reader.
How often each was right at seeds 0, 1 and 2 when it was chosen is in ``docs/bundled-model.md``.
"""

from __future__ import annotations

EXAMPLES: dict[str, list[list]] = {
    # [image]
    "variation": [["blue-triangle.png"], ["blue-square.png"], ["yellow-triangle.png"]],
    # [image, edit text, alpha]: the bundled model needs a larger alpha than SD 1.5's 0.5 to change a colour
    "edit": [["blue-square.png", "a yellow square", 0.8], ["blue-square.png", "a red square", 1.0]],
    # [image prompt, text prompt]
    "ip_adapter": [["blue-triangle.png", ""], ["yellow-triangle.png", "on a black background"],
                   ["red-circle.png", "on a black background"]],
    # [source, target, mode, blend words, word weights]
    "p2p": [["a large yellow triangle in the center", "a large green triangle in the center", "replace", "triangle",
             ""],
            ["a large blue square at the top", "a large red square at the top", "replace", "", ""],
            ["a large red triangle in the center", "", "reweight", "", "red=2"]],
    # [photo, source, target]
    "real_edit": [["red-circle.png", "a large red circle in the center on a white background",
                   "a large blue circle in the center on a white background"],
                  ["blue-square.png", "a large blue square in the center on a gray background",
                   "a large red square in the center on a gray background"]],
    # [source, target, mask words]
    "masactrl": [["a large blue square at the top", "a large blue square at the bottom", ""],
                 ["a large yellow square in the center", "a large yellow triangle in the center", ""]],
    # [prompts, one a line: the reference first]
    "style_aligned": [["a large red square on the left on a black background\na large red triangle on the right\n"
                       "a large red square at the top\na large red triangle at the bottom"]],
}
