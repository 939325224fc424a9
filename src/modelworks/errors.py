"""The few exception types a user sees. Messages follow `<where>: <what> (got <value>); <fix>`."""


class ModelworksError(Exception):
    """Base of the errors meant for the user: the CLI prints them without a traceback."""


class ConfigError(ModelworksError):
    """A recipe, an override or a command-line argument is wrong."""


class DataError(ModelworksError):
    """A data set is missing, incomplete or malformed."""


class CheckpointError(ModelworksError):
    """A checkpoint or run directory cannot be used."""


class TrainingDiverged(ModelworksError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class PackageError(ModelworksError):
    """A model package cannot be written (an export failed its checks) or used (missing, tampered, truncated)."""


class InputError(ModelworksError):
    """An input to a trained model (a request, an image file) is unusable. `field` names the request field."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class InputTooLarge(InputError):
    """An input is over a size limit of the server's (an image's pixel count): refused before it is decoded.
    Served as 413; the message says the limit and the flag that sets it."""
