"""`python -m yellowfin` runs the command line."""

import sys

from yellowfin.cli import main

sys.exit(main())
