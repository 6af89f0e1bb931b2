"""`python -m minigpt` and the `minigpt` script: the command line, with SIGINT and
SIGTERM setting signals.py's flag from the first moment to the process's last."""

from minigpt import signals


def run() -> None:
    signals.install()  # before the command line's imports, for good (see signals.install)
    from minigpt.cli import main

    main()


if __name__ == "__main__":
    run()
