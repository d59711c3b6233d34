"""The imageprompt web demo (Gradio): see :mod:`imageprompt.demo.app` and docs/demo.md."""
