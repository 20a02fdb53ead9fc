"""The errors a user's input, files or settings can cause. Each message names the file or flag and
the problem; the scripts print it as one `error:` line and exit with code 2, never a traceback.

Nothing but the standard library: every layer raises these, and a script that only unzips must not
load torch to catch them."""

import re


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


class ToolError(Exception):
    """A program or package outside this project (the Kaggle CLI, matplotlib) is missing or failed."""


def first_line(e: BaseException, typed: bool = False, limit: int = 200) -> str:
    """Another library's exception as the one line our message quotes: its first non-blank line (a
    parser's or compiler's may run to pages), with the next one when it is a heading that ends in a
    colon (dynamo's `backend='inductor' raised:`), without terminal escape codes, cut at `limit`
    characters; prefixed by its type when `typed`, and its type alone when it says nothing."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(e))
    lines = [s.strip() for s in text.splitlines() if s.strip()][:2]
    line = " ".join(lines if lines and lines[0].endswith(":") else lines[:1])[:limit]
    name = type(e).__name__
    return (f"{name}: {line}" if typed else line) if line else name


EXPECTED_ERRORS = (InputError, ConfigError, RunDirError, CheckpointError, SubmissionError, TrainingDiverged, ToolError)
