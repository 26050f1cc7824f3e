"""Any Hugging Face image-text model as a backbone: PaliGemma, Idefics3/SmolVLM, Qwen2.5-VL, ...

    images (B, n_cam, 3, H, W) + tasks --processor--> one prompt per sample with one image per PRESENT camera
        --VLM without its LM head--> hidden states (B, P, D) over [image tokens + instruction tokens]
    Prefix(tokens = last hidden state, mask = attention mask, layers = input of every LM layer if layerwise)

A missing camera is left out of its sample's prompt, so its pixels are never encoded and no token stands for it;
samples with fewer images are padded and the padding is masked. Prompts follow the model's own chat template when
the processor has one (the user turn only: an image placeholder per camera, then the instruction), else the
processor's image token once per camera followed by the instruction (PaliGemma's prefix format).

Layerwise states (pi0 style) are the inputs of the language model's decoder layers: action layer i attends to the
same states from which VLM layer i computes its keys and values.

Which weights train is set once at construction (see `HFVLMBackbone`); the optimiser should receive
`trainable_parameters()`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from vla.backbones.base import EXTRA_DIR, Backbone
from vla.backbones.prefix import Prefix
from vla.config import BackboneConfig

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
"""LoRA targets: the attention projections of the language model's decoder layers (Gemma, Llama, Qwen2 naming)."""


