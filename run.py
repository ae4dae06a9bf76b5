"""rbert's one entry point, from the repository: ``python run.py task=sst2 model=bert``.

The same as the ``rbert`` command that ``pip install .`` installs (rbert/cli.py; README.md).
"""

from rbert.cli import main

if __name__ == "__main__":
    main()
