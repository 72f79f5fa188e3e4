"""The one exception type for problems a user can cause and fix."""


class PipelineError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback.

    The message says what is wrong and what to do about it.
    """
