import sys

from tunebook.cli import main

sys.exit(main())
