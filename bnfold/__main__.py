"""``python -m bnfold``: the same command line as the installed ``bnfold`` script."""

from bnfold.cli import main

if __name__ == "__main__":
    main(prog_name="bnfold")  # help and hints name the command users type
