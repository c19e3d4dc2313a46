"""The program's name, as every subcommand prints it in its messages."""

from typing import Final

PROG: Final = "trio-observer"
