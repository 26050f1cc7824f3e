"""The data layer on real LeRobot v3 datasets written to disk: registry, normalization, mixture batches, sampling,
resuming, and validation errors.

Two tiny datasets are written once per module with `LeRobotDataset.create` and differ in everything a mixture
must reconcile: embodiment (built-in `libero_panda`, 7-dim actions / 8-dim state, vs. a `toy_arm` declared in the
mixture file, 3-dim actions in slots 10-12 / 2-dim state in slots 14-15), camera names (agentview + wrist as PNG
vs. one `top` camera stored as h264 video), image size and frame rate (20 vs. 10 fps). Every action encodes its own frame (`action[..., 0]` is
the dataset row), so chunk contents and padding can be checked exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from vla.config import ConfigError, get_preset
from vla.constants import (
    ACTION,
    ACTION_IS_PAD,
    ACTION_MASK,
    DATASET_ID,
    EMBODIMENT,
    EMBODIMENT_ID,
    OBS_IMAGE_MASK,
    OBS_STATE,
    STATE_MASK,
    TASK,
    image_key,
)
from vla.data.embodiments import (
    Embodiment,
    EmbodimentError,
    EmbodimentRegistry,
    UnknownEmbodimentError,
    build_registry,
    default_registry,
)
from vla.data.lerobot_source import lerobot_home
from vla.data.mixture import MixtureDataset, MixtureError, load_mixture, make_dataloader
from vla.data.normalize import Normalizer, compute_stats
from vla.data.sampler import MixtureSampler
from vla.data.transforms import ImageTransform, Processor, prepare_observation, to_chw

TOY_ARM = {"name": "toy_arm", "action_dim": 3, "state_dim": 2, "action_type": "abs_joint", "fps": 10,
           "action_slots": "10:13", "state_slots": [14, 15], "gripper": "none", "cameras": {"top": "base"}}
LIBERO_EPISODES = [9, 6, 12, 7]  # frames per episode
TOY_EPISODES = [5, 8, 6]


def pixel(row: int, camera: int) -> int:
    """The constant grey level of frame `row` of camera number `camera` (lets tests identify decoded frames)."""
    return (row * 7 + camera * 50) % 256


def write_dataset(root: Path, *, fps: int, cameras: list[str], hw: tuple[int, int], state_dim: int,
                  action_dim: int, episodes: list[int], robot_type: str, tasks: list[str], video: bool = False) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    features = {f"observation.images.{c}": {"dtype": "video" if video else "image", "shape": (*hw, 3),
                                            "names": ["height", "width", "channels"]} for c in cameras}
    features["observation.state"] = {"dtype": "float32", "shape": (state_dim,), "names": None}
    features["action"] = {"dtype": "float32", "shape": (action_dim,), "names": None}
    ds = LeRobotDataset.create(root.name, fps=fps, features=features, root=root, robot_type=robot_type,
                               use_videos=video, vcodec="h264")
    rng = np.random.default_rng(0)
    row = 0
    for ep, length in enumerate(episodes):
        for _ in range(length):
            frame = {f"observation.images.{c}": np.full((*hw, 3), pixel(row, i), np.uint8)
                     for i, c in enumerate(cameras)}
            frame["observation.state"] = (rng.normal(size=state_dim) * (1 + np.arange(state_dim))).astype(np.float32)
            action = rng.uniform(-1, 1, size=action_dim).astype(np.float32)
            action[0] = row
            frame["action"] = action
            frame["task"] = tasks[ep % len(tasks)]
            ds.add_frame(frame)
            row += 1
        ds.save_episode()
    ds.finalize()


def snapshot(*dirs: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for d in dirs:
        for p in sorted(Path(d).rglob("*")):
            st = p.stat()
            out[str(p)] = (st.st_size, st.st_mtime_ns) if p.is_file() else (0, 0)
    return out


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two datasets, the mixture file over them, broken copies for the validation tests, a private HF cache."""
    import datasets

    root = tmp_path_factory.mktemp("data")
    old_cache = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = root / "hf_cache"  # Arrow copies of the parquet files land here
    write_dataset(root / "libero", fps=20, cameras=["agentview", "wrist"], hw=(24, 32), state_dim=8, action_dim=7,
                  episodes=LIBERO_EPISODES, robot_type="libero_panda", tasks=["pick the bowl", "open the drawer"])
    write_dataset(root / "toy", fps=10, cameras=["top"], hw=(16, 16), state_dim=2, action_dim=3,
                  episodes=TOY_EPISODES, robot_type="toy_arm", tasks=["wave"], video=True)
    mixture = {"embodiments": [TOY_ARM], "datasets": [
        {"dataset": str(root / "libero"), "weight": 1.0, "embodiment": "libero_panda",
         "cameras": {"agentview": "base", "wrist": "wrist"}},
        {"dataset": str(root / "toy"), "weight": 3.0, "embodiment": "toy_arm"},
    ]}
    (root / "mixture.yaml").write_text(yaml.safe_dump(mixture))
    # broken copies: no data files / a truncated data file
    shutil.copytree(root / "libero", root / "bad_missing")
    for f in (root / "bad_missing" / "data").rglob("*.parquet"):
        f.unlink()
    shutil.copytree(root / "libero", root / "bad_corrupt")
    for f in (root / "bad_corrupt" / "data").rglob("*.parquet"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    yield root
    datasets.config.HF_DATASETS_CACHE = old_cache


def make_cfg(root: Path, **data):
    cfg = get_preset("debug")
    cfg.data.mixture = str(root / "mixture.yaml")
    cfg.data.image_size = 20
    cfg.data.batch_size = 8
    cfg.data.num_workers = 0
    cfg.action.chunk_size = 4
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg.validate()


@pytest.fixture(scope="module")
def opened(data_root: Path):
    cfg = make_cfg(data_root, normalization="mean_std", augment=False)
    mixture = load_mixture(cfg.data, default_registry())
    mixture.validate()
    return cfg, mixture, mixture.compute_stats()


# ---- embodiments -------------------------------------------------------------------------------------------------


def test_embodiment_unified_roundtrip_and_masks():
    reg = default_registry()
    assert reg.names[:4] == ["libero_panda", "calvin_panda", "robosuite_ur5e_osc", "aloha"]
    ur5e = reg.get("robosuite_ur5e_osc")
    a = torch.randn(5, 2, 4)
    u = ur5e.action_to_unified(a, 16)
    assert u.shape == (5, 2, 16)
    assert torch.equal(ur5e.action_from_unified(u), a)
    assert torch.equal(u[..., [0, 1, 2, 6]], a) and u[..., [3, 4, 5, *range(7, 16)]].abs().sum() == 0
    assert ur5e.action_mask(16).nonzero().flatten().tolist() == [0, 1, 2, 6]
    calvin = reg.get("calvin_panda")
    assert calvin.state_mask(16).sum() == 15 and not calvin.state_mask(16)[7]
    for emb in reg:  # every built-in fits the debug preset's 16 slots
        assert emb.action_extent <= 16 and emb.state_extent <= 16
    with pytest.raises(ValueError, match="expected action of size 4"):
        ur5e.action_to_unified(torch.zeros(7), 16)
    with pytest.raises(ValueError, match="raise data.unified_state_dim"):
        calvin.state_to_unified(torch.zeros(15), 12)
    with pytest.raises(UnknownEmbodimentError, match="did you mean 'libero_panda'.*known embodiments: libero_panda"):
        reg.get("libero_pand")


def test_registry_files_roundtrip_and_errors(tmp_path: Path):
    path = tmp_path / "robots.yaml"
    path.write_text(yaml.safe_dump({"embodiments": [TOY_ARM]}))
    reg = build_registry(str(path))
    assert reg.index("toy_arm") == 4 and reg.get("toy_arm").action_slots == (10, 11, 12)
    reg.save(tmp_path / "ckpt")
    again = EmbodimentRegistry.load(tmp_path / "ckpt")
    assert again.names == reg.names and all(again.get(n) == reg.get(n) for n in reg.names)
    # every problem of every entry in one error, and nothing added
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([
        {**TOY_ARM, "name": "a", "action_slots": [0, 0, 1]},
        {**TOY_ARM, "name": "b", "fps": 0, "acton_type": "x"},
        {"name": "c", "action_dim": 2},
    ]))
    before = default_registry()
    with pytest.raises(EmbodimentError) as err:
        before.merge_file(bad)
    msg = str(err.value)
    assert "3 problem(s)" in msg and "repeats slot(s) [0]" in msg
    assert "acton_type (did you mean action_type?)" in msg and "missing required key(s) ['state_dim'" in msg
    assert before.names == default_registry().names
    with pytest.raises(EmbodimentError, match="state_names has 1 entries but state_dim is 2"):
        Embodiment(**{**TOY_ARM, "state_names": ["x"]})


