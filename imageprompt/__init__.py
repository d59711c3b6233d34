"""imageprompt: prompt Stable Diffusion with images (SD-IPC, IP-Adapter, prompt-to-prompt)."""

__version__ = "0.1.0"

# How a real photo is inverted unless told otherwise (`imageprompt p2p --image`, the demo's real-image tab):
# Direct Inversion measures best on the bundled model (31.8 dB reconstruction, 90% edit success;
# docs/prompt-to-prompt.md).
DEFAULT_INVERSION = "direct"

__all__ = ["SDIPCConverter", "StableDiffusionImagePromptPipeline", "load_pipeline", "__version__"]

_LAZY = {
    "SDIPCConverter": "imageprompt.conversion",
    "StableDiffusionImagePromptPipeline": "imageprompt.pipelines.pipeline_sdipc",
    "load_pipeline": "imageprompt.pipelines.loading",
}


def __getattr__(name):
    # Lazy so that `imageprompt --help` does not import torch; diffusers also
    # finds saved pipeline components (e.g. SDIPCConverter) by this name.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'imageprompt' has no attribute {name!r}")
