#!/usr/bin/env python
"""Evaluate a policy on CALVIN with the official long-horizon protocol. `python eval/calvin.py --help` for options."""

from vla.cli import eval_calvin_main

if __name__ == "__main__":
    eval_calvin_main()
