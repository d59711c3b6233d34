"""Resumable training of the bundled model's UNet (issue 24): a run stopped and resumed from its
checkpoint gives the same weights, EMA, optimizer and RNG state, bit for bit, as one run."""

from __future__ import annotations

import json

import pytest
import torch
from imageprompt.checkpoints import BUNDLED_CLIP, BUNDLED_MODEL
from safetensors.torch import load_file


@pytest.fixture
def train_main():
    """``imageprompt.world.train.main`` in this process, with torch's threads and RNG put back after."""
    from imageprompt.world import train

    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    yield train.main
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)


def _tiny(work, out, *extra):
    """A tiny UNet run on the bundled CLIP and VAE: 48 scenes, batch 2, no probe."""
    return ["--stages", "unet", "--scenes", "48", "--unet-batch", "2", "--probe-every", "0", "--threads", "1",
            "--clip-from", str(BUNDLED_CLIP), "--vae-from", str(BUNDLED_MODEL / "vae"),
            "--work", str(work), "--out", str(out), *extra]


def _tensors(folder):
    return {f"{name}:{k}": v for name in ("model", "ema", "optimizer", "rng")
            for k, v in load_file(folder / f"{name}.safetensors").items()}


def test_unet_training_resumes_bit_for_bit(tmp_path, train_main):
    one, two = tmp_path / "one", tmp_path / "two"
    train_main(_tiny(one / "work", one / "out", "--unet-steps", "4", "--checkpoint-every", "2"))
    train_main(_tiny(two / "work", two / "out", "--unet-steps", "4", "--stop-after", "2"))
    stopped = json.loads((two / "work" / "unet-checkpoint" / "state.json").read_text())
    assert stopped["step"] == 2 and not (two / "out" / "shapes-sd").exists()
    train_main(["--resume", str(two / "work" / "unet-checkpoint")])

    a, b = _tensors(one / "work" / "unet-checkpoint"), _tensors(two / "work" / "unet-checkpoint")
    assert a.keys() == b.keys() and any(k.startswith("optimizer:") for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    shipped = "unet/diffusion_pytorch_model.safetensors"
    ua, ub = load_file(one / "out" / "shapes-sd" / shipped), load_file(two / "out" / "shapes-sd" / shipped)
    assert all(torch.equal(ua[k], ub[k]) for k in ua)

    runs = json.loads((two / "out" / "shapes-sd" / "training.json").read_text())["runs"]
    assert [(r["kind"], r["unet_steps_from"], r["unet_steps_to"]) for r in runs] == [("fresh", 0, 2), ("resume", 2, 4)]
    assert runs[1]["argv"] == ["--resume", str(two / "work" / "unet-checkpoint")]
    assert all(r["wall_seconds"] > 0 for r in runs)

    # A fine-tuning continuation from the finished weights: they are its start, its runs are carried over.
    three = tmp_path / "three"
    train_main(_tiny(three / "work", three / "out", "--unet-steps", "1", "--unet-lr", "1e-5",
                     "--init-from", str(two / "out" / "shapes-sd")))
    runs = json.loads((three / "out" / "shapes-sd" / "training.json").read_text())["runs"]
    assert [(r["kind"], r["unet_steps_from"], r["unet_steps_to"]) for r in runs] == [
        ("fresh", 0, 2), ("resume", 2, 4), ("init-from", 0, 1)]
    uc = load_file(three / "out" / "shapes-sd" / shipped)
    drift = max((uc[k] - ub[k]).abs().max().item() for k in ub)
    assert 0 < drift < 1e-2


def test_shipped_training_json_reads_as_runs():
    from imageprompt.world.checkpointing import read_runs

    runs = read_runs(BUNDLED_MODEL / "training.json")
    assert runs and all({"argv", "unet_steps_from", "unet_steps_to", "wall_seconds"} <= r.keys() for r in runs)
    # the first run trained the UNet from scratch; each later one resumed or continued it
    assert runs[0]["unet_steps_from"] == 0 and runs[0]["unet_steps_to"] >= 4000
    assert all(r["kind"] in ("resume", "init-from") for r in runs[1:])
