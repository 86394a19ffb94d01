"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""


class LorafitError(Exception):
    """Base class: the message is complete and meant for the user."""


class LoadError(LorafitError):
    """A model, tokenizer or checkpoint could not be loaded: the message names the file and the problem."""
