"""Errors a user can act on, raised deep in training and reported by the CLI as one line (exit 2).

(ConfigError lives in distkd.config, LogsError in distkd.data.schema, StorageError in
distkd.storage; these two are here so the CLI can name them without importing torch.)
"""


class CheckpointError(ValueError):
    """A checkpoint cannot be used by this run; the message names the folder and why."""


class ProcessGroupError(RuntimeError):
    """A rank could not join its process group in time; the message says where and why."""


class RankFailure(RuntimeError):
    """A rank of a local launch died (or raised) and no restarts were left."""
