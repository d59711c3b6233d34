import sys

from imageprompt.cli.main import check_package, main

check_package()
sys.exit(main())
