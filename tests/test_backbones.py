"""Compact backbone (timm + text encoders) and the input contract every backbone shares."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vla.backbones import EXTRA_DIR, make_backbone
from vla.backbones.compact import TEXT_ENCODER_DIR, CompactBackbone
from vla.backbones.text import FrozenTextEncoder, HashedWordEmbedding, minilm_path
from vla.config import BackboneConfig, ConfigError

CAMERAS = ("base", "wrist")
SIZE = 32
TINY = BackboneConfig(vision_model="resnet10t", text_model="embedding", width=32, tokens_per_image=4,
                      max_text_tokens=8)


def tiny(**changes) -> CompactBackbone:
    torch.manual_seed(0)
    return make_backbone(dataclasses.replace(TINY, **changes), CAMERAS, SIZE)


def batch(b: int = 3, mask: list[list[int]] | None = None):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(b, len(CAMERAS), 3, SIZE, SIZE, generator=g)
    image_mask = torch.ones(b, len(CAMERAS), dtype=torch.bool) if mask is None else torch.tensor(mask).bool()
    tasks = ["pick up the red cube", "open the top drawer of the cabinet", "put the bowl on the plate"][:b]
    return images, image_mask, tasks


@pytest.fixture(scope="module")
def minilm_backbone() -> CompactBackbone:
    torch.manual_seed(0)
    return make_backbone(dataclasses.replace(TINY, text_model="minilm", max_text_tokens=16), CAMERAS, SIZE)


# ---- shapes, masks, gradients ----------------------------------------------------------------------------------


def test_compact_prefix_shapes_masks_and_gradients():
    bb = tiny()
    images, mask, tasks = batch()
    prefix = bb(images, mask, tasks)
    n_img = len(CAMERAS) * 4
    words = [len(t.split()) + 1 for t in tasks]  # + BOS, all under max_text_tokens=8
    assert prefix.tokens.shape == (3, n_img + max(words), 32)
    assert bb.width == prefix.width == 32 and bb.num_layers is None and prefix.layers is None
    assert prefix.mask[:, :n_img].all()
    assert prefix.mask[:, n_img:].sum(1).tolist() == words
    prefix.tokens[prefix.mask].square().mean().backward()
    for name, p in bb.named_parameters():  # (timm zero-inits the last BN of each residual block: grads may be 0)
        assert p.grad is not None, f"{name} got no gradient"
    for part in (bb.vision, bb.text, bb.image_proj):
        assert sum(p.grad.abs().sum() for p in part.parameters()) > 0


def test_missing_camera_is_masked_not_encoded_and_ignored(monkeypatch):
    bb = tiny().eval()
    seen = []
    encode = bb.vision.forward_features
    monkeypatch.setattr(bb.vision, "forward_features", lambda x: seen.append(x.shape[0]) or encode(x))
    images, mask, tasks = batch(mask=[[1, 1], [1, 0], [0, 0]])
    prefix = bb(images, mask, tasks)
    assert seen == [3], "only the 3 present camera images may be encoded"
    t = 4
    expected = torch.tensor([[1] * t + [1] * t, [1] * t + [0] * t, [0] * t + [0] * t]).bool()
    assert torch.equal(prefix.mask[:, : 2 * t], expected)
    assert prefix.mask[2, 2 * t:].any(), "a sample without cameras still has its instruction tokens"

    other = images.clone()
    other[1, 1] = torch.rand(3, SIZE, SIZE)  # pixels of a missing camera must not change anything
    other[2] = 0.5
    again = bb(other, mask, tasks)
    assert torch.equal(again.tokens, prefix.tokens)


def test_missing_camera_backward_reaches_present_only():
    bb = tiny()
    images, mask, tasks = batch(mask=[[1, 0], [1, 0], [1, 0]])
    prefix = bb(images, mask, tasks)
    prefix.tokens[prefix.mask].sum().backward()
    assert bb.camera_embed.grad[0].abs().sum() > 0
    assert bb.camera_embed.grad[1].abs().sum() == 0, "masked tokens of the missing camera leaked into the loss"


# ---- freezing --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("freeze", ["none", "vision", "language", "all"])
def test_compact_freeze_flags(freeze):
    bb = tiny(freeze=freeze)
    trainable = {n for n, _ in bb.trainable_parameters()}
    vision = {n for n, _ in bb.named_parameters() if n.startswith("vision.")}
    text = {n for n, _ in bb.named_parameters() if n.startswith("text.")}
    adapters = {n for n, _ in bb.named_parameters()} - vision - text
    expected = adapters | (set() if freeze in ("vision", "all") else vision) | (
        set() if freeze in ("language", "all") else text)
    assert trainable == expected
    bb.train()
    assert bb.vision.training == (freeze not in ("vision", "all")), "a frozen encoder must keep its BN statistics"


# ---- input validation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, match",
    [
        ("three_cameras", "has 3 cameras, expected 2"),
        ("4d", "must be a tensor of shape"),
        ("wrong_size", r"must be \(B, 2, 3, 32, 32\)"),
        ("uint8", "float in \\[0, 1\\]"),
        ("range", "must be in \\[0, 1\\]"),
        ("mask_dtype", "bool tensor"),
        ("mask_shape", r"image_mask must have shape \(3, 2\)"),
        ("tasks_len", "list of 3 instruction strings"),
        ("tasks_str", "got a single string"),
        ("tasks_type", "entry 1 is int"),
    ],
)
def test_bad_inputs_raise_clear_errors(case, match):
    bb = tiny()
    images, mask, tasks = batch()
    if case == "three_cameras":
        images = torch.rand(3, 3, 3, SIZE, SIZE)
    elif case == "4d":
        images = images[:, 0]
    elif case == "wrong_size":
        images = torch.rand(3, 2, 3, SIZE, SIZE + 8)
    elif case == "uint8":
        images = (images * 255).to(torch.uint8)
    elif case == "range":
        images = images * 255
    elif case == "mask_dtype":
        mask = mask.long()
    elif case == "mask_shape":
        mask = mask[:, :1]
    elif case == "tasks_len":
        tasks = tasks[:2]
    elif case == "tasks_str":
        tasks = "pick up the cube"
    elif case == "tasks_type":
        tasks = ["a", 3, "b"]
    with pytest.raises(ValueError, match=match):
        bb(images, mask, tasks)


def test_config_rejects_contradictions():
    with pytest.raises(ConfigError, match="square number"):
        make_backbone(dataclasses.replace(TINY, tokens_per_image=6), CAMERAS, SIZE)
    with pytest.raises(ConfigError, match="layerwise=True needs backbone.kind='hf_vlm'"):
        make_backbone(dataclasses.replace(TINY, layerwise=True), CAMERAS, SIZE)
    with pytest.raises(ConfigError, match="contradicts"):
        dataclasses.replace(TINY, kind="hf_vlm", model_name_or_path="x", train_last_n_layers=1,
                            freeze="language").validate()
    with pytest.raises(ValueError, match="unique"):
        make_backbone(TINY, ("base", "base"), SIZE)


# ---- text encoders ---------------------------------------------------------------------------------------------


def test_hashed_word_embedding_is_deterministic_and_bounded():
    a, b = HashedWordEmbedding(8, max_tokens=4), HashedWordEmbedding(8, max_tokens=4)
    assert a.token_ids("Pick up the CUBE!") == b.token_ids("pick up the cube") == a.token_ids("pick  up, the cube")
    assert a.token_ids("pick up the cube")[0] == HashedWordEmbedding.BOS
    assert len(a.token_ids("one two three four five six")) == 4
    assert a.token_ids("") == [HashedWordEmbedding.BOS], "an empty instruction still has one valid token"
    assert a.token_ids("open the drawer") != a.token_ids("close the drawer")


def test_minilm_is_the_packaged_model_frozen_and_outside_the_state_dict(minilm_backbone):
    text = minilm_backbone.text
    assert isinstance(text, FrozenTextEncoder) and text.source == str(minilm_path())
    assert text.encoder.config.hidden_size == 384 and not text.encoder.training
    assert all(not p.requires_grad for p in text.encoder.parameters())
    keys = minilm_backbone.state_dict().keys()
    assert "text.proj.weight" in keys and not any("encoder" in k for k in keys)
    assert all(p.requires_grad for p in text.parameters())  # only the projection is a parameter here


def test_minilm_embeddings_carry_meaning(minilm_backbone):
    text = minilm_backbone.text
    cube, block, drawer = (f[0] for f in text.features(
        ["pick up the red cube", "lift the red block", "open the top drawer"]))
    cos = torch.nn.functional.cosine_similarity
    assert cos(cube, block, dim=0) > cos(cube, drawer, dim=0) + 0.1


def test_minilm_cache_hits_return_identical_tensors_without_growth(minilm_backbone):
    text = minilm_backbone.text
    text._cache.clear()
    calls = []
    handle = text.encoder.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        tasks = ["put the bowl on the plate", "open the drawer", "put the bowl on the plate"]
        first = text.features(tasks)
        assert len(calls) == 1 and text.cache_len == 2, "one encoder call for the two distinct strings"
        for _ in range(3):
            again = text.features(tasks[::-1])
        assert len(calls) == 1 and text.cache_len == 2
        assert again[0] is first[2] and torch.equal(again[0], first[0])
        assert all(not f.requires_grad and f.grad_fn is None for f in first)
        tokens, mask = text(tasks)
        assert tokens.requires_grad and mask.shape == tokens.shape[:2]
        text(["a new instruction"])
        assert len(calls) == 2 and text.cache_len == 3
    finally:
        handle.remove()


def test_features_cached_in_inference_mode_still_train(minilm_backbone):
    text = minilm_backbone.text
    with torch.inference_mode():
        text(["stack the green block on the blue block"])
    tokens, mask = text(["stack the green block on the blue block"])
    tokens[mask].sum().backward()  # an inference tensor in the cache would fail here
    assert text.proj.weight.grad is not None


def test_minilm_cache_is_bounded_lru(minilm_backbone, monkeypatch):
    text = minilm_backbone.text
    text._cache.clear()
    monkeypatch.setattr(text, "cache_size", 2)
    text.features(["a", "b"])
    text.features(["a"])  # "a" becomes the most recent
    text.features(["c"])
    assert list(text._cache) == ["a", "c"]


def test_frozen_encoder_follows_dtype_moves_and_drops_stale_cache(minilm_backbone):
    text = minilm_backbone.text
    text.features(["lift the cube"])
    try:
        text.to(torch.float64)
        assert next(text.encoder.parameters()).dtype == torch.float64 and text.cache_len == 0
        tokens, _ = text(["lift the cube"])
        assert tokens.dtype == torch.float64
    finally:
        text.to(torch.float32)


def test_minilm_backbone_forward_backward(minilm_backbone):
    images, mask, tasks = batch()
    prefix = minilm_backbone(images, mask, tasks)
    text_tokens = prefix.mask[:, len(CAMERAS) * 4:].sum(1)
    assert (text_tokens >= 3).all()  # pooled + [CLS] + ... + [SEP]
    prefix.tokens.mean().backward()
    assert minilm_backbone.text.proj.weight.grad is not None


# ---- checkpoints -----------------------------------------------------------------------------------------------


def test_compact_rebuild_from_checkpoint_dir_gives_identical_outputs(tmp_path):
    bb = tiny().eval()
    bb.save_extra(tmp_path)
    assert (tmp_path / EXTRA_DIR).is_dir()
    torch.manual_seed(123)  # a different init: only load_state_dict may make them equal
    rebuilt = make_backbone(TINY, CAMERAS, SIZE, checkpoint_dir=tmp_path)
    rebuilt.load_state_dict(bb.state_dict())
    images, mask, tasks = batch()
    assert torch.equal(rebuilt.eval()(images, mask, tasks).tokens, bb(images, mask, tasks).tokens)


def test_hf_text_encoder_by_path_is_saved_with_the_checkpoint(tmp_path):
    cfg = dataclasses.replace(TINY, text_model=str(minilm_path()))
    bb = make_backbone(cfg, CAMERAS, SIZE).eval()
    bb.save_extra(tmp_path)
    assert (tmp_path / EXTRA_DIR / TEXT_ENCODER_DIR / "config.json").is_file()
    moved = dataclasses.replace(cfg, text_model=str(tmp_path / "gone"))  # the original path is not read again
    rebuilt = make_backbone(moved, CAMERAS, SIZE, checkpoint_dir=tmp_path)
    rebuilt.load_state_dict(bb.state_dict())
    images, mask, tasks = batch()
    torch.testing.assert_close(rebuilt.eval()(images, mask, tasks).tokens, bb(images, mask, tasks).tokens)


# ---- BatchNorm folded at inference -----------------------------------------------------------------------------


def _with_running_stats(model: torch.nn.Module, shape: tuple[int, ...]) -> torch.nn.Module:
    """BatchNorm statistics far from their init (mean 0, var 1), so a wrong fold cannot pass by accident."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(*shape) * 3 + 1)
    return model.eval()


