#!/usr/bin/env python
"""lerobot's Diffusion Policy trained and evaluated on our data, the reference arm of the learning comparison.

lerobot's own pieces do the work: `LeRobotDataset` with the policy's observation/action windows, `DiffusionPolicy`
with its default design (a ResNet-18 image encoder trained from scratch, spatial softmax, 1-D conditional U-Net,
DDPM with 100 steps, 2 observation steps, horizon 16, 8 executed actions), its optimizer and scheduler presets and
its pre/post-processors for normalization. Only the loop, the checkpoints and the bridge to our LIBERO evaluation
are written here. Three changes from lerobot's defaults make it trainable and evaluable on a CPU: frames resized
to 96 px with an 84 px random crop (lerobot's PushT image setting; our tiny-cpu model also sees 96 px), U-Net
widths (128, 256, 512) instead of (512, 1024, 2048) (30 M instead of 263 M parameters: the default's checkpoint
with optimizer state is 3.2 GB and a batch-4 step took 27 s here; widths (256, 512, 1024), 78 M, took 5.7 s a
batch-32 step, 4800 steps ~7.5 h), and DDIM with 10 sampling steps instead of DDPM with 100 (same training
objective; a 100-step chunk took tens of seconds here, i.e. minutes per LIBERO episode). The ResNet-18 encoders
(two cameras x two observation steps) are about half of a training step at these widths.

    python bench/lerobot_diffusion.py train --dataset datasets/local/libero_object_task0 --out DIR --steps 2400
    python bench/lerobot_diffusion.py eval --policy DIR/last --out DIR/eval --episodes 50 [--resume | --overwrite]

Image normalization: lerobot 0.4.4's `compute_stats` squares uint8 pixels before converting them to float, so the
image std in a `meta/stats.json` it wrote is ~0.001 where the true value is ~0.2, and its pre-processor (MEAN_STD)
would scale images by hundreds. `float_image_stats` recomputes every camera's statistics in float from the decoded
frames, and those are what the pre-processor gets (and what the checkpoints store).

Checkpoints (`DIR/step-N/`, the two newest kept; `DIR/last` -> the newest) hold lerobot's `save_pretrained` files,
the normalization statistics, the camera names and the optimizer state; training resumes from `last` (the sample
order after a resume is a fresh shuffle, not the interrupted one).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vla.config import EvalConfig  # noqa: E402
from vla.constants import OBS_STATE, image_key  # noqa: E402
from vla.training.layout import checkpoint_name, point_last_to, prune_checkpoints, read_last  # noqa: E402

logger = logging.getLogger("lerobot_diffusion")
CAMERAS = {"agentview": "base", "wrist": "wrist"}  # dataset camera -> our canonical camera (as in the mixtures)
STATE_FILE, STATS_FILE, CAMERAS_FILE = "training_state.pt", "stats.json", "cameras.json"


def diffusion_config(dataset_root: Path):
    """lerobot's default DiffusionConfig for the dataset's features, plus the metadata it was built from."""
    from lerobot.configs.types import FeatureType
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata
    from lerobot.datasets.utils import dataset_to_policy_features
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig

    meta = LeRobotDatasetMetadata(repo_id=f"local/{dataset_root.name}", root=dataset_root)
    features = dataset_to_policy_features(meta.features)
    outputs = {k: f for k, f in features.items() if f.type is FeatureType.ACTION}
    inputs = {k: f for k, f in features.items() if f.type in (FeatureType.VISUAL, FeatureType.STATE)}
    missing = [cam for cam in CAMERAS if image_key(cam) not in inputs]
    if missing:
        raise ValueError(f"{dataset_root} has no camera(s) {missing}; found {sorted(inputs)}")
    config = DiffusionConfig(input_features=inputs, output_features=outputs, resize_shape=(96, 96),
                             crop_shape=(84, 84), down_dims=(128, 256, 512), noise_scheduler_type="DDIM",
                             num_inference_steps=10, device="cpu")
    return config, meta


# ---- training --------------------------------------------------------------------------------------------------


KEEP_CHECKPOINTS = 2  # each is ~0.35 GB (30 M parameters and their Adam moments)


IMAGE_STATS_FRAMES = 2000
"""Frames, evenly spaced over the dataset, that camera statistics are recomputed from (all of a smaller dataset)."""


def float_image_stats(dataset_root: Path, meta, max_frames: int = IMAGE_STATS_FRAMES) -> dict:
    """`meta.stats` with every camera's mean/std/min/max recomputed in float64 from decoded frames.

    lerobot's own image statistics overflow (uint8 pixels squared), so they cannot be handed to its normalizer.
    Frames are decoded through the dataset's own transform (CHW float in [0, 1]), so the numbers are in the units
    the pre-processor sees; the result has lerobot's shapes ((3, 1, 1) per camera) and the other features' stats
    unchanged.
    """
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    dataset = LeRobotDataset(repo_id=meta.repo_id, root=dataset_root)
    n = len(dataset)
    rows = np.unique(np.linspace(0, n - 1, min(n, max_frames)).round().astype(int)).tolist()
    stats = {key: dict(values) for key, values in meta.stats.items()}
    for key in meta.camera_keys:
        column = dataset.hf_dataset.select_columns([key])
        frames = torch.stack([column[i][key] for i in rows]).double()  # (N, 3, H, W)
        per_channel = frames.transpose(0, 1).reshape(frames.shape[1], -1)
        stats[key] = {**stats.get(key, {}),
                      "mean": per_channel.mean(1).view(-1, 1, 1).numpy(),
                      "std": per_channel.std(1, correction=0).view(-1, 1, 1).numpy(),
                      "min": per_channel.min(1).values.view(-1, 1, 1).numpy(),
                      "max": per_channel.max(1).values.view(-1, 1, 1).numpy(),
                      "count": np.array([len(rows)])}
    return stats


def save_checkpoint(out: Path, step: int, policy, optimizer, scheduler, stats: dict) -> Path:
    """Write step-N/ through a temporary directory and repoint `last`: a crash leaves the previous one intact.
    Older checkpoints beyond the newest `KEEP_CHECKPOINTS` are deleted once the new one is in place."""
    final = out / checkpoint_name(step)
    tmp = out / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp)
    (tmp / STATS_FILE).write_text(json.dumps(
        {k: {s: np.asarray(v).tolist() for s, v in d.items()} for k, d in stats.items()}))
    (tmp / CAMERAS_FILE).write_text(json.dumps(CAMERAS))
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    point_last_to(out, final)
    prune_checkpoints(out, KEEP_CHECKPOINTS)
    return final


def train(dataset_root: Path, out: Path, steps: int, batch_size: int, num_workers: int, save_every: int,
          log_every: int, seed: int) -> None:
    from lerobot.datasets.factory import resolve_delta_timestamps
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
    from lerobot.policies.diffusion.processor_diffusion import make_diffusion_pre_post_processors
    from tqdm import tqdm

    config, meta = diffusion_config(dataset_root)
    dataset = LeRobotDataset(repo_id=meta.repo_id, root=dataset_root,
                             delta_timestamps=resolve_delta_timestamps(config, meta))
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    last, start = read_last(out), 0
    if last is not None:
        policy = DiffusionPolicy.from_pretrained(str(last))
    else:
        policy = DiffusionPolicy(config)
    stats = float_image_stats(dataset_root, meta)
    preprocessor, _ = make_diffusion_pre_post_processors(policy.config, dataset_stats=stats)
    optimizer = policy.config.get_optimizer_preset().build(policy.get_optim_params())
    scheduler = policy.config.get_scheduler_preset().build(optimizer, steps)
    if last is not None:
        state = torch.load(last / STATE_FILE, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["step"]
        logger.info("resuming from %s (step %d)", last, start)
    if start >= steps:
        logger.info("%s already reached step %d", out, start)
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=num_workers, persistent_workers=num_workers > 0,
                                         generator=torch.Generator().manual_seed(seed + start))
    batches = iter(loader)
    policy.train()
    bar = tqdm(total=steps, initial=start, desc="lerobot diffusion", dynamic_ncols=True)
    log = (out / "train_log.jsonl").open("a")
    t0, last_step = time.perf_counter(), start
    for step in range(start + 1, steps + 1):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        loss, _ = policy.forward(preprocessor(batch))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 10.0)  # lerobot's default grad_clip_norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        bar.update()
        if step % log_every == 0 or step == steps:
            elapsed = time.perf_counter() - t0
            record = {"step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                      "steps_per_s": (step - last_step) / elapsed}
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{record['loss']:.4g}")
            t0, last_step = time.perf_counter(), step
        if step % save_every == 0 or step == steps:
            save_checkpoint(out, step, policy, optimizer, scheduler, stats)
    bar.close()
    log.close()


# ---- evaluation ------------------------------------------------------------------------------------------------


class DiffusionAgent:
    """A trained lerobot DiffusionPolicy behind our evaluation's policy interface (reset / select_action).

    Our observations carry canonical camera names and HWC uint8 frames in the embodiment's units; lerobot's policy
    wants the dataset's camera keys, CHW floats in [0, 1], normalized by its preprocessor. The policy keeps its own
    observation history and action queue, so it reads every step's observation.
    """

    def __init__(self, checkpoint: Path) -> None:
        from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
        from lerobot.policies.diffusion.processor_diffusion import make_diffusion_pre_post_processors

        self.policy = DiffusionPolicy.from_pretrained(str(checkpoint)).eval()
        stats = {k: {s: torch.tensor(v) for s, v in d.items()}
                 for k, d in json.loads((checkpoint / STATS_FILE).read_text()).items()}
        self.cameras = json.loads((checkpoint / CAMERAS_FILE).read_text())
        self.pre, self.post = make_diffusion_pre_post_processors(self.policy.config, dataset_stats=stats)
        self.chunk_size = self.policy.config.horizon

    def reset(self) -> None:
        self.policy.reset()

    @torch.no_grad()
    def select_action(self, observation: dict) -> np.ndarray:
        batch = {OBS_STATE: torch.as_tensor(np.asarray(observation[OBS_STATE]), dtype=torch.float32)}
        for camera, canonical in self.cameras.items():
            frame = torch.from_numpy(np.ascontiguousarray(observation[image_key(canonical)]))
            batch[image_key(camera)] = frame.permute(2, 0, 1).float() / 255.0
        action = self.policy.select_action(self.pre(batch))
        return self.post(action).squeeze(0).numpy()


@dataclass
class DiffusionAgentFactory:
    """Picklable: each evaluation worker process loads the checkpoint itself."""

    checkpoint: str

    def __call__(self) -> DiffusionAgent:
        return DiffusionAgent(Path(self.checkpoint))


def evaluate(checkpoint: Path, out: Path, episodes: int, workers: int, max_steps: int, videos: int,
             resume: bool, overwrite: bool) -> dict:
    from vla.sim.libero import evaluate_libero

    cfg = EvalConfig(suite="libero_object", tasks=(0,), episodes_per_task=episodes, num_workers=workers,
                     max_steps=max_steps, videos_per_task=videos, image_size=128)
    return evaluate_libero(DiffusionAgentFactory(str(checkpoint.resolve())), cfg, out, resume=resume,
                           overwrite=overwrite)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume) on one LeRobot dataset")
    t.add_argument("--dataset", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--steps", type=int, default=2400)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--num-workers", type=int, default=2)
    t.add_argument("--save-every", type=int, default=200,
                   help="steps between checkpoints (~10 min of CPU training at batch 32)")
    t.add_argument("--log-every", type=int, default=25)
    t.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("eval", help="official-protocol LIBERO-Object task 0 evaluation of a checkpoint")
    e.add_argument("--policy", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--episodes", type=int, default=50)
    e.add_argument("--workers", type=int, default=2)
    e.add_argument("--max-steps", type=int, default=0, help="0 = the suite's official limit")
    e.add_argument("--videos", type=int, default=2)
    e.add_argument("--resume", action="store_true")
    e.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "train":
        if not (args.dataset / "meta" / "info.json").is_file():
            parser.error(f"--dataset {args.dataset}: not a LeRobot dataset (no meta/info.json)")
        train(args.dataset.resolve(), args.out, args.steps, args.batch_size, args.num_workers, args.save_every,
              args.log_every, args.seed)
    else:
        if not (args.policy / STATS_FILE).is_file():
            parser.error(f"--policy {args.policy}: not a checkpoint written by this script (no {STATS_FILE})")
        results = evaluate(args.policy, args.out, args.episodes, args.workers, args.max_steps, args.videos,
                           args.resume, args.overwrite)
        print(json.dumps(results["summary"]))


if __name__ == "__main__":
    main()
