"""The one exception type that the CLI turns into a one-line message."""


class NormlabError(Exception):
    """A problem with the user's input (flags, data, config, checkpoint).

    The CLI prints ``normlab: error: <message>`` and exits with ``exit_code``
    (2 for usage and data errors, as argparse does), never a traceback.
    """

    exit_code = 2


class TrainingDiverged(NormlabError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = 1
