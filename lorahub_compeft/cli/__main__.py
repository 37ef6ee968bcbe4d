import sys

from lorahub_compeft.cli import main

sys.exit(main())
