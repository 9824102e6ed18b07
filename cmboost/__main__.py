"""`python -m cmboost`: the command line, as the `cmboost` console script runs it."""

import sys

from cmboost.cli import main

sys.exit(main())
