"""``load_ip_adapter`` / ``set_ip_adapter_scale`` / ``unload_ip_adapter`` on imageprompt pipelines.

Thin pipeline methods over :mod:`imageprompt.ip_adapter`, whose state lives on the
UNet: a pipeline holds no adapter state of its own.
"""

from __future__ import annotations

import torch

from imageprompt.ip_adapter import (
    IPAdapter,
    as_image_list,
    install_adapters,
    load_adapters,
    loaded_adapters,
    set_branch_scales,
)


class ImagePromptAdapterMixin:
    """``load_ip_adapter`` / ``set_ip_adapter_scale`` / ``unload_ip_adapter`` on imageprompt pipelines.

    Same calls as diffusers' ``IPAdapterMixin``; the adapters' image encoders are
    kept apart from the pipeline's ``image_encoder`` (SD-IPC's CLIP).
    """

    @property
    def image_adapters(self) -> list:
        """The image adapters installed on this pipeline's UNet (shared by every pipeline over it)."""
        return loaded_adapters(self.unet)

    def load_ip_adapter(self, pretrained_model_name_or_path_or_dict, subfolder=None, weight_name=None,
                        image_encoder_folder: str | None = "image_encoder", image_encoder=None,
                        local_files_only: bool | None = None):
        """Load official IP-Adapter checkpoints (replacing any loaded before; an SD-IPC branch is kept).

        Args:
            pretrained_model_name_or_path_or_dict: hub id, folder, weight file, a state dict, or a list of these.
            subfolder / weight_name: where the file lies in the repository or folder (lists allowed).
            image_encoder_folder: the encoder folder next to the weights (``"image_encoder"``), or a path with ``/``
                from the repository root.
            image_encoder: a folder or hub id of a ``CLIPVisionModelWithProjection``, or a model, instead.
        """
        adapters = load_adapters(self.unet, pretrained_model_name_or_path_or_dict, subfolder, weight_name,
                                 image_encoder_folder, image_encoder, local_files_only)
        keep = [a for a in self.image_adapters if not isinstance(a, IPAdapter)]
        install_adapters(self.unet, adapters + keep)

    def set_ip_adapter_scale(self, scale) -> None:
        """A float, an InstantStyle per-block dict, or a list of those (one per adapter, in load order)."""
        if not self.image_adapters:
            raise ValueError("no image adapter is loaded")
        set_branch_scales(self.unet, scale, len(self.image_adapters))

    def unload_ip_adapter(self) -> None:
        """Remove every image adapter (and the SD-IPC branch); the UNet is plain again."""
        install_adapters(self.unet, [])

    def check_ip_adapter_inputs(self, ip_adapter_image, ip_adapter_image_embeds, negative_ip_adapter_image):
        count = len(self.image_adapters)
        if ip_adapter_image is not None and ip_adapter_image_embeds is not None:
            raise ValueError("give `ip_adapter_image` or `ip_adapter_image_embeds`, not both")
        given = ip_adapter_image if ip_adapter_image is not None else ip_adapter_image_embeds
        if given is None:
            if count:
                raise ValueError(f"{count} image adapter(s) loaded: pass `ip_adapter_image` (or "
                                 "`ip_adapter_image_embeds`), or call `unload_ip_adapter()`")
            if negative_ip_adapter_image is not None:
                raise ValueError("`negative_ip_adapter_image` needs `ip_adapter_image`")
            return
        if not count:
            raise ValueError("`ip_adapter_image` needs an adapter: call `load_ip_adapter(...)` first")
        for name, value in (("ip_adapter_image", ip_adapter_image), ("negative_ip_adapter_image",
                                                                     negative_ip_adapter_image)):
            if value is None:
                continue
            per_adapter = value if isinstance(value, list) and count > 1 else [value]
            if len(per_adapter) != count:
                raise ValueError(f"`{name}` has {len(per_adapter)} entries for {count} loaded adapters")
            for entry in per_adapter:
                as_image_list(entry)
        if ip_adapter_image_embeds is not None and (not isinstance(ip_adapter_image_embeds, list)
                                                    or len(ip_adapter_image_embeds) != count):
            raise ValueError(f"`ip_adapter_image_embeds` must be a list of {count} tensors, one per adapter")

    @torch.no_grad()
    def prepare_ip_adapter_image_embeds(self, ip_adapter_image, ip_adapter_image_embeds, device, batch: int,
                                        do_classifier_free_guidance: bool, negative_ip_adapter_image=None):
        """``added_cond_kwargs["image_embeds"]``: per adapter ``(batch [x2 for CFG], num_images, ...)``.

        Images per adapter follow diffusers: with one adapter ``ip_adapter_image``
        is an image or a list of images; with several, one such entry per adapter.
        Precomputed ``ip_adapter_image_embeds`` hold ``[negative, positive]`` along
        dim 0 under classifier-free guidance, as diffusers' do.
        """
        adapters = self.image_adapters
        pairs = []
        if ip_adapter_image_embeds is None:
            images = ip_adapter_image if len(adapters) > 1 else [ip_adapter_image]
            negatives = (negative_ip_adapter_image if len(adapters) > 1 else [negative_ip_adapter_image]) \
                if negative_ip_adapter_image is not None else [None] * len(adapters)
            for adapter, imgs, negs in zip(adapters, images, negatives):
                imgs = as_image_list(imgs)
                negs = None if negs is None else as_image_list(negs)
                if negs is not None and len(negs) not in (1, len(imgs)):
                    raise ValueError(f"{len(negs)} negative image prompts for {len(imgs)} image prompts")
                pos, neg = adapter.encode(self, imgs, negs, device)
                if neg.shape[0] != pos.shape[0]:
                    neg = neg.expand(pos.shape[0], *neg.shape[1:])
                pairs.append((pos[None], neg[None]))
        else:
            for embeds in ip_adapter_image_embeds:
                embeds = embeds.to(device=device, dtype=self.unet.dtype)
                if do_classifier_free_guidance:
                    neg, pos = embeds.chunk(2)
                else:
                    pos, neg = embeds, None
                pairs.append((pos, neg))
        out = []
        for pos, neg in pairs:
            if pos.shape[0] not in (1, batch):
                raise ValueError(f"image embeds for {pos.shape[0]} rows; expected 1 or {batch}")
            pos = pos.expand(batch, *pos.shape[1:])
            if do_classifier_free_guidance:
                out.append(torch.cat([neg.expand(batch, *neg.shape[1:]), pos]))
            else:
                out.append(pos)
        return out
