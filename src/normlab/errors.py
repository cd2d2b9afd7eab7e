"""The exception types that the CLI turns into a one-line message and an exit code."""


class NormlabError(Exception):
    """A problem with the user's input (flags, data, config, checkpoint).

    The CLI prints ``normlab: error: <message>`` and exits with ``exit_code``
    (2 for usage and data errors, as argparse does), never a traceback.
    """

    exit_code = 2


class ConfigError(NormlabError):
    """A model or training configuration that cannot work."""


class TrainingDiverged(NormlabError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = 1


class Interrupted(NormlabError):
    """Ctrl-C: the run stopped between two steps; exit code 130 as for any SIGINT."""

    exit_code = 130
