"""imageprompt: prompt Stable Diffusion with images (SD-IPC, IP-Adapter, prompt-to-prompt)."""

__version__ = "0.1.0"

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
