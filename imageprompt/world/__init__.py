"""The shapes world: generated scenes with ground truth (:mod:`.scenes`), reading them back
from pixels (:mod:`.reader`), the tokenizer of its vocabulary (:mod:`.tokenizer`), the
bundled model's architecture (:mod:`.models`), its training (:mod:`.train`), the probes
of how it reads text (:mod:`.probe`) and the measurements of meaning (:mod:`.evaluate`,
:mod:`.evaluate_edits`, sharing :mod:`.measures`).

The scene and reader APIs are re-exported here (``from imageprompt import world;
world.render(...)``); they need only numpy and Pillow.
"""

from imageprompt.world.reader import *  # noqa: F403
from imageprompt.world.reader import __all__ as _reader_all
from imageprompt.world.scenes import *  # noqa: F403
from imageprompt.world.scenes import __all__ as _scenes_all

__all__ = [*_scenes_all, *_reader_all]
