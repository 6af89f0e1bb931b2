"""minigpt: a command-line workbench for small GPTs."""

__version__ = "0.1.0"
