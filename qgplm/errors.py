"""One exception type for every user-facing failure.

`qgplm.run` catches it and prints its message as a single line, so each raise site must word
the message as "what is wrong: how to fix it".
"""


class QgplmError(Exception):
    """A failure caused by the user's input (config, files, environment), not a bug."""
