"""What every console script shares: exit codes and one-line errors.

Exit codes (docs/design.md, section 6): 0 success, 2 bad input (one line naming the field), 1 internal
failure (one line; set ``MOE_SCALING_DEBUG=1`` for the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
from typing import Any, Callable, Iterator, Sequence, TextIO

from moe_scaling.errors import UserError
from moe_scaling.files import json_default

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage + message and exits 2
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def make_parser(prog: str, description: str, examples: str) -> argparse.ArgumentParser:
    """An argparse parser whose --help ends with examples and whose errors exit 2 on one line."""
    return _Parser(prog=prog, description=description, epilog="examples:\n" + examples,
                   formatter_class=argparse.RawDescriptionHelpFormatter)


def run_cli(prog: str, body: Callable[[Sequence[str] | None], int | None],
            argv: Sequence[str] | None = None) -> int:
    """Run ``body(argv)`` and map errors to exit codes with one line on stderr."""
    try:
        code = body(argv)
        return EXIT_OK if code is None else int(code)
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # the reader went away (e.g. `| head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place internal failures become exit 1
        if os.environ.get("MOE_SCALING_DEBUG"):
            traceback.print_exc()
        msg = str(err).splitlines()[0] if str(err) else ""
        print(f"{prog}: internal error: {type(err).__name__}: {msg}", file=sys.stderr)
        return EXIT_FAILURE


def print_json(obj: Any, file: TextIO | None = None) -> None:
    """Print one JSON object (numpy scalars converted) on stdout (or ``file``)."""
    print(json.dumps(obj, indent=2, default=json_default), file=file)


@contextlib.contextmanager
def result_stdout() -> Iterator[TextIO]:
    """Keep stdout for the command's result: yields a stream on the original stdout while everything
    else written to stdout goes to stderr, Python's ``print`` (``sys.stdout`` is ``sys.stderr``)
    and, when stdout is file descriptor 1, C and C++ libraries too (fd 1 is a copy of fd 2): e.g.
    gloo's ``[Gloo] Rank 0 is connected to 1 peer ranks`` lines in a multi-process run, which
    would break ``--json | jq``. Restored on exit."""
    original = result = sys.stdout
    try:
        fd = original.fileno()
    except (AttributeError, OSError, ValueError):   # a captured or replaced stdout: no descriptor
        fd = None
    if fd == 1:
        original.flush()
        result = os.fdopen(os.dup(1), "w", encoding=original.encoding)
        os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        yield result
    finally:
        sys.stdout = original
        if result is not original:
            os.dup2(result.fileno(), 1)
            result.close()            # flushes; a reader that went away is run_cli's BrokenPipeError
        else:
            result.flush()
