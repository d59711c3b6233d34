"""``imageprompt demo``: the Gradio web demo on any model the command line accepts."""

from __future__ import annotations

from imageprompt.cli.common import CommandError, add_compile_option, add_model_options, port_number, positive_int


def register(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo", help="the web demo (Gradio)",
        description="Serve the imageprompt web demo: variation, image + text editing and the other installed "
                    "capabilities, one tab each. Without --model: SD 1.5 if it is in the local Hugging Face cache, "
                    "else the bundled shapes-world model.",
    )
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; "
                                                          "0.0.0.0 for every interface)")
    demo.add_argument("--port", type=port_number, default=7860, help="port (default 7860)")
    demo.add_argument("--share", action="store_true", help="also open a temporary public gradio.live link")
    demo.add_argument("--max-queue", type=positive_int, default=16, help="waiting jobs before new ones are refused")
    demo.add_argument("--max-file-size", default="10mb", help="largest upload (default 10mb)")
    demo.add_argument("--adapter", action="append", metavar="PATH_OR_ID[:WEIGHT_NAME]",
                      help="IP-Adapter weights for the IP-Adapter tab: a .safetensors/.bin file, HUB_ID:path/in/repo, "
                           "a short name (sd15, sd15_light, plus, plus-face, full-face), or 'sdipc' for the "
                           "training-free SD-IPC branch; repeatable. Without it: the bundled adapter with the bundled "
                           "model, else no IP-Adapter tab.")
    demo.add_argument("--image-encoder", metavar="PATH",
                      help="CLIP vision folder of the adapter (default: image_encoder next to the weights; for the "
                           "bundled checkpoints/shapes-ip-adapter.safetensors, the bundled CLIP)")
    demo.add_argument("--controlnet", metavar="FOLDER",
                      help="a diffusers ControlNet for this model: the tabs then take a control image")
    add_compile_option(demo)
    add_model_options(demo)
    demo.set_defaults(func=run_demo)


def run_demo(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise CommandError("the demo needs gradio: pip install 'imageprompt[demo]'") from None
    if args.image_encoder and not args.adapter:
        raise CommandError("--image-encoder needs --adapter")
    if args.adapter:  # find the weights before the model loads
        from imageprompt.adapter_files import parse_adapter_spec, resolve_weight_file

        for spec in args.adapter:
            if spec != "sdipc":
                resolve_weight_file(*parse_adapter_spec(spec))
    from imageprompt.demo.app import launch

    return launch(model=args.model, clip=args.clip, dtype=args.dtype, device=args.device, attention=args.attention,
                  scheduler=args.scheduler, config=args.config, vae=args.vae, clip_2=args.clip_2, adapters=args.adapter,
                  image_encoder=args.image_encoder, controlnet=args.controlnet, host=args.host, port=args.port,
                  share=args.share, max_queue=args.max_queue, max_file_size=args.max_file_size, debug=args.debug,
                  compile=args.compile)
