"""The project's one error contract and command-line policy, shared by every command.

train.py, evaluate.py, render.py, view.py, plot_kl.py, bench.py, bench_data.py, bench_view.py and
dataset/{convert2torch,download,shepard_metzler,import_scenes,export_scenes}.py all parse flags with
`ArgumentParser` (no abbreviated flags; a bad flag or value is one `error: ...` line and exit status 1, never
argparse's usage block and status 2) and run through `main`, which turns a `UserError` (bad input: a flag, file or
folder at fault, named in the message) into that line.
DatasetError and CheckpointError are UserErrors. This module imports nothing of the project's, so any module may
import it.
"""
import argparse
import os
import sys


class UserError(Exception):
    """Bad input (flag, file, folder, run state): printed as one `error: ...` line, exit status 1."""


def one_line(text):
    """str(text) fit for a one-line error message: control characters (a newline in a name read from a file, or in
    a library's message) escaped as repr shows them; printable text unchanged."""
    text = str(text)
    return text if text.isprintable() else repr(text)[1:-1]


class Interrupted(Exception):
    """A signal stopped the command: `message` says what was kept and how to go on; exit status `code`."""

    def __init__(self, message, code=130):
        super().__init__(message)
        self.code = code


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's rules: flags spelled out in full, errors as UserError (one line, exit 1)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        # An unknown flag is the error to report, before any "required" one it may have been meant to be.
        argv = sys.argv[1:] if args is None else list(args)
        known = {o for a in self._actions for o in a.option_strings}
        for token in argv:
            if token == "--":
                break
            if token.startswith("--") and token.split("=", 1)[0] not in known:
                self.error(f"unrecognized arguments: {token.split('=', 1)[0]}")
        return super().parse_args(argv, namespace)

    def error(self, message):
        # "argument --flag: expected ..." -> "--flag: expected ...": the line names the flag first, as every error does
        raise UserError(message[len("argument "):] if message.startswith("argument --") else message)


def main(run, argv=None, interrupted="interrupted"):
    """run(argv) with the contract: UserError -> `error: ...` on stderr, exit 1; Ctrl-C -> `interrupted`, exit 130
    (or the command's own Interrupted: its message and status).

    Under torchrun every rank reaches the same error (distributed.agreed); only rank 0 prints it.
    """
    speaks = os.environ.get("RANK", "0") == "0"
    try:
        return run(argv)
    except UserError as e:
        if speaks:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as e:
        if speaks:
            print(f"\n{e}", file=sys.stderr)
        sys.exit(e.code)
    except KeyboardInterrupt:
        if speaks:
            print(f"\n{interrupted}", file=sys.stderr)
        sys.exit(130)


# ------------------------------------------------------------------------------------------------ flag types
# argparse reports an ArgumentTypeError as "argument --flag: <message>", which ArgumentParser.error makes one line.

def str2bool(s):
    """True/False/1/0 (any case): `type=bool` would read "False" as True."""
    low = str(s).strip().lower()
    if low in ("true", "1"):
        return True
    if low in ("false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected True/False/1/0, got {s!r}")


def _integer(s, low, what):
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
    if n < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
    return n


def positive_int(s):
    return _integer(s, 1, "a positive integer")


def port_number(s):
    n = _integer(s, 1, "a port, 1 to 65535")
    if n > 65535:
        raise argparse.ArgumentTypeError(f"expected a port, 1 to 65535, got {s!r}")
    return n


def nonneg_int(s):
    return _integer(s, 0, "a non-negative integer")


def _number(s, lowest_ok, what):
    try:
        x = float(s)
    except ValueError:
        x = float("nan")
    if not ((x >= 0 if lowest_ok else x > 0) and x != float("inf")):
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
    return x


def positive_float(s):
    return _number(s, False, "a positive number")


def nonneg_float(s):
    return _number(s, True, "a non-negative number")


def unit_float(s):
    x = _number(s, True, "a number from 0 to 1")
    if x > 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {s!r}")
    return x


def open_device(name, flag="--device"):
    """torch.device(name), checked by allocating on it: a missing CUDA device is one clear line."""
    import torch

    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise UserError(f"{flag} {name}: not available ({str(e).splitlines()[0]})") from None
    return device
