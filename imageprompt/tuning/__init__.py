"""SD-IPC tuning: deep visual prompts in CLIP's vision tower, trained through the frozen UNet.

Ding et al., "The CLIP Model is Secretly an Image-to-Prompt Converter" (SD-IPC,
NeurIPS 2023), Sec. 4: the closed-form conversion
``h = scale * (e @ pinv(W_t).T) / ||.||`` gets sharper when CLIP's image
embedding ``e`` is adapted to a domain (about 100 images) or to the reference
image itself (about 30 iterations, "online"). What is tuned is the authors'
choice: deep visual prompt tuning (Jia et al., "Visual Prompt Tuning", ECCV
2022, VPT-deep) of the vision tower; optionally LoRA (Hu et al.) on the UNet's
cross-attention key/value projections. The conversion matrix, its scale and
every base weight stay frozen. The loss is Stable Diffusion's own
noise-prediction loss (Ho et al., Eq. 14) with the converted image prompt as
the conditioning.

- :mod:`.prompts`: the visual prompts and the forward hooks that insert them;
- :mod:`.lora`: the optional UNet LoRA (peft);
- :mod:`.loss`: images encoded once and the noise-prediction loss;
- :mod:`.files`: the safetensors tuning file, its CLIP identity check, checkpoints;
- :mod:`.train`: :class:`TuningConfig` and the domain and online loops.
"""

from imageprompt.tuning.files import (
    CHECKPOINT_KEY,
    FORMAT,
    FORMAT_VERSION,
    RESUME_KEYS,
    VISION_KEYS,
    check_tuning_file,
    clip_identity,
    identity_mismatch,
    load_checkpoint,
    load_tuning,
    read_tuning_metadata,
    remove_tuning,
    same_weight,
    save_checkpoint,
    save_tuning,
    weight_fingerprint,
)
from imageprompt.tuning.lora import LORA_ADAPTER, LORA_TARGETS, add_unet_lora, lora_parameters, lora_settings
from imageprompt.tuning.loss import (
    StepInputs,
    TuningData,
    clip_pixel_values,
    denoising_loss,
    empty_prompt_bos,
    evaluation_loss,
    prepare_images,
    step_seed,
    training_scheduler,
)
from imageprompt.tuning.prompts import (
    PROMPTS_ATTR,
    DeepVisualPrompts,
    TuningFileError,
    attach_visual_prompts,
    detach_visual_prompts,
    visual_prompts_of,
)
from imageprompt.tuning.train import (
    MIXED_PRECISION,
    MODES,
    TuningConfig,
    TuningOutput,
    describe,
    tune,
    tune_domain,
    tune_online,
    tuning_settings,
)

__all__ = [
    # prompts
    "PROMPTS_ATTR", "DeepVisualPrompts", "TuningFileError", "attach_visual_prompts", "detach_visual_prompts",
    "visual_prompts_of",
    # lora
    "LORA_ADAPTER", "LORA_TARGETS", "add_unet_lora", "lora_parameters", "lora_settings",
    # loss
    "StepInputs", "TuningData", "clip_pixel_values", "denoising_loss", "empty_prompt_bos", "evaluation_loss",
    "prepare_images", "step_seed", "training_scheduler",
    # files
    "CHECKPOINT_KEY", "FORMAT", "FORMAT_VERSION", "RESUME_KEYS", "VISION_KEYS", "check_tuning_file",
    "clip_identity", "identity_mismatch", "load_checkpoint", "load_tuning", "read_tuning_metadata",
    "remove_tuning", "same_weight", "save_checkpoint", "save_tuning", "weight_fingerprint",
    # train
    "MIXED_PRECISION", "MODES", "TuningConfig", "TuningOutput", "describe", "tune", "tune_domain", "tune_online",
    "tuning_settings",
]
