"""The ``imageprompt`` command line: one module per command group; the entry point is
:func:`imageprompt.cli.main.main`. Shared options and errors: :mod:`imageprompt.cli.common`."""
