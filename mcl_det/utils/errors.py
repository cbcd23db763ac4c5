"""The one exception type that tools turn into a single clear line and exit code 2."""


class MCLDetError(Exception):
    """A problem with the user's input (path, file, config, argument), not a bug.

    The message must name the problem *and* what to do about it, in one line: the CLI wrapper
    prints it as ``error: <message>`` without a traceback.
    """