# ---- normalization -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["quantile", "mean_std"])
def test_normalizer_roundtrip_and_persistence(mode: str, tmp_path: Path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 4)) * [1.0, 10.0, 0.01, 1.0] + [0.0, 5.0, -3.0, 0.0]
    x[:, 3] = 0.04  # a constant column (e.g. a gripper joint that never moves)
    stats = {"bot": {"state": compute_stats(x), "action": compute_stats(x[:, :2])}}
    norm = Normalizer(stats, mode=mode)
    xt = torch.from_numpy(x.astype(np.float32))
    y = norm.normalize(xt.to(torch.bfloat16), "bot", "state")
    assert y.dtype == torch.float32 and torch.all(y[:, 3] == 0)
    y = norm.normalize(xt, "bot", "state")
    back = norm.unnormalize(y, "bot", "state")
    if mode == "quantile":
        assert y.abs().max() <= 1.0
        s = norm.stats["bot"]["state"]
        inside = ((xt >= s["q01"]) & (xt <= s["q99"])).all(1)
        assert 0.9 < inside.float().mean() < 1.0
        torch.testing.assert_close(back[inside], xt[inside], atol=1e-5, rtol=1e-5)
        assert torch.all(back[~inside].abs() <= torch.maximum(s["q01"].abs(), s["q99"].abs()) + 1e-5)
    else:
        torch.testing.assert_close(back, xt, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y[:, :3].mean(0), torch.zeros(3), atol=1e-4, rtol=0)
    norm.save(tmp_path)
    assert Normalizer.exists(tmp_path)
    loaded = Normalizer.load(tmp_path)
    assert loaded.mode == mode
    torch.testing.assert_close(loaded.normalize(xt, "bot", "state"), y, atol=0, rtol=0)
    with pytest.raises(KeyError, match="no normalization statistics for embodiment 'other'; have: bot"):
        norm.normalize(xt, "other", "state")


