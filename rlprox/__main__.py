from rlprox.cli import entry

entry()
