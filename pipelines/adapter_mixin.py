"""``load_ip_adapter`` / ``set_ip_adapter_scale`` / ``unload_ip_adapter`` on imageprompt pipelines.

Thin pipeline methods over :mod:`imageprompt.ip_adapter`, whose state lives on the
UNet: a pipeline holds no adapter state of its own.
"""

from __future__ import annotations

import weakref

import torch

from imageprompt.ip_adapter import (
    IPAdapter,
    as_image_list,
    install_adapters,
    load_adapters,
    loaded_adapters,
    set_adapter_windows,
    set_branch_scales,
)

# The image encoders that load_ip_adapter put in a pipeline's `image_encoder` component (unload_ip_adapter takes
# them out again; an encoder the user gave the pipeline stays, and serves adapters loaded without one)
FILLED_ENCODERS = weakref.WeakSet()


class ImagePromptAdapterMixin:
    """``load_ip_adapter`` / ``set_ip_adapter_scale`` / ``unload_ip_adapter`` on imageprompt pipelines.

    Same calls as diffusers' ``IPAdapterMixin``: files are parsed by diffusers' own loader, and the pipeline's
    ``image_encoder`` component holds the (first) adapter's image encoder, as in diffusers. SD-IPC's CLIP has its
    own components (``sdipc_image_encoder``), so each technique keeps its encoder.
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
            image_encoder: a folder or hub id of a ``CLIPVisionModelWithProjection``, or a model, instead. Left out:
                the pipeline's ``image_encoder`` when one was given to it (diffusers' rule), else the folder.
        """
        current = getattr(self, "image_encoder", None)
        given = current is not None and current not in FILLED_ENCODERS  # the user's, not one an adapter brought
        if image_encoder is None and given:
            image_encoder = current
        adapters = load_adapters(self, pretrained_model_name_or_path_or_dict, subfolder, weight_name,
                                 image_encoder_folder, image_encoder, local_files_only)
        keep = [a for a in self.image_adapters if not isinstance(a, IPAdapter)]
        install_adapters(self.unet, adapters + keep)
        if not given:
            FILLED_ENCODERS.add(adapters[0].image_encoder)
            self.register_modules(image_encoder=adapters[0].image_encoder)

    def set_ip_adapter_scale(self, scale) -> None:
        """A float, an InstantStyle per-block dict, or a list of those (one per adapter, in load order)."""
        if not self.image_adapters:
            raise ValueError("no image adapter is loaded")
        set_branch_scales(self.unet, scale, len(self.image_adapters))

    def set_ip_adapter_window(self, window) -> None:
        """Apply adapters only between fractions ``begin`` and ``end`` of the sampling steps.

        ``(begin, end)`` for every adapter, a list with one pair (or None: every step) per adapter in load order,
        or None. Step ``i`` of ``N`` is inside when ``int(begin * N) <= i < int(end * N)``; outside, the adapter
        is skipped as at scale 0. Kept on the UNet's adapters: loading adapters again resets it.
        """
        set_adapter_windows(self.unet, window)

    @torch.no_grad()
    def encode_ip_adapter_image(self, ip_adapter_image, combine="concat", content_text=None,
                                content_scale: float = 1.0, negative_ip_adapter_image=None,
                                do_classifier_free_guidance: bool = True, text_encoder=None, tokenizer=None
                                ) -> list[torch.Tensor]:
        """Image prompts as ``ip_adapter_image_embeds`` (per adapter ``[negative, positive]`` along dim 0 with
        guidance), with the references of each adapter combined and content words subtracted
        (:mod:`imageprompt.image_embeds`).

        Args:
            ip_adapter_image / negative_ip_adapter_image: as for ``__call__``.
            combine: ``concat`` (default: every image's tokens), ``add``, ``subtract``, ``average`` or
                ``norm-average``; one for all adapters or a list with one per adapter. The negative embeddings of a
                combined prompt are the mean of the images' negatives (zeros stay zeros).
            content_text: InstantStyle's content words, subtracted from each image embedding in CLIP's projected
                joint space (sd15-format adapters only); one for all adapters or a list (None: none).
            content_scale: weight of the subtracted text embedding.
            text_encoder / tokenizer: the text tower (with projection) of the adapter's CLIP. Default: the
                pipeline's own CLIP, when it is the adapter's image encoder (as for the bundled adapter).
        """
        from imageprompt.image_embeds import COMBINE_MODES, combine_embeds, subtract_content

        adapters = self.image_adapters
        if ip_adapter_image is None:
            raise ValueError("`ip_adapter_image` is required")
        self.check_ip_adapter_inputs(ip_adapter_image, None, negative_ip_adapter_image)
        modes = _per_adapter(combine, len(adapters), "combine")
        texts = _per_adapter(content_text, len(adapters), "content_text")
        for mode in modes:
            if mode not in COMBINE_MODES:
                raise ValueError(f"combine mode must be one of {', '.join(COMBINE_MODES)}, got {mode!r}")
        for i, (adapter, text) in enumerate(zip(adapters, texts)):
            if text is not None and (not isinstance(text, str) or not text.strip() or adapter.kind != "sd15"):
                raise ValueError(f"content subtraction needs content words (a non-empty string) and an sd15-format "
                                 f"adapter, which reads CLIP's projected image embeddings; adapter {i} is "
                                 f"{adapter.kind!r}")
        images = ip_adapter_image if len(adapters) > 1 else [ip_adapter_image]
        negatives = [None] * len(adapters) if negative_ip_adapter_image is None else \
            negative_ip_adapter_image if len(adapters) > 1 else [negative_ip_adapter_image]
        device, out = self._execution_device, []
        for adapter, imgs, negs, mode, text in zip(adapters, images, negatives, modes, texts):
            imgs, negs = as_image_list(imgs), None if negs is None else as_image_list(negs)
            if negs is not None and len(negs) not in (1, len(imgs)):
                raise ValueError(f"{len(negs)} negative image prompts for {len(imgs)} image prompts")
            # one image at a time: an image's embedding must not depend on the others (x - x is exactly 0)
            pairs = [adapter.encode(self, [im], None if negs is None else [negs[min(j, len(negs) - 1)]], device)
                     for j, im in enumerate(imgs)]
            pos, neg = torch.cat([p for p, _ in pairs]), torch.cat([n for _, n in pairs])
            if text is not None:
                pos = subtract_content(pos, self._content_text_embeds(adapter, text, text_encoder, tokenizer),
                                       content_scale)
            pos = combine_embeds(pos, mode)
            neg = neg if mode == "concat" else neg.mean(0, keepdim=True)
            out.append(torch.cat([neg[None], pos[None]]) if do_classifier_free_guidance else pos[None])
        return out

    def _content_text_embeds(self, adapter, text: str, text_encoder=None, tokenizer=None) -> torch.Tensor:
        from imageprompt.image_embeds import projected_text_embeds
        from imageprompt.model_identity import same_encoder

        if text_encoder is not None:
            if tokenizer is None:
                raise ValueError("with `text_encoder`, pass its `tokenizer` too")
            return projected_text_embeds(text_encoder, tokenizer, [text])
        for vision, tower, tok in (("sdipc_image_encoder", "text_encoder", "tokenizer"),
                                   ("sdipc_image_encoder_2", "text_encoder_2", "tokenizer_2")):  # SD 1.x; SDXL's bigG
            encoder = getattr(self, vision, None)
            if encoder is not None and same_encoder(encoder, adapter.image_encoder):
                model = getattr(self, tower)
                projection = getattr(model, "text_projection", None)  # else SD-IPC's copy of CLIP's projection
                projection = projection if projection is not None else self.converter.text_projection
                return projected_text_embeds(model, getattr(self, tok), [text], projection)
        raise ValueError("content subtraction needs the text tower of the adapter's own CLIP (its image encoder "
                         "is not this pipeline's CLIP): pass text_encoder= (a CLIPTextModelWithProjection or "
                         "CLIPModel) and tokenizer=")

    def ip_adapter_records(self) -> list[dict]:
        """What made the embeddings of each loaded adapter: its name, kind and image encoder's identity."""
        from imageprompt.model_identity import encoder_identity

        return [{"name": str(a.name), "kind": a.kind,
                 "encoder": encoder_identity(getattr(a, "image_encoder", None) or self.sdipc_image_encoder)}
                for a in self.image_adapters]

    def save_ip_adapter_image_embeds(self, path, embeds: list[torch.Tensor], do_classifier_free_guidance: bool = True,
                                     extra: dict | None = None):
        """Save embeddings from :meth:`encode_ip_adapter_image` (safetensors, with the adapters' records)."""
        from imageprompt.image_embeds import save_image_embeds

        return save_image_embeds(path, embeds, self.ip_adapter_records(), do_classifier_free_guidance, extra)

    def load_ip_adapter_image_embeds(self, path, do_classifier_free_guidance: bool = True) -> list[torch.Tensor]:
        """Embeddings saved by :meth:`save_ip_adapter_image_embeds`, checked against the loaded adapters, as
        ``ip_adapter_image_embeds``; a file saved with guidance also serves sampling without it."""
        from imageprompt.image_embeds import check_embeds_match, load_image_embeds

        embeds, metadata = load_image_embeds(path)
        check_embeds_match(metadata, self.ip_adapter_records(), str(path))
        if do_classifier_free_guidance and not metadata["guidance"]:
            raise ValueError(f"{path} was saved without negative embeddings: sample with guidance_scale <= 1, "
                             "or save it again with guidance")
        if not do_classifier_free_guidance and metadata["guidance"]:
            embeds = [e[1:] for e in embeds]
        return embeds

    def unload_ip_adapter(self) -> None:
        """Remove every image adapter (and the SD-IPC branch); the UNet is plain again. The adapters' image
        encoder leaves the ``image_encoder`` component, as in diffusers; one given to the pipeline stays."""
        if getattr(self, "image_encoder", None) in FILLED_ENCODERS:
            self.register_modules(image_encoder=None)
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


def _per_adapter(value, count: int, name: str) -> list:
    """One value for every adapter, or a list with one per adapter."""
    values = value if isinstance(value, list) else [value] * count
    if len(values) != count:
        raise ValueError(f"`{name}` has {len(values)} entries for {count} loaded adapters")
    return values
