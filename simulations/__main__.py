"""``python -m simulations`` is the ``fedsam`` command."""

from simulations.cli import entry

entry()
