"""diffusers pipelines of imageprompt, one per file."""

from imageprompt.pipelines.pipeline_p2p import PromptToPromptPipelineOutput, StableDiffusionPromptToPromptPipeline
from imageprompt.pipelines.pipeline_sdipc import ImagePromptPipelineOutput, StableDiffusionImagePromptPipeline

__all__ = ["ImagePromptPipelineOutput", "StableDiffusionImagePromptPipeline", "PromptToPromptPipelineOutput",
           "StableDiffusionPromptToPromptPipeline"]
