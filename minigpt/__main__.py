from minigpt import signals

signals.install()  # before the command line's imports: a signal from now on sets the flag

from minigpt.cli import main  # noqa: E402

main()
