"""The repository's command-line entry: ``python cli.py ...`` runs the installed ``bnfold``.

The command itself lives in ``bnfold/cli.py``; this file only lets a checkout run it without
installing (the wheel does not ship it).
"""

from bnfold.cli import main

if __name__ == "__main__":
    main()
