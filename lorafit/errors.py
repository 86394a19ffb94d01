"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""


class LorafitError(Exception):
    """Base class: the message is complete and meant for the user."""


class LoadError(LorafitError):
    """A model, tokenizer or checkpoint could not be loaded: the message names the file and the problem."""


class ConfigError(LorafitError):
    """A configuration value is unknown, of the wrong type or out of range: the message names the key and
    what it accepts."""


class DataError(LorafitError):
    """A data file or one of its rows cannot be used for training: the message names the file, the row or
    line, and what was expected."""


class ExportError(LorafitError):
    """A model, adapter or tokenizer cannot be exported in the asked format: the message says what the
    format or its consumer cannot hold, and what to do instead."""
