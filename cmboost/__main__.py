import sys

from cmboost.cli import main

sys.exit(main())
