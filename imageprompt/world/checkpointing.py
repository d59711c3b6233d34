"""Resumable training of the bundled model: a training state saved as safetensors + JSON.

A checkpoint is a folder (written to a temporary sibling, then renamed into place, so a run
killed while saving leaves the previous checkpoint whole):

- ``model.safetensors``: the trained weights;
- ``ema.safetensors``: the EMA's shadow weights (``diffusers.training_utils.EMAModel``), in
  parameter order (``param.0``, ``param.1``, ...);
- ``optimizer.safetensors``: every tensor of the optimizer's state (``state.<i>.<name>``);
- ``rng.safetensors``: the training generator's state and torch's global CPU generator's;
- ``state.json``: the step reached, the optimizer's param groups and the other non-tensor
  state, the EMA's scalars, the arguments of the run (``args``) and the runs so far
  (``runs``, what ``training.json`` records).

Nothing is unpickled: tensors are read with safetensors, everything else is JSON.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_JSON = "state.json"


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_training_state(folder: Path, *, model: torch.nn.Module, ema, optimizer: torch.optim.Optimizer,
                        generator: torch.Generator, step: int, args: dict, runs: list[dict],
                        extra: dict | None = None) -> Path:
    """Write the state after ``step`` steps to ``folder`` (replacing what is there)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    ema_state = ema.state_dict()
    save_file({f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(ema_state["shadow_params"])},
              tmp / "ema.safetensors")
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    save_file({"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}, tmp / "rng.safetensors")
    meta = {
        "step": step,
        "optimizer": opt_meta,
        "ema": {k: v for k, v in ema_state.items() if k != "shadow_params"},
        "args": args,
        "runs": runs,
        "extra": extra or {},
        "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (tmp / STATE_JSON).write_text(json.dumps(meta, indent=2))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        if old.exists():
            shutil.rmtree(old)
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)
    return folder


def read_state_json(folder: Path) -> dict:
    path = Path(folder) / STATE_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a training checkpoint (no {STATE_JSON})")
    return json.loads(path.read_text())


def load_training_state(folder: Path, *, model: torch.nn.Module, ema, optimizer: torch.optim.Optimizer,
                        generator: torch.Generator) -> dict:
    """Restore what :func:`save_training_state` wrote into the given objects; returns the JSON
    part (``step``, ``args``, ``runs``, ``extra``)."""
    folder = Path(folder)
    meta = read_state_json(folder)
    model.load_state_dict(load_file(folder / "model.safetensors"))
    shadow = load_file(folder / "ema.safetensors")
    ema_state = dict(meta["ema"])
    device = next(model.parameters()).device
    ema_state["shadow_params"] = [shadow[f"param.{i}"].to(device) for i in range(len(shadow))]
    ema.load_state_dict(ema_state)
    opt_tensors = {k: v.to(device) if not k.endswith(".step") else v for k, v in
                   load_file(folder / "optimizer.safetensors").items()}
    _load_optimizer(optimizer, opt_tensors, meta["optimizer"])
    rng = load_file(folder / "rng.safetensors")
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch_cpu"])
    return meta


# ----------------------------------------------------------------------------- training.json


def read_runs(path: Path) -> list[dict]:
    """The runs recorded in a ``training.json`` (the older single-run layout becomes one run)."""
    path = Path(path)
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    if isinstance(data, dict) and "runs" in data:
        return list(data["runs"])
    args = data.get("argv", {}) if isinstance(data, dict) else {}
    return [{
        "argv": args,
        "stages": args.get("stages"),
        "unet_steps_from": 0,
        "unet_steps_to": args.get("unet_steps"),
        "wall_seconds": data.get("wall_seconds"),
        "threads": data.get("threads"),
        "device": data.get("device"),
        "note": "recorded before training.json listed runs",
    }]


def new_run(argv: list[str] | None, args: dict, *, kind: str, steps_from: int, source: str | None = None) -> dict:
    """One continuation's record: its command line, what it started from, and (filled in as it
    goes) the step it reached and its wall time."""
    return {
        "argv": list(sys.argv[1:] if argv is None else argv),
        "args": args,
        "kind": kind,  # "fresh", "resume" or "init-from"
        "source": source,
        "unet_steps_from": steps_from,
        "unet_steps_to": steps_from,
        "wall_seconds": 0.0,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_runs(path: Path, runs: list[dict]) -> None:
    Path(path).write_text(json.dumps({"runs": runs}, indent=2))


# ----------------------------------------------------------------------------- export


def export_pipeline(checkpoint: Path, base: Path, out: Path, ema: bool = True) -> Path:
    """A pipeline folder from a UNet training checkpoint: ``base`` (a shapes-sd folder: VAE, text
    encoder, tokenizer, scheduler) with its UNet replaced by the checkpoint's EMA weights (or the
    raw weights with ``ema=False``). Lets a run still training be evaluated at its last checkpoint."""
    from diffusers import UNet2DConditionModel

    checkpoint, base, out = Path(checkpoint), Path(base), Path(out)
    meta = read_state_json(checkpoint)
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    unet.load_state_dict(load_file(checkpoint / "model.safetensors"))
    if ema:
        shadow = load_file(checkpoint / "ema.safetensors")
        with torch.no_grad():
            for i, p in enumerate(unet.parameters()):
                p.copy_(shadow[f"param.{i}"])
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("unet"))
    unet.save_pretrained(out / "unet", safe_serialization=True)
    runs = meta["runs"]
    write_runs(out / "training.json", runs)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Export a pipeline from a UNet training checkpoint (EMA weights).")
    ap.add_argument("checkpoint")
    ap.add_argument("--base", default="checkpoints/shapes-sd", help="the pipeline giving VAE, text encoder, ...")
    ap.add_argument("--out", required=True)
    ap.add_argument("--raw", action="store_true", help="the trained weights rather than their EMA")
    args = ap.parse_args(argv)
    out = export_pipeline(args.checkpoint, args.base, args.out, ema=not args.raw)
    print(f"{out}: UNet at step {read_state_json(args.checkpoint)['step']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
