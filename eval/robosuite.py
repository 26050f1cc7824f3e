#!/usr/bin/env python
"""Evaluate a policy on a robosuite embodiment of datasets/robosuite_expert.py. `python eval/robosuite.py --help`."""

import os
import sys
from pathlib import Path

# This script is named like the robosuite package: run as a script, its folder is sys.path[0] and `import robosuite`
# would find this file. Take the folder off the import path before robosuite is imported (spawned workers inherit
# sys.path).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _HERE]

from vla.sim.robosuite import main  # noqa: E402 - after the import path is fixed

if __name__ == "__main__":
    main()
