#!/usr/bin/env python
"""Evaluate a policy on LIBERO with the official protocol. `python eval/libero.py --help` for options."""

from vla.cli import eval_libero_main

if __name__ == "__main__":
    eval_libero_main()
