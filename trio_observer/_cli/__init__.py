"""The command line, one module per subcommand; :func:`main` is the entry point."""

from ._main import main as main

__all__ = ["main"]
