"""``python -m bastion`` and the ``bastion`` command.

The CLI is imported only when the command runs: a child process that
multiprocessing starts from this program imports its main module first, and
that must not mean all of Bastion (``bastion.limited_process``).
"""


def main() -> None:
    from bastion.cli import app

    app()


if __name__ == "__main__":
    main()
