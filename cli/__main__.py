"""``python -m pretag.cli``: the same as the ``pretag`` command."""

import sys

from pretag.cli import main

sys.exit(main())
