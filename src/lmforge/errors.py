"""User-facing errors.

Every problem a user can cause (a bad path, a bad value, a corrupt file) is raised as an
`LmforgeError` whose message is one line naming the thing and the fix. The CLI prints that line
to stderr and exits with `exit_code`; it shows a traceback only with --debug.
"""


class LmforgeError(Exception):
    """A problem with the user's input, told in one line. Exit code 2."""

    exit_code = 2


class ConfigError(LmforgeError):
    """An unknown key, a wrong type or an out-of-range value in a config."""


class DataError(LmforgeError):
    """A corpus, a shard or a manifest that cannot be used."""


class TokenizerError(LmforgeError):
    """A tokenizer file that cannot be read or does not match."""


class CheckpointError(LmforgeError):
    """A checkpoint that is missing, incomplete, corrupt or does not match."""