def test_merged_stats_are_exact_over_datasets(opened):
    _, mixture, norm = opened
    src = mixture.open()[0]
    expected = compute_stats(src.action)
    for k in ("mean", "std", "q01", "q99"):
        np.testing.assert_allclose(norm.stats["libero_panda"]["action"][k].numpy(), expected[k], rtol=1e-6)
    two = Normalizer.from_arrays({"e": {"state": [src.state[:10], src.state[10:]], "action": [src.action]}})
    np.testing.assert_allclose(two.stats["e"]["state"]["q99"].numpy(), compute_stats(src.state)["q99"], rtol=1e-6)


# ---- images ------------------------------------------------------------------------------------------------------


def test_image_transform_layouts_and_seeded_augmentation():
    hwc = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    chw = torch.from_numpy(hwc).permute(2, 0, 1).float() / 255
    assert to_chw(hwc).shape == (3, 30, 40) and to_chw(chw).shape == (3, 30, 40)
    assert to_chw(hwc[..., 0]).shape == (3, 30, 40)
    ev = ImageTransform(24, train=False, crop_scale=1.0)
    a, b = ev(hwc), ev(chw)
    assert a.shape == (3, 24, 24) and a.dtype == torch.float32 and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, b, atol=2 / 255, rtol=0)
    tr = ImageTransform(24, train=True, crop_scale=0.5, color_jitter=0.3)
    assert torch.equal(tr(hwc, seed=3), tr(hwc, seed=3))
    assert not torch.equal(tr(hwc, seed=3), tr(hwc, seed=4))
    assert not torch.equal(tr(hwc, seed=3), a)
    # evaluation sees the centre crop of the mean training area: a 2 px frame around a 40x40 image is cut away
    framed = np.zeros((40, 40, 3), np.uint8)
    framed[2:-2, 2:-2] = 255
    assert ImageTransform(40, train=False, crop_scale=0.5)(framed).min() == 1.0  # 35 px centre of 40
    assert ImageTransform(40, train=False, crop_scale=1.0)(framed).min() == 0.0


