"""The one exception type a user ever sees: the CLI prints its message on one line and exits with EXIT_USAGE."""

EXIT_USAGE = 2  # bad input: a path, a file's contents, a flag's value (argparse uses 2 as well)


class SPJError(Exception):
    """Bad input or a failed check. The message names the thing and the problem, e.g. `data/x.txt: not UTF-8 text`."""
