"""The errors a user's input, files or settings can cause. Each message names the file or flag and
the problem; the scripts print it as one `error:` line and exit with code 2, never a traceback.

No imports: every layer raises these, and a script that only unzips must not load torch to catch them."""


class InputError(Exception):
    """The competition input is missing or malformed."""


class ConfigError(ValueError):
    """A config value out of range, or a config file that is not a TrainConfig."""


class RunDirError(Exception):
    """A run dir that is missing, unfinished, or belongs to another configuration or dataset."""


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, unsafe, or belongs to another run."""


class SubmissionError(Exception):
    """A submission that Kaggle would reject or mis-score."""


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


EXPECTED_ERRORS = (InputError, ConfigError, RunDirError, CheckpointError, SubmissionError, TrainingDiverged)
