"""How every command fails: one line ``error: ...`` on stderr and exit code 2, with nothing written."""

from __future__ import annotations

from contextlib import contextmanager
from typing import NoReturn

import typer

EXIT_USAGE = 2


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print ``error: <message>`` as one line on stderr and exit with ``code``."""
    typer.echo("error: " + " ".join(str(message).split()), err=True)
    raise typer.Exit(code)


# the package's expected errors: one ``error:`` line, exit 2 (anything else is a bug and keeps its traceback)
EXPECTED_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, TypeError)


@contextmanager
def cli_errors():
    """Map the package's expected errors (missing files, mismatched checkpoints, non-finite weights, existing
    outputs, bad arguments) to :func:`fail`."""
    try:
        yield
    except EXPECTED_ERRORS as err:
        fail(str(err))
    except KeyError as err:
        fail(str(err.args[0]) if err.args else repr(err))
    except OSError as err:
        fail(f"{getattr(err, 'filename', '') or ''} {err.strerror or err}".strip())
