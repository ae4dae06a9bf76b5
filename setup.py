"""Packaging that pyproject.toml cannot say: ``conf/`` (top level, as the design asks) is copied
into the built package as ``rbert/conf``, where the ``rbert`` command looks first
(rbert/cli.py). Everything else is in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithConf(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:  # an editable install reads the source tree's conf/
            self.copy_tree(str(Path(__file__).parent / "conf"), str(Path(self.build_lib) / "rbert" / "conf"))


setup(cmdclass={"build_py": BuildWithConf})
