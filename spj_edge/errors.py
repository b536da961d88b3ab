"""The one exception type a user ever sees: the CLI prints its message on one line and exits with EXIT_USAGE."""

import argparse

EXIT_USAGE = 2  # bad input: a path, a file's contents, a flag's value (argparse uses 2 as well)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a bad flag ends in one line and EXIT_USAGE like any other bad input (argparse's own
    prints the whole usage first)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


class SPJError(Exception):
    """Bad input or a failed check. The message names the thing and the problem, e.g. `data/x.txt: not UTF-8 text`."""


def one_line(message: str) -> str:
    """`message` with its line breaks and other control characters escaped: a path may hold a newline."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in message)


def run_command(action) -> int:
    """Run a command's body: bad input ends in one line on stderr and EXIT_USAGE, never a traceback."""
    import sys

    try:
        action()
    except SPJError as e:
        print(f"spj-edge: error: {one_line(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # a full disk, a permission denied, a closed pipe: name the file, skip the traceback
        where = f"{e.filename}: " if e.filename else ""  # the stages name their output where the OS names nothing
        print(f"spj-edge: error: {one_line(f'{where}{e.strerror or e}')}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:
        if not e.name or e.name.partition(".")[0] == "spj_edge":
            raise
        # `pip install spj-edge` is the device runtime alone; the verbs that train, export or measure need the rest
        print(f"spj-edge: error: this needs {e.name.partition('.')[0]}, which the runtime-only install leaves out: "
              "pip install 'spj-edge[toolchain]'", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return 0