# ---- mixture batches ---------------------------------------------------------------------------------------------


def test_batches_masks_padding_and_contents(opened):
    cfg, mixture, norm = opened
    reg = mixture.registry
    loader = make_dataloader(cfg, mixture, norm, train=False)
    sources = mixture.open()
    h, u_a, u_s = cfg.action.chunk_size, cfg.data.unified_action_dim, cfg.data.unified_state_dim
    seen_pad = set()
    plan = iter(loader.sampler.epoch_plan(0).reshape(-1, cfg.data.batch_size, 3))
    n_batches = 0
    for batch in loader:
        n_batches += 1
        keys = next(plan)
        b = len(keys)
        assert batch[image_key("base")].shape == (b, 3, 20, 20) and batch[image_key("wrist")].shape == (b, 3, 20, 20)
        assert batch[OBS_STATE].shape == (b, u_s) and batch[ACTION].shape == (b, h, u_a)
        assert batch[ACTION_IS_PAD].shape == (b, h) and len(batch[TASK]) == b
        assert torch.equal(batch[DATASET_ID], torch.from_numpy(keys[:, 0]))
        for i, (d, f, _) in enumerate(keys.tolist()):
            src, name = sources[d], ["libero_panda", "toy_arm"][d]
            emb = reg.get(name)
            assert batch[EMBODIMENT_ID][i] == reg.index(name)
            assert torch.equal(batch[ACTION_MASK][i], emb.action_mask(u_a))
            assert torch.equal(batch[STATE_MASK][i], emb.state_mask(u_s))
            assert (batch[ACTION][i][:, ~batch[ACTION_MASK][i]] == 0).all()
            assert (batch[OBS_STATE][i][~batch[STATE_MASK][i]] == 0).all()
            assert batch[TASK][i] == src.task(f)
            # the chunk holds the next H actions of the same episode, the last one repeated past its end
            native = norm.unnormalize(emb.action_from_unified(batch[ACTION][i]), name, "action")
            end = src.episode_end[f]
            want = np.minimum(f + np.arange(h), end - 1)
            np.testing.assert_allclose(native[:, 0].numpy(), want, atol=1e-3)
            assert batch[ACTION_IS_PAD][i].tolist() == (f + np.arange(h) >= end).tolist()
            seen_pad.add(bool(batch[ACTION_IS_PAD][i].any()))
            state = norm.unnormalize(emb.state_from_unified(batch[OBS_STATE][i]), name, "state")
            np.testing.assert_allclose(state.numpy(), src.state[f], atol=1e-4)
            # images: the right frame of the right camera; toy_arm has no wrist camera -> zeros, masked
            assert batch[OBS_IMAGE_MASK][i].tolist() == ([True, True] if d == 0 else [True, False])
            torch.testing.assert_close(batch[image_key("base")][i], torch.full((3, 20, 20), pixel(f, 0) / 255),
                                       atol=(1 if d == 0 else 3) / 255, rtol=0)  # toy: decoded from h264
            if d == 1:
                assert batch[image_key("wrist")][i].abs().sum() == 0
            else:
                torch.testing.assert_close(batch[image_key("wrist")][i],
                                           torch.full((3, 20, 20), pixel(f, 1) / 255), atol=1 / 255, rtol=0)
    assert n_batches == (sum(LIBERO_EPISODES) + sum(TOY_EPISODES)) // cfg.data.batch_size
    assert seen_pad == {True, False}


