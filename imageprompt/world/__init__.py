"""The shapes world: generated scenes with ground truth (:mod:`.scenes`), the tokenizer of
its vocabulary (:mod:`.tokenizer`), the training of the bundled model (:mod:`.train`) and
the measurements of meaning (:mod:`.evaluate`, :mod:`.evaluate_edits`).

The scene API is re-exported here (``from imageprompt import world; world.render(...)``);
it needs only numpy and Pillow.
"""

from imageprompt.world.scenes import *  # noqa: F403
from imageprompt.world.scenes import __all__  # noqa: F401
