import sys

from sitn.cli import main

sys.exit(main())