def test_training_and_inference_share_one_path(opened):
    """A raw observation (canonical cameras, native state) prepared for the policy equals the training sample."""
    cfg, mixture, norm = opened
    processor = Processor(cfg.data, mixture.registry, norm)
    dataset = MixtureDataset(mixture.open(), processor, cfg.action.chunk_size, train=False)
    src = mixture.open()[0]
    for f in (0, 13):
        sample = dataset.sample(0, f, None)
        raw = {image_key("base"): src.image(f, "base").permute(1, 2, 0).numpy(),  # HWC uint8 like a camera
               image_key("wrist"): src.image(f, "wrist").permute(1, 2, 0).numpy(),
               OBS_STATE: src.state[f], TASK: src.task(f), EMBODIMENT: "libero_panda"}
        batch, name = prepare_observation(raw, registry=mixture.registry, normalizer=norm, data_cfg=cfg.data)
        assert name == "libero_panda"
        for key in (image_key("base"), image_key("wrist"), OBS_IMAGE_MASK, OBS_STATE, STATE_MASK, ACTION_MASK,
                    EMBODIMENT_ID):
            assert torch.equal(batch[key][0], sample[key]), key
        assert batch[TASK] == [sample[TASK]]
        u = processor.actions_to_model(torch.from_numpy(src.action[f]), "libero_panda")
        np.testing.assert_allclose(processor.actions_to_native(u, "libero_panda").numpy(), src.action[f], atol=1e-5)
    with pytest.raises(KeyError, match="names no 'embodiment'"):
        prepare_observation({OBS_STATE: src.state[0]}, registry=mixture.registry, normalizer=norm, data_cfg=cfg.data)


def test_single_dataset_embodiment_from_robot_type(data_root: Path):
    cfg = make_cfg(data_root, mixture=str(data_root / "libero"))
    mixture = load_mixture(cfg.data)
    mixture.validate()
    assert mixture.entries[0].embodiment == "" and mixture.open()[0].embodiment == "libero_panda"
    cfg = make_cfg(data_root, mixture=str(data_root / "toy"))
    with pytest.raises(MixtureError, match="robot_type 'toy_arm' is not registered.*--data.embodiment"):
        load_mixture(cfg.data).validate()
    with pytest.raises(ConfigError, match="color_jitter"):
        make_cfg(data_root, color_jitter=1.5)


# ---- sampling ----------------------------------------------------------------------------------------------------


def test_sampled_frequencies_follow_weights():
    """20 000 draws with weights 1:3:6. A dataset's count is Binomial(n, p): its frequency has standard deviation
    sqrt(p (1 - p) / n) <= 0.0035, and the test allows 4 of them (false alarm rate ~1e-4 per dataset)."""
    n, probs = 20_000, np.array([0.1, 0.3, 0.6])
    sampler = MixtureSampler([17, 40, 5], [1, 3, 6], batch_size=100, seed=5, epoch_size=n)
    ids = np.concatenate([[k[0] for k in batch] for batch in sampler])
    assert len(ids) == n
    freq = np.bincount(ids, minlength=3) / n
    tol = 4 * np.sqrt(probs * (1 - probs) / n)
    assert np.all(np.abs(freq - probs) <= tol), (freq, probs, tol)
    # inside a dataset, frames come from permutations: the first `size` draws of a dataset cover it exactly once
    plan = sampler.epoch_plan(0)
    for d, size in enumerate([17, 40, 5]):
        frames = plan[plan[:, 0] == d, 1]
        assert sorted(frames[:size].tolist()) == list(range(size))


