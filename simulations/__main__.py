"""``python -m simulations`` is the ``fedsam`` command."""

import sys

from simulations.cli import main

sys.exit(main())
