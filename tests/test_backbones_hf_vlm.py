"""The Hugging Face VLM backbone on tiny random PaliGemma, Idefics3 and Qwen2.5-VL checkpoints read from disk."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fixtures.tiny_vlms import FAMILIES, HIDDEN, TEXT_LAYERS  # `tiny_vlm_dirs` comes from conftest.py
from PIL import Image

from vla.backbones import EXTRA_DIR, make_backbone
from vla.backbones.hf_vlm import HFVLMBackbone
from vla.config import BackboneConfig

CAMERAS = ("base", "wrist")
SIZE = 48
TASKS = ["pick up the bowl", "open the top drawer of the cabinet", "lift the red cube"]

pytestmark = pytest.mark.parametrize("family", FAMILIES)


def build(dirs, family: str, checkpoint_dir=None, **changes) -> HFVLMBackbone:
    torch.manual_seed(0)
    cfg = BackboneConfig(kind="hf_vlm", model_name_or_path=str(dirs[family]), **changes)
    return make_backbone(cfg, CAMERAS, SIZE, checkpoint_dir=checkpoint_dir)


def batch(mask=((1, 1), (1, 0), (0, 1))):
    images = torch.rand(len(mask), len(CAMERAS), 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    return images, torch.tensor(mask).bool(), TASKS[: len(mask)]


def image_tokens_per_sample(bb: HFVLMBackbone, images, mask, tasks) -> list[int]:
    ids = bb.processor_inputs(images, mask, tasks)["input_ids"]
    return (ids == bb.model.config.image_token_id).sum(1).tolist()


def names(bb: HFVLMBackbone, part: str) -> set[str]:
    """Parameter names of the language model ("language") or of everything else ("vision")."""
    lm = {id(p) for p in bb.language_model.parameters()}
    return {n for n, p in bb.named_parameters() if (id(p) in lm) == (part == "language")}


def test_forward_backward_shapes_and_masks(tiny_vlm_dirs, family):
    bb = build(tiny_vlm_dirs, family)
    images, mask, tasks = batch()
    prefix = bb(images, mask, tasks)
    p = prefix.mask.shape[1]
    assert prefix.tokens.shape == (3, p, HIDDEN) and bb.width == HIDDEN
    assert prefix.tokens.dtype == torch.float32 and prefix.layers is None and bb.num_layers is None
    inputs = bb.processor_inputs(images, mask, tasks)
    assert torch.equal(prefix.mask, inputs["attention_mask"].bool())
    assert not prefix.mask.all(), "samples with fewer cameras are padded, and the padding is masked"
    prefix.tokens[prefix.mask].square().mean().backward()
    unused = [n for n, q in bb.trainable_parameters() if q.grad is None]
    assert not unused, f"trainable parameters outside the graph break DDP: {unused}"


def test_missing_camera_is_left_out_of_the_prompt(tiny_vlm_dirs, family):
    bb = build(tiny_vlm_dirs, family).eval()
    images, mask, tasks = batch()
    per_image = image_tokens_per_sample(bb, images[:1], mask[:1], tasks[:1])[0] // 2
    assert per_image > 0
    assert image_tokens_per_sample(bb, images, mask, tasks) == [2 * per_image, per_image, per_image]

    prefix = bb(images, mask, tasks)
    other = images.clone()
    other[1, 1], other[2, 0] = 1.0, 0.0  # pixels of missing cameras change nothing
    assert torch.equal(bb(other, mask, tasks).tokens, prefix.tokens)
    other[0, 1] = 1.0 - other[0, 1]  # pixels of a present camera do
    assert not torch.allclose(bb(other, mask, tasks).tokens[0], prefix.tokens[0])


def test_pixels_match_the_processor_on_8bit_images(tiny_vlm_dirs, family):
    """Float [0, 1] cameras are preprocessed as the processor preprocesses the same frame given as a PIL image."""
    bb = build(tiny_vlm_dirs, family)
    _, mask, tasks = batch(mask=((1, 0),))
    coarse = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(0))  # a smooth, camera-like frame
    frame = (torch.nn.functional.interpolate(coarse, size=SIZE, mode="bilinear")[0] * 255).round().to(torch.uint8)
    images = (frame / 255)[None, None].expand(1, 2, -1, -1, -1)
    pil = Image.fromarray(frame.permute(1, 2, 0).numpy())
    reference = bb.processor(images=[[pil]], text=[bb.prompt(tasks[0], 1)], return_tensors="pt")
    ours = bb.processor_inputs(images, mask, tasks)
    assert torch.equal(ours["input_ids"], reference["input_ids"])
    diff = (ours["pixel_values"] - reference["pixel_values"]).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.05  # resampling floats vs 8-bit values: rounding only


def test_sample_without_any_camera_is_rejected(tiny_vlm_dirs, family):
    bb = build(tiny_vlm_dirs, family)
    images, mask, tasks = batch(mask=((1, 1), (0, 0), (1, 0)))
    with pytest.raises(ValueError, match=r"samples \[1\] have no camera"):
        bb(images, mask, tasks)
    with pytest.raises(ValueError, match="has 1 cameras, expected 2"):
        bb(images[:, :1], mask[:, :1], tasks)


def test_layerwise_returns_one_state_per_decoder_layer(tiny_vlm_dirs, family):
    bb = build(tiny_vlm_dirs, family, layerwise=True)
    prefix = bb(*batch())
    assert bb.num_layers == TEXT_LAYERS and len(prefix.layers) == TEXT_LAYERS
    assert all(h.shape == prefix.tokens.shape and h.dtype == torch.float32 for h in prefix.layers)
    assert not torch.allclose(prefix.layers[0], prefix.layers[-1])
    sum(h[prefix.mask].mean() for h in prefix.layers).backward()
    assert bb.decoder_layers[0].self_attn.q_proj.weight.grad is not None


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"freeze": "none"}, "vision+language"),
        ({"freeze": "vision"}, "language"),
        ({"freeze": "language"}, "vision"),
        ({"freeze": "all"}, ""),
        ({"freeze": "vision", "train_last_n_layers": 1}, "last1"),
        ({"freeze": "none", "train_last_n_layers": 0}, "vision"),
        ({"freeze": "all", "lora_rank": 4}, "lora-all"),
        ({"freeze": "language", "lora_rank": 4, "train_last_n_layers": 1}, "vision+lora-last1"),
    ],
)
def test_trainable_parameters_follow_the_flags(tiny_vlm_dirs, family, changes, expected):
    bb = build(tiny_vlm_dirs, family, **changes)
    trainable = {n for n, _ in bb.trainable_parameters()}
    lora = {n for n in trainable if "lora_" in n}
    want: set[str] = set()
    for part in expected.split("+") if expected else []:
        if part in ("vision", "language"):
            want |= names(bb, part) - {n for n in names(bb, part) if "lora_" in n}
        elif part == "last1":
            last = f".layers.{TEXT_LAYERS - 1}."
            want |= {n for n in names(bb, "language") if last in n or n.endswith("norm.weight") and ".layers." not in n}
        elif part.startswith("lora"):
            layers = range(TEXT_LAYERS) if part == "lora-all" else [TEXT_LAYERS - 1]
            assert {int(n.split(".layers.")[1].split(".")[0]) for n in lora} == set(layers)
            assert len(lora) == 4 * 2 * len(layers)  # q, k, v, o projections x (A, B)
            want |= lora
    assert trainable == want
    if "lora" not in expected:
        assert not lora

    prefix = bb(*batch())
    if trainable:
        prefix.tokens[prefix.mask].mean().backward()
        frozen_with_grad = [n for n, p in bb.named_parameters() if not p.requires_grad and p.grad is not None]
        assert not frozen_with_grad


def test_bf16_with_gradient_checkpointing(tiny_vlm_dirs, family):
    bb = build(tiny_vlm_dirs, family, dtype="bfloat16", gradient_checkpointing=True, lora_rank=2, freeze="vision")
    assert bb.model.dtype == torch.bfloat16 and bb.model.is_gradient_checkpointing
    prefix = bb.train()(*batch())
    assert prefix.tokens.dtype == torch.float32
    prefix.tokens[prefix.mask].mean().backward()
    assert all(p.grad is not None for _, p in bb.trainable_parameters())


def test_rebuild_from_checkpoint_dir_without_the_source(tiny_vlm_dirs, family, tmp_path):
    bb = build(tiny_vlm_dirs, family, lora_rank=2, layerwise=True).eval()
    with torch.no_grad():  # make the adapters matter, so a lost LoRA weight would show
        for n, p in bb.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    bb.save_extra(tmp_path)
    assert (tmp_path / EXTRA_DIR / "config.json").is_file()
    cfg = dataclasses.replace(bb.cfg, model_name_or_path=str(tmp_path / "moved-away"))
    torch.manual_seed(1)
    rebuilt = make_backbone(cfg, CAMERAS, SIZE, checkpoint_dir=tmp_path)
    rebuilt.load_state_dict(bb.state_dict())
    images, mask, tasks = batch()
    a, b = bb(images, mask, tasks), rebuilt.eval()(images, mask, tasks)
    assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(b.tokens, a.tokens)
    torch.testing.assert_close(b.layers[1], a.layers[1])


def test_instruction_is_truncated_to_max_text_tokens(tiny_vlm_dirs, family):
    bb = build(tiny_vlm_dirs, family, max_text_tokens=4)
    long = "pick up the black bowl between the plate and the ramekin and place it on the plate"
    assert len(bb.processor.tokenizer(bb._truncate(long), add_special_tokens=False)["input_ids"]) <= 4
    images, mask, _ = batch(mask=((1, 1), (1, 1)))
    short, full = bb(images, mask, ["pick", long]).mask.sum(1).tolist()
    assert full - short <= 4
