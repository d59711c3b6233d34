"""The examples each tab of the demo shows, chosen from what the bundled model draws reliably (issue 24).

One list of rows per tab, each row in the order of the tab's ``gr.Examples`` inputs; an image is named by its
file in ``demo/examples/``. ``tests/test_demo_examples.py`` runs every row through the served page at the tab's
defaults (seed 0, one image) on the bundled model and reads the pictures back with the world's reader.
"""

from __future__ import annotations

EXAMPLES: dict[str, list[list[str]]] = {
    # [image]
    "variation": [["blue-triangle.png"], ["blue-square.png"], ["green-triangle-yellow-circle.png"]],
    # [image, edit text]
    "edit": [["red-circle.png", "a blue circle"], ["blue-square.png", "a yellow square on a black background"]],
    # [image prompt, text prompt]
    "ip_adapter": [["red-circle.png", ""], ["blue-square.png", "on a black background"]],
    # [source, target, mode, blend words, word weights]
    "p2p": [["a large red circle in the center", "a large blue circle in the center", "replace", "circle", ""],
            ["a red square on the left", "a red triangle on the left", "replace", "", ""],
            ["a green circle on the right", "", "reweight", "", "green=2"]],
    # [photo, source, target]
    "real_edit": [["red-circle.png", "a large red circle in the center on a white background",
                   "a large blue circle in the center on a white background"]],
    # [source, target, mask words]
    "masactrl": [["a large red circle on the left", "a large red square on the left", ""],
                 ["a large blue square at the top", "a large blue square at the bottom", ""]],
    # [prompts, one a line: the reference first]
    "style_aligned": [["a large red circle on the left on a black background\na large red square on the right\n"
                       "a large red triangle at the top\na large red circle at the bottom"]],
}
