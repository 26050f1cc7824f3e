#!/usr/bin/env python
"""Evaluate a policy on LIBERO with the official protocol. `python eval/libero.py --help` for options."""

import os
import sys
from pathlib import Path

# This script is named like the LIBERO package: run as a script, its folder is sys.path[0] and `import libero` would
# find this file. Take the folder off the import path before LIBERO is imported (spawned workers inherit sys.path).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _HERE]

from vla.cli import eval_libero_main

if __name__ == "__main__":
    eval_libero_main()
