import sys

from imageprompt.cli.main import main

sys.exit(main())