def test_ranks_get_disjoint_shards_of_one_stream():
    full = MixtureSampler([50, 30], [1, 1], batch_size=4, seed=1, epoch_size=80)
    ranks = [MixtureSampler([50, 30], [1, 1], batch_size=4, seed=1, rank=r, world_size=2, epoch_size=80)
             for r in range(2)]
    stream = list(full)
    per_rank = [list(s) for s in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == 10
    assert [b for pair in zip(*per_rank, strict=True) for b in pair] == stream
    # a position saved by one process resumes at the same point of the stream on two
    full.advance(4)
    ranks[0].load_state_dict(full.state_dict())
    assert next(iter(ranks[0])) == stream[4]


def test_resume_gives_the_same_batches_with_any_worker_count(opened, data_root: Path):
    """Augmented batches are a function of the sampler position: workers and resuming do not change them."""
    _, mixture, norm = opened
    cfg = make_cfg(data_root, augment=True, batch_size=6)

    def take(loader, n):  # like the training loop: a new iter() starts the next epoch
        out = []
        while len(out) < n:
            out += [b for _, b in zip(range(n - len(out)), loader, strict=False)]
        return out

    ref_loader = make_dataloader(cfg, mixture, norm)
    first = take(ref_loader, 3)
    state = ref_loader.sampler.state_dict()
    assert state["consumed_batches"] == 3
    rest = take(ref_loader, 7)  # crosses into epoch 1 (53 frames: 8 batches of 6 per epoch)

    cfg.data.num_workers = 2
    resumed = make_dataloader(cfg, mixture, norm)
    resumed.sampler.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    again = take(resumed, 7)
    for a, b in zip(rest, again, strict=True):
        assert a[TASK] == b[TASK]
        for k, v in a.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, b[k]), k
    assert not torch.equal(first[0][image_key("base")], rest[0][image_key("base")])


def test_images_decoded_into_memory_give_the_same_batches(data_root: Path, caplog: pytest.LogCaptureFixture):
    """`data.cache_images_gb` decodes the PNG cameras once; batches are unchanged, video cameras stay per-sample,
    and a budget too small for the mixture leaves every camera decoding per sample."""
    cfg = make_cfg(data_root, augment=True, batch_size=6)

    def first_batches(cache_gb: float):
        cfg.data.cache_images_gb = cache_gb
        mixture = load_mixture(cfg.data, default_registry())  # fresh sources: caching mutates them
        mixture.validate()
        loader = make_dataloader(cfg, mixture, mixture.compute_stats())
        return [b for _, b in zip(range(4), loader, strict=False)], mixture.open()

    plain, _ = first_batches(0)
    cached, sources = first_batches(1.0)
    by_name = {Path(s.name).name: s for s in sources}
    assert sorted(by_name["libero"].cacheable_cameras()) == []  # both image cameras now served from memory
    assert type(by_name["libero"].cameras["base"]).__name__ == "_DecodedColumn"
    assert type(by_name["toy"].cameras["base"]).__name__ == "_VideoColumn"
    for a, b in zip(plain, cached, strict=True):
        for k, v in a.items():
            assert torch.equal(v, b[k]) if isinstance(v, torch.Tensor) else v == b[k], k

    with caplog.at_level("WARNING"):
        _, sources = first_batches(1e-6)
    assert "decoding per sample" in caplog.text
    assert all(s.cacheable_cameras() for s in sources if Path(s.name).name == "libero")


# ---- validation --------------------------------------------------------------------------------------------------


BAD_CASES = {
    "unknown embodiment": ({"dataset": "libero", "embodiment": "franka_typo"},
                           "unknown embodiment 'franka_typo'; known embodiments: libero_panda, calvin_panda"),
    "action size": ({"dataset": "libero", "embodiment": "robosuite_ur5e_osc", "cameras": {"agentview": "base"}},
                    "'action' has 7 dims but embodiment 'robosuite_ur5e_osc' has action_dim=4"),
    "state size": ({"dataset": "libero", "embodiment": "calvin_panda", "cameras": {"agentview": "base"}},
                   "'observation.state' has 8 dims but embodiment 'calvin_panda' has state_dim=15"),
    "camera": ({"dataset": "libero", "embodiment": "libero_panda", "cameras": {"side": "base", "wrist": "wrist"}},
               "camera(s) ['side'] not in the dataset (its cameras: ['agentview', 'wrist'])"),
    "missing dataset": ({"dataset": "nowhere/at_all/libero", "embodiment": "libero_panda"},
                        "dataset directory not found"),
    "missing files": ({"dataset": "bad_missing", "embodiment": "libero_panda"}, "no data/*/*.parquet files"),
    "corrupt file": ({"dataset": "bad_corrupt", "embodiment": "libero_panda"},
                     "corrupt parquet file data/chunk-000/file-000.parquet"),
    "bad weight": ({"dataset": "libero", "embodiment": "libero_panda", "weight": -1},
                   "'weight' must be a positive number, got -1"),
}


