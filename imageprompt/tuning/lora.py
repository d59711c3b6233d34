"""Optional LoRA (Hu et al., via peft) on the UNet's cross-attention key/value projections, tuned with the prompts."""

from __future__ import annotations

from torch import nn

LORA_ADAPTER = "imageprompt_sdipc"
LORA_TARGETS = ("attn2.to_k", "attn2.to_v")


def add_unet_lora(unet, rank: int, alpha: float | None = None) -> list[nn.Parameter]:
    """LoRA (peft) on the UNet's cross-attention ``to_k``/``to_v``; returns its float32 parameters."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ImportError("LoRA tuning needs peft: pip install 'imageprompt[tune]'") from None
    if LORA_ADAPTER in (getattr(unet, "peft_config", None) or {}):
        unet.delete_adapters(LORA_ADAPTER)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                        target_modules=list(LORA_TARGETS))
    unet.add_adapter(config, adapter_name=LORA_ADAPTER)
    params = lora_parameters(unet)
    for p in params.values():
        p.data = p.data.float()  # float32 master weights; peft casts the input to them
    return list(params.values())


def lora_parameters(unet) -> dict[str, nn.Parameter]:
    """The parameters of imageprompt's LoRA adapter in ``unet``, by name (empty when there is none)."""
    return {k: p for k, p in unet.named_parameters() if "lora_" in k and f".{LORA_ADAPTER}." in k}


def lora_settings(unet) -> dict | None:
    config = (getattr(unet, "peft_config", None) or {}).get(LORA_ADAPTER)
    return None if config is None else {"rank": config.r, "alpha": config.lora_alpha}

