"""Robot data: embodiments, LeRobot mixtures, normalization, and the shared observation path.

- `embodiments`: where each robot's actions/states sit in the unified vectors (registry, masks).
- `mixture`: mixture files -> validated datasets -> batches (`load_mixture`, `make_dataloader`).
- `lerobot_source`: one LeRobot v3 dataset as in-memory columns + one-frame image decodes.
- `sampler`: weighted, seeded, sharded, resumable sampling.
- `normalize`: per-embodiment statistics and the `Normalizer` saved with checkpoints.
- `transforms`: images and vectors to model tensors, identical for training and inference (`Processor`).
- `recording`: writing scripted demonstrations as LeRobot datasets (used by `datasets/`).
"""