def _write_mixture(root: Path, entries: list[dict], name: str) -> Path:
    entries = [{**e, "dataset": str(root / e["dataset"]) if not e["dataset"].startswith("nowhere") else e["dataset"]}
               for e in entries]
    path = root / "mixtures" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump({"datasets": entries}))
    return path


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_each_bad_dataset_gets_one_clear_error(case: str, data_root: Path):
    entry, message = BAD_CASES[case]
    path = _write_mixture(data_root, [entry], case.replace(" ", "_"))
    cfg = make_cfg(data_root, mixture=str(path))
    before = snapshot(data_root)
    with pytest.raises(MixtureError) as err:
        load_mixture(cfg.data).validate()
    assert message in str(err.value) and "1 problem(s)" in str(err.value)
    assert snapshot(data_root) == before


def test_all_problems_are_listed_together_and_nothing_is_written(data_root: Path):
    entries = [{"dataset": "libero", "embodiment": "libero_panda"}] + [e for e, _ in BAD_CASES.values()]
    path = _write_mixture(data_root, entries, "everything_wrong")
    cfg = make_cfg(data_root, mixture=str(path))
    before, home = snapshot(data_root), lerobot_home()
    home_before = (home.exists(), snapshot(home) if home.exists() else {})
    with pytest.raises(MixtureError) as err:
        mixture = load_mixture(cfg.data)
        mixture.validate()
    msg = str(err.value)
    assert f"{len(BAD_CASES)} problem(s)" in msg
    for i, (_, message) in enumerate(BAD_CASES.values(), start=1):
        assert f"[{i}] " in msg and message in msg.split(f"[{i}] ", 1)[1].split("\n")[0]
    assert "[0]" not in msg  # the good dataset is fine
    assert snapshot(data_root) == before
    assert (home.exists(), snapshot(home) if home.exists() else {}) == home_before


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[1].glob("datasets/mixtures/*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_mixture_files_are_well_formed(path: Path):
    """Format and embodiments only: the datasets they name are generated or downloaded elsewhere."""
    cfg = get_preset("tiny-cpu")
    cfg.data.mixture = str(path)
    mixture = load_mixture(cfg.data)
    assert mixture.format_problems == [] and mixture.entries
    for entry in mixture.entries:
        emb = mixture.registry.get(entry.embodiment)
        assert emb.action_extent <= cfg.data.unified_action_dim
        mapped = (entry.cameras or emb.cameras).values()
        assert set(mapped) & set(cfg.data.cameras)


def test_a_mixture_file_names_its_registry_file(tmp_path: Path):
    """`embodiments_file:` in a mixture merges that registry (relative to the mixture), or is one named problem."""
    (tmp_path / "robots").mkdir()
    (tmp_path / "robots" / "arms.yaml").write_text(yaml.safe_dump({"embodiments": [
        {"name": "my_arm", "action_dim": 6, "state_dim": 6, "action_type": "abs_joint", "fps": 15}]}))
    mixture_file = tmp_path / "mix.yaml"
    mixture_file.write_text(yaml.safe_dump({"embodiments_file": "robots/arms.yaml",
                                            "datasets": [{"dataset": "somewhere", "embodiment": "my_arm"}]}))
    cfg = get_preset("debug")
    cfg.data.mixture = str(mixture_file)
    mixture = load_mixture(cfg.data)
    assert mixture.format_problems == [] and mixture.registry.get("my_arm").action_dim == 6

    mixture_file.write_text(yaml.safe_dump({"embodiments_file": "robots/missing.yaml",
                                            "datasets": [{"dataset": "somewhere", "embodiment": "my_arm"}]}))
    problems = load_mixture(cfg.data).format_problems
    assert len(problems) == 1 and "embodiments_file 'robots/missing.yaml' not found" in problems[0]
