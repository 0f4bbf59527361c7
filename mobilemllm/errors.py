"""Error types for user mistakes. The CLI turns these into one red line and a non-zero exit code;
any other exception is a bug and keeps its traceback."""


class UserError(Exception):
    """Bad input a user can fix: a missing file, a malformed record, an unknown name."""

    exit_code = 2


class ConfigError(UserError):
    """An invalid configuration, preset, connector, target or recipe name."""


class DataError(UserError):
    """A data file, record or image that cannot be used."""


class CheckpointError(UserError):
    """A checkpoint folder with missing, extra or mismatched files or tensors."""


class BackendUnavailable(UserError):
    """An optional backend or SDK (QNN, adb, Core ML prediction) that is not available here."""

    exit_code = 1
