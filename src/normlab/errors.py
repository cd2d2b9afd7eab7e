"""The exception types that the CLI turns into a one-line message and an exit code."""

import signal


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message cut to its first line and ``limit`` characters (else its type).

    >>> first_line(ValueError("shapes differ\\nand more detail"))
    'shapes differ'
    """
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


class NormlabError(Exception):
    """A problem with the user's input (flags, data, config, checkpoint).

    The CLI prints ``normlab: error: <message>`` and exits with ``exit_code``
    (2 for usage and data errors, as argparse does), never a traceback.
    """

    exit_code = 2


class ConfigError(NormlabError):
    """A model or training configuration that cannot work."""


class StorageError(NormlabError):
    """The run folder could not be written (a full disk, a read-only or vanished folder); what
    was written before is kept."""

    exit_code = 1


class TrainingDiverged(NormlabError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = 1


class Interrupted(NormlabError):
    """Ctrl-C or SIGTERM: the run stopped between two steps. The exit code is the shell's for
    that signal, 128 + its number: 130 for SIGINT, 143 for SIGTERM."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum
