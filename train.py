#!/usr/bin/env python
"""Train a vla policy.

    python train.py --preset tiny-cpu --data.mixture datasets/mixtures/libero_object.yaml
    accelerate launch --config_file vla/training/accelerate/ddp.yaml train.py --preset himoe-paligemma ...
    python train.py --config checkpoints/<run>/config.json --train.init_from checkpoints/<run>/last ...

`python train.py --help` lists the presets and every overridable field.
"""

from vla.cli import train_main

if __name__ == "__main__":
    train_main()
