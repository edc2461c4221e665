"""Errors caused by what the user gave us (arguments, config, files), as opposed to bugs.

`run_cascade.py` prints these as one line and exits with code 2, without a traceback.
"""


class UserError(Exception):
    """Bad input from the user; the message names the value and what would be valid."""


class ConfigError(UserError):
    """A config file, key, type or value that cannot be used."""
