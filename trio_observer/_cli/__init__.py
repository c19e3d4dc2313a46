"""The command line, one module per subcommand; :func:`program` is the entry point."""

from ._main import main as main
from ._main import program as program

__all__ = ["main", "program"]
