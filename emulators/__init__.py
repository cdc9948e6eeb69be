"""The emulator side of mplaunch: what runs inside the sandbox.

`__version__` is the package's version (pyproject.toml reads it from here):
an emulator reports it in its READY, so management shows which code each
emulator process runs, old or newly installed.
"""

__version__ = "0.1.0"
