"""Run by tests/test_cm_*.py under torchrun: `cmboost` with the argument list read from a JSON file."""

import json
import sys

from cmboost.cli import main

sys.exit(main(json.loads(open(sys.argv[1]).read())))
