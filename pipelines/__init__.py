"""diffusers pipelines of imageprompt, one per file."""

from imageprompt.pipelines.pipeline_masactrl import StableDiffusionMasaCtrlPipeline, StableDiffusionXLMasaCtrlPipeline
from imageprompt.pipelines.pipeline_p2p import PromptToPromptPipelineOutput, StableDiffusionPromptToPromptPipeline
from imageprompt.pipelines.pipeline_p2p_sd3 import StableDiffusion3PromptToPromptPipeline
from imageprompt.pipelines.pipeline_p2p_xl import StableDiffusionXLPromptToPromptPipeline
from imageprompt.pipelines.pipeline_sdipc import ImagePromptPipelineOutput, StableDiffusionImagePromptPipeline
from imageprompt.pipelines.pipeline_sdipc_sd3 import StableDiffusion3ImagePromptPipeline
from imageprompt.pipelines.pipeline_sdipc_xl import StableDiffusionXLImagePromptPipeline
from imageprompt.pipelines.pipeline_style_aligned import StableDiffusionStyleAlignedPipeline

__all__ = ["ImagePromptPipelineOutput", "StableDiffusionImagePromptPipeline", "PromptToPromptPipelineOutput",
           "StableDiffusionPromptToPromptPipeline", "StableDiffusionStyleAlignedPipeline",
           "StableDiffusionXLImagePromptPipeline", "StableDiffusionXLPromptToPromptPipeline",
           "StableDiffusionMasaCtrlPipeline", "StableDiffusionXLMasaCtrlPipeline",
           "StableDiffusion3ImagePromptPipeline", "StableDiffusion3PromptToPromptPipeline"]
