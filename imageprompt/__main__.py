import sys

from imageprompt.cli import main

sys.exit(main())
