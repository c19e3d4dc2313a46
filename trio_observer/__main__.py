"""``python -m trio_observer``: the same as the ``trio-observer`` command."""

from ._cli import program

program()