class HFVLMBackbone(Backbone):
    """A Hugging Face vision-language model (hub id or local directory) producing prefix tokens.

    Trainable weights (everything else frozen):
        vision tower + projector/connector: unless cfg.freeze is "vision" or "all".
        language model: unless cfg.freeze is "language" or "all", or LoRA is on; with cfg.train_last_n_layers = n
            >= 0 only the last n decoder layers and the final norm.
        LoRA adapters (cfg.lora_rank > 0): always; in the attention projections of every decoder layer, or of the
            last n when train_last_n_layers = n >= 0.

    Args:
        cfg: backbone settings (model_name_or_path, layerwise, freeze, train_last_n_layers, lora_rank,
            gradient_checkpointing, dtype, max_text_tokens).
        cameras: canonical camera names, in the order of the images' camera axis.
        image_size: square input resolution (the processor resizes to the model's own resolution).
        checkpoint_dir: a directory given to `save_extra`: rebuild the architecture and processor from its
            `backbone/` files with fresh weights (the policy's state_dict provides them), without reading
            `model_name_or_path`.
    """

    def __init__(self, cfg: BackboneConfig, cameras: Sequence[str], image_size: int,
                 checkpoint_dir: str | Path | None = None) -> None:
        super().__init__(cameras, image_size)
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        self.cfg = cfg
        dtype = _DTYPES[cfg.dtype]
        if checkpoint_dir is not None:
            source = str(Path(checkpoint_dir) / EXTRA_DIR)
            if not (Path(source) / "config.json").is_file():
                raise FileNotFoundError(f"{source} has no config.json: the checkpoint was not written with "
                                        f"backbone.save_extra")
            vlm = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(source), dtype=dtype)
        else:
            source = cfg.model_name_or_path
            vlm = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype)
        self.processor = AutoProcessor.from_pretrained(source, use_fast=True)
        self.processor.tokenizer.padding_side = "right"  # positions then start at 0 for every sample
        self.model = _without_lm_head(vlm)
        del vlm

        text_config = self.model.config.get_text_config()
        self.width = int(text_config.hidden_size)
        self.num_layers = len(self.decoder_layers) if cfg.layerwise else None
        self._forward_args = set(inspect.signature(self.model.forward).parameters)
        self._prompt_style = "chat" if getattr(self.processor, "chat_template", None) else "image_tokens"
        if self._prompt_style == "image_tokens" and not getattr(self.processor, "image_token", None):
            raise ValueError(f"the processor of {source} has neither a chat template nor an image token: cannot "
                             f"place images in a prompt")
        self._fast_images = _is_fast_image_processor(self.processor)
        self._image_kwargs = {"do_rescale": not self._fast_images}
        if hasattr(getattr(self.processor, "image_processor", None), "do_image_splitting"):
            # one native tile per camera: splitting a low-resolution robot frame into upscaled tiles (Idefics3 /
            # SmolVLM) multiplies its tokens without adding detail
            self._image_kwargs["do_image_splitting"] = False
        self._truncated: dict[str, str] = {}

        if cfg.lora_rank > 0:
            self._inject_lora(cfg.lora_rank, cfg.train_last_n_layers)
        self._set_trainable()
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        n_train = sum(p.numel() for _, p in self.trainable_parameters())
        n_all = sum(p.numel() for p in self.parameters())
        logger.info("hf_vlm backbone %s (%s): %.1fM parameters, %.1fM trainable", source,
                    type(self.model).__name__, n_all / 1e6, n_train / 1e6)

    # Looked up, not stored: a second attribute holding these modules would duplicate their state_dict keys.
    @property
    def language_model(self) -> nn.Module:
        return _language_model(self.model)

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return _decoder_layers(self.language_model)

    # ---- which weights train -----------------------------------------------------------------------------------
    def _last_layers(self, n: int) -> list[nn.Module]:
        return list(self.decoder_layers)[len(self.decoder_layers) - n:] if n > 0 else []

    def _inject_lora(self, rank: int, last_n: int) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        layers = self._last_layers(last_n) if last_n >= 0 else list(self.decoder_layers)
        layer_ids = {id(m) for layer in layers for m in layer.modules()}
        targets = [name for name, m in self.model.named_modules()
                   if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in _ATTENTION_PROJECTIONS
                   and id(m) in layer_ids]
        if not targets and layers:
            raise ValueError(f"LoRA found no attention projections {_ATTENTION_PROJECTIONS} in the decoder layers "
                             f"of {type(self.language_model).__name__}")
        if targets:
            lora = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets, bias="none")
            inject_adapter_in_model(lora, self.model)

    def _set_trainable(self) -> None:
        cfg = self.cfg
        language = {id(p) for p in self.language_model.parameters()}
        vision_trains = cfg.freeze in ("none", "language")
        language_trains = cfg.freeze in ("none", "vision") and cfg.lora_rank == 0
        if language_trains and cfg.train_last_n_layers >= 0:
            kept = self._last_layers(cfg.train_last_n_layers)
            norm = getattr(self.language_model, "norm", None)
            if kept and isinstance(norm, nn.Module):
                kept.append(norm)
            language_trains_ids = {id(p) for m in kept for p in m.parameters()}
        else:
            language_trains_ids = language if language_trains else set()
        for name, p in self.model.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
            elif id(p) in language:
                p.requires_grad_(id(p) in language_trains_ids)
            else:
                p.requires_grad_(vision_trains)

    # ---- encoding ----------------------------------------------------------------------------------------------
    def check_inputs(self, images: torch.Tensor, image_mask: torch.Tensor, tasks: Sequence[str]) -> None:
        super().check_inputs(images, image_mask, tasks)
        empty = (~image_mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"samples {empty} have no camera (image_mask all False): a VLM prompt needs at least "
                             f"one image")

    def prompt(self, task: str, num_images: int) -> str:
        """The text of one sample: `num_images` image placeholders, then the (truncated) instruction."""
        task = self._truncate(task)
        if self._prompt_style == "image_tokens":
            return self.processor.image_token * num_images + task
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": task}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=False)

    def _truncate(self, task: str) -> str:
        """The instruction cut to `max_text_tokens` tokens (memoised: instructions repeat)."""
        out = self._truncated.get(task)
        if out is None:
            ids = self.processor.tokenizer(task, add_special_tokens=False)["input_ids"]
            out = task if len(ids) <= self.cfg.max_text_tokens else self.processor.tokenizer.decode(
                ids[: self.cfg.max_text_tokens])
            if len(self._truncated) < 65536:
                self._truncated[task] = out
        return out

    def processor_inputs(self, images: torch.Tensor, image_mask: torch.Tensor, tasks: list[str]) -> dict:
        """Run the processor: model inputs (input_ids, attention_mask, pixel_values, ...) on the model's device."""
        if self._fast_images:  # torchvision processors take float [0, 1] tensors on any device as they are
            pixels = images
        else:  # slow ones expect 8-bit images (some resize through PIL, which would rescale floats silently)
            pixels = (images.detach() * 255).round().to(torch.uint8).cpu()
        present = image_mask.cpu().tolist()
        per_sample = [[pixels[i, j] for j, ok in enumerate(row) if ok] for i, row in enumerate(present)]
        texts = [self.prompt(task, len(imgs)) for task, imgs in zip(tasks, per_sample, strict=True)]
        enc = self.processor(images=per_sample, text=texts, return_tensors="pt", padding="longest",
                             images_kwargs=dict(self._image_kwargs))  # a copy: processors pop from it
        device, dtype = self.model.device, self.model.dtype
        return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
                for k, v in enc.items() if k in self._forward_args and isinstance(v, torch.Tensor)}

    def encode(self, images: torch.Tensor, image_mask: torch.Tensor, tasks: list[str]) -> Prefix:
        inputs = self.processor_inputs(images, image_mask, tasks)
        out = self.model(**inputs, use_cache=False, output_hidden_states=self.cfg.layerwise, return_dict=True)
        # prefix tokens leave in float32, so the action transformer's dtype does not depend on the backbone's
        tokens = out.last_hidden_state.float()
        layers = [h.float() for h in out.hidden_states[: self.num_layers]] if self.cfg.layerwise else None
        return Prefix(tokens=tokens, mask=inputs["attention_mask"].bool(), layers=layers)

    # ---- extra files -------------------------------------------------------------------------------------------
    def save_extra(self, checkpoint_dir: str | Path) -> Path:
        """Write the processor (tokenizer, image processor, chat template) and the model config."""
        path = super().save_extra(checkpoint_dir)
        self.processor.save_pretrained(path)
        self.model.config.save_pretrained(path)
        return path


def _without_lm_head(vlm: nn.Module) -> nn.Module:
    """The VLM's base model (vision tower + projector + language model); the token head is never used here."""
    inner = getattr(vlm, "model", None)
    if not isinstance(inner, nn.Module):
        raise TypeError(f"{type(vlm).__name__} has no `.model` base module to take the prefix features from")
    return inner


def _language_model(model: nn.Module) -> nn.Module:
    for attr in ("language_model", "text_model"):
        module = getattr(model, attr, None)
        if isinstance(module, nn.Module):
            return module
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if isinstance(decoder, nn.Module) and decoder is not model:
        return decoder
    raise ValueError(f"cannot find the language model inside {type(model).__name__} "
                     f"(looked for .language_model, .text_model, get_decoder())")


def _decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    layers = getattr(language_model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"{type(language_model).__name__} has no `.layers` list of decoder layers")
    return layers


def _is_fast_image_processor(processor) -> bool:
    """Fast (torchvision) image processors take tensors on any device; slow ones convert to numpy on the CPU."""
    from transformers.image_processing_utils_fast import BaseImageProcessorFast

    return isinstance(getattr(processor, "image_processor", None), BaseImageProcessorFast)