@pytest.mark.parametrize("name", ["resnet10t", "regnetx_002"])
def test_fold_batchnorm_reproduces_the_source_and_leaves_it_alone(name):
    import timm

    from vla.backbones.folding import fold_batchnorm

    torch.manual_seed(0)
    source = _with_running_stats(timm.create_model(name, num_classes=0, global_pool=""), (4, 3, 64, 64))
    keys = list(source.state_dict())
    folded, count = fold_batchnorm(source)
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in source.modules())
    assert count > 0.8 * norms
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules()) == norms - count
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = source.forward_features(x)
        torch.testing.assert_close(folded.forward_features(x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert list(source.state_dict()) == keys


def test_compact_eval_serves_a_folded_encoder_that_follows_the_weights():
    backbone = tiny()
    _with_running_stats(backbone.vision, (4, 3, SIZE, SIZE))
    images, mask, tasks = batch()

    def check() -> None:
        with torch.no_grad():
            folded = backbone(images, mask, tasks).tokens
        reference = backbone(images, mask, tasks).tokens.detach()  # with gradients: the unfolded encoder
        torch.testing.assert_close(folded, reference, rtol=1e-5, atol=1e-5)
        assert backbone._folded._copy is not None

    check()
    served = backbone._folded._copy
    with torch.no_grad():  # in-place edits of a weight and of a running statistic: the copy is rebuilt
        backbone.vision.conv1[0].weight.mul_(1.5)
        next(m for m in backbone.vision.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_var.mul_(4.0)
    check()
    assert backbone._folded._copy is not served
    backbone.load_state_dict(tiny().state_dict())
    check()
    assert "_folded" not in "".join(backbone.state_dict())


def test_folding_that_changes_the_output_is_refused(caplog):
    from vla.backbones.folding import FoldedCopy

    class ScaledBetween(torch.nn.Module):  # conv and bn by name, but the forward scales between them
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x) * 2.0 + 1.0)

    source = _with_running_stats(ScaledBetween(), (2, 3, 8, 8))
    served = FoldedCopy()
    with torch.no_grad():
        assert served.get(source, "forward", torch.rand(1, 3, 8, 8)) is source
    assert not served.usable and "serving it unfolded" in caplog.text
