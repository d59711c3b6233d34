"""Dynamic Prompt Learning: real-photo inversion whose noun tokens keep to their objects.

Wang et al., "Dynamic Prompt Learning: Addressing Cross-Attention Leakage for Text-Based
Image Editing", NeurIPS 2023 (code: github.com/wangkai930418/DPL, ``pipelines/dpl_pipeline.py``
and ``DPL.sh``). Prompt-to-prompt copies the source's cross-attention maps into the edit; when a
noun's map also covers the background or another object ("leakage"), the edit changes those too.
DPL learns, during null-text inversion, one *dynamic* token embedding per noun token and per
timestep, so that the source's maps become:

- disjoint: different nouns attend to different places (:func:`disjoint_object_loss`);
- off the background: no noun attends where no object is (:func:`background_leakage_loss`,
  the background from :func:`background_mask`: self-attention clustered, clusters given to
  the nouns by their cross-attention, as the authors' ``BG_estimate.py`` does);
- present: every noun has a strong peak (:func:`attention_balancing_loss`, from
  Attend-and-Excite, Chefer et al. 2023).

At step ``i`` the tokens are first updated (AdamW, at most ``token_steps`` updates, stopping
once every loss is under its decaying threshold, :meth:`DPLSettings.thresholds`), then the
null embedding is tuned with them as null-text inversion does. The result is an
:class:`~imageprompt.inversion.Inversion` with per-step conditional and null embeddings and the
learned tokens; the prompt-to-prompt pipeline uses the conditional embeddings in its source row
and puts the tokens into the targets' same nouns (:func:`step_conditioning`).

The docstrings name the paragraphs of the paper's method section ("Dynamic Prompt Learning")
and the authors' functions; the values are those of the authors' ``DPL.sh`` and code. The
PDF was not at hand here, so section and equation numbers are not given.

Cost: the cross-attention maps of the losses are formed explicitly (float32) only in the
``map_res`` layers of the token passes, and self-attention probabilities only in the
``cluster_res`` layers of the DDIM inversion (for the background); every other layer runs the
fused kernel. Each token update is one text-encoder pass, one conditional UNet pass and their
backward pass, for the tokens only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import PIL.Image
import torch
import torch.nn.functional as F

from imageprompt.attention import AttentionEditor, Layer
from imageprompt.inversion import (
    Inversion,
    check_sampler,
    ddim_inversion,
    encode_image,
    float32_modules,
    null_text_inversion,
)
from imageprompt.p2p import attention_heights, default_resolution, normalize_word, word_positions

METHOD = "dpl"


# ----------------------------------------------------------------- settings
@dataclass
class DPLSettings:
    """DPL's settings; defaults are the authors' (``DPL.sh`` and ``dpl_pipeline.py``).

    Loss weights (the paper's total loss ``L = λ_at L_at + λ_dj L_dj + λ_bg L_bg``):

    - ``lambda_balance`` λ_at = 1.0 (``--lam_maxattn``), ``lambda_disjoint`` λ_dj = 0.05
      (``--lam_cosine``), ``lambda_background`` λ_bg = 0.05 (``--lam_entropy``).

    Gradual optimisation (paper, "Gradual Optimization for Token Updates"): at step ``i``
    the token updates stop once every loss is below ``beta * exp(-i / alpha)``:

    - balancing: alpha 25, beta 0.3; background: alpha 50, beta 0.7; disjoint: alpha 25, beta 0.9.

    Token updates: at most ``token_steps`` = 21 per step (``ATTN_STEP``), AdamW with torch's
    default lr 1e-3 (the authors build ``AdamW`` with no arguments).

    Null-text part: the authors run 51 null-text updates per step with no early stop
    (``NULL_STEP``); ``null_inner_steps`` None keeps null-text inversion's own setting here
    (``num_inner_steps``, 10, with its early stop), so DPL and null-text differ only in the tokens.

    Attention maps: ``map_res`` latent rows of the layers whose cross-attention the losses read
    (the authors: 16 at 512x512, a quarter of the latent; None: the same rule,
    :func:`imageprompt.p2p.default_resolution`); ``cluster_res`` latent rows of the
    self-attention clustered for the background (the authors: 32 at 512x512, half the latent;
    None: the level nearest half). ``num_segments`` 5 clusters (k-means on the rows of the
    self-attention matrix), ``background_threshold`` 0.2: a cluster whose best noun's mean
    normalised map is not above it is background. ``temperature`` 100 and a 3x3 Gaussian of
    sigma 0.5: the Attend-and-Excite softmax and smoothing of the balancing loss.
    """

    lambda_balance: float = 1.0
    lambda_disjoint: float = 0.05
    lambda_background: float = 0.05
    balance_alpha: float = 25.0
    balance_beta: float = 0.3
    background_alpha: float = 50.0
    background_beta: float = 0.7
    disjoint_alpha: float = 25.0
    disjoint_beta: float = 0.9
    token_steps: int = 21
    learning_rate: float = 1e-3
    null_inner_steps: int | None = None
    map_res: int | None = None
    cluster_res: int | None = None
    num_segments: int = 5
    background_threshold: float = 0.2
    temperature: float = 100.0
    smoothing_sigma: float = 0.5
    seed: int = 1

    def __post_init__(self):
        if not isinstance(self.token_steps, int) or self.token_steps < 0:
            raise ValueError(f"`token_steps` must be a whole number >= 0, got {self.token_steps!r}")
        if self.null_inner_steps is not None and (not isinstance(self.null_inner_steps, int)
                                                  or self.null_inner_steps < 1):
            raise ValueError(f"`null_inner_steps` must be a positive integer or None, got {self.null_inner_steps!r}")
        if self.num_segments < 2:
            raise ValueError(f"`num_segments` must be at least 2, got {self.num_segments}")
        for name in ("map_res", "cluster_res"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive number of latent rows, got {value!r}")

    def thresholds(self, step: int) -> tuple[float, float, float]:
        """``(balancing, disjoint, background)`` thresholds at step ``step``: ``beta * exp(-step / alpha)``."""
        return (self.balance_beta * math.exp(-step / self.balance_alpha),
                self.disjoint_beta * math.exp(-step / self.disjoint_alpha),
                self.background_beta * math.exp(-step / self.background_alpha))


# ------------------------------------------------------------------- losses
def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=-1, eps=1e-8)


def disjoint_object_loss(word_maps: torch.Tensor) -> torch.Tensor:
    """Disjoint object attention loss (paper, "Disjoint Object Attention Loss"; the
    authors' ``_compute_cosine``): the mean cosine similarity of every pair of the nouns'
    cross-attention maps, ``word_maps`` ``(nouns, h, w)``. Zero for maps with disjoint
    supports (and for fewer than two nouns)."""
    n = word_maps.shape[0]
    if n < 2:
        return word_maps.sum() * 0.0
    i, j = torch.triu_indices(n, n, offset=1)
    return _cosine(word_maps[i], word_maps[j]).mean()


def background_leakage_loss(word_maps: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Background leakage loss (paper, "Background Leakage Loss"; the authors'
    ``_compute_BG``): the mean cosine similarity of each noun's map ``(nouns, h, w)`` with the
    background mask ``(h, w)`` (1 on background). Zero when no noun attends to the background."""
    return _cosine(word_maps, background.to(word_maps)[None].expand_as(word_maps)).mean()


def gaussian_kernel(size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """The smoothing kernel of Attend-and-Excite's code: ``exp(-((x - mean) / (2 sigma))^2)`` per axis
    (their ``GaussianSmoothing``; note the ``2 sigma``), normalised to sum 1."""
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-((x / (2 * sigma)) ** 2))
    kernel = g[:, None] * g[None, :]
    return kernel / kernel.sum()


def attention_balancing_loss(maps: torch.Tensor, groups: list[list[int]], temperature: float = 100.0,
                             sigma: float = 0.5) -> torch.Tensor:
    """Attention balancing loss (paper, "Attention Balancing Loss", from Attend-and-Excite,
    Chefer et al. 2023; the authors' ``_compute_max_attention_per_index`` and ``_compute_loss``
    with ``loss_type='max'``).

    ``maps`` ``(h, w, length)``: one map per token. The text positions ``1 .. length-2`` are
    multiplied by ``temperature`` and softmaxed over the tokens; each noun's map (the mean of its
    tokens', ``groups`` holds each noun's token positions) is smoothed with :func:`gaussian_kernel`
    (reflect padding) and its maximum taken; the loss is the largest ``max(0, 1 - peak)``.
    """
    text = (maps[..., 1:-1] * temperature).softmax(-1)
    kernel = gaussian_kernel(3, sigma).to(text)[None, None]
    losses = []
    for positions in groups:
        image = text[..., [p - 1 for p in positions]].mean(-1)[None, None]
        image = F.conv2d(F.pad(image, (1, 1, 1, 1), mode="reflect"), kernel)
        losses.append((1.0 - image.max()).clamp_min(0.0))
    return torch.stack(losses).max()


def word_maps_of(maps: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """``(h, w, length)`` token maps -> ``(nouns, h, w)``: the mean over each noun's tokens."""
    return torch.stack([maps[..., positions].mean(-1) for positions in groups])


def dpl_losses(maps: torch.Tensor, groups: list[list[int]], background: torch.Tensor,
               settings: DPLSettings) -> dict[str, torch.Tensor]:
    """The three losses and their weighted sum (``"total"``) on ``maps`` ``(h, w, length)``."""
    words = word_maps_of(maps, groups)
    losses = {"balance": attention_balancing_loss(maps, groups, settings.temperature, settings.smoothing_sigma),
              "disjoint": disjoint_object_loss(words),
              "background": background_leakage_loss(words, background)}
    losses["total"] = (settings.lambda_balance * losses["balance"] + settings.lambda_disjoint * losses["disjoint"]
                       + settings.lambda_background * losses["background"])
    return losses


# --------------------------------------------------------------- background
def kmeans(points: torch.Tensor, k: int, seed: int = 1, n_init: int = 10, iterations: int = 100) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding, best of ``n_init`` runs (what the authors get from
    scikit-learn's ``KMeans(n_clusters=k, n_init=10)``); returns a label per row of ``points``."""
    points = points.double()
    generator = torch.Generator().manual_seed(seed)
    best, best_inertia = None, math.inf
    k = min(k, points.shape[0])
    for _ in range(n_init):
        centres = points[torch.randint(points.shape[0], (1,), generator=generator)]
        while centres.shape[0] < k:
            d2 = torch.cdist(points, centres).min(1).values ** 2
            if d2.sum() <= 0:
                break
            centres = torch.cat([centres, points[torch.multinomial(d2 / d2.sum(), 1, generator=generator)]])
        for _ in range(iterations):
            labels = torch.cdist(points, centres).argmin(1)
            new = torch.stack([points[labels == c].mean(0) if (labels == c).any() else centres[c]
                               for c in range(centres.shape[0])])
            if torch.allclose(new, centres):
                break
            centres = new
        labels = torch.cdist(points, centres).argmin(1)
        inertia = ((points - centres[labels]) ** 2).sum().item()
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best


def background_mask(self_maps: torch.Tensor, cross_maps: torch.Tensor, groups: list[list[int]],
                    settings: DPLSettings | None = None) -> torch.Tensor:
    """The background as the authors estimate it (``BG_estimate.py``, ``cluster2noun_``): cluster the
    rows of the averaged self-attention matrix ``self_maps`` ``(hs, ws, hs * ws)`` into
    ``num_segments`` segments; normalise each noun's cross-attention map (``cross_maps``
    ``(h, w, length)``, nearest-upsampled to ``(hs, ws)``) as ``(m - |min m|) / max m``; a segment
    whose best noun's mean normalised map is at most ``background_threshold`` is background.
    Returns a float ``(h, w)`` mask (1 on background) at the cross maps' size."""
    settings = settings or DPLSettings()
    hs, ws = self_maps.shape[:2]
    labels = kmeans(self_maps.reshape(hs * ws, -1).float(), settings.num_segments, settings.seed).reshape(hs, ws)
    words = word_maps_of(cross_maps.float(), groups)[:, None]
    words = F.interpolate(words, size=(hs, ws), mode="nearest")[:, 0]
    lo = words.flatten(1).min(1).values.abs()[:, None, None]
    hi = words.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]
    normalised = (words - lo) / hi
    background = torch.zeros(hs, ws, dtype=torch.bool)
    for c in labels.unique():
        segment = labels == c
        scores = normalised[:, segment].mean(1)
        if scores.max() <= settings.background_threshold:
            background |= segment
    size = tuple(cross_maps.shape[:2])
    return F.interpolate(background[None, None].float(), size=size, mode="nearest")[0, 0]


# ----------------------------------------------------------------- recording
class AttentionRecorder(AttentionEditor):
    """An attention editor that records attention maps for DPL (batch-1, conditional passes).

    Cross-attention of the ``map_res`` layers: explicit float32 probabilities, kept with their
    graph in :attr:`cross` while ``record_cross`` (the token passes backpropagate through them).
    Self-attention of the ``cluster_res`` layers: explicit probabilities, summed without graph
    while ``record_self`` (the DDIM inversion, for :func:`background_mask`). Every other layer,
    and every layer while nothing is recorded, runs the fused kernel.
    """

    def __init__(self, latent_size: tuple[int, int], map_res: int, cluster_res: int | None = None):
        self.latent_size, self.map_res, self.cluster_res = tuple(latent_size), map_res, cluster_res
        self.record_cross = self.record_self = False
        self.cross: list[torch.Tensor] = []
        self.self_sum, self.self_count = None, 0
        self.cross_sum, self.cross_count = None, 0

    def probs_rows(self, layer: Layer, rows: int) -> int:
        height = layer.size(self.latent_size)[0]
        wanted = (self.record_cross and layer.is_cross and height == self.map_res) or (
            self.record_self and not layer.is_cross and height == self.cluster_res)
        return 1 if wanted else 0  # the last row: the (only) conditional one

    def edit_probs(self, layer: Layer, probs: torch.Tensor) -> torch.Tensor:
        if not self.probs_rows(layer, probs.shape[0]):
            return probs
        height, width = layer.size(self.latent_size)
        maps = probs[-1].mean(0).reshape(height, width, -1)  # mean over heads
        if layer.is_cross:
            self.cross.append(maps)
            if not maps.requires_grad:  # the DDIM pass: also keep the mean over steps for the background
                self.cross_sum = maps if self.cross_sum is None else self.cross_sum + maps
                self.cross_count += 1
        else:
            self.self_sum = maps.detach() if self.self_sum is None else self.self_sum + maps.detach()
            self.self_count += 1
        return probs

    def cross_maps(self) -> torch.Tensor:
        """The recorded cross maps of the last pass, averaged over layers: ``(h, w, length)``."""
        if not self.cross:
            raise RuntimeError(f"no cross-attention layer with {self.map_res} latent rows ran")
        return torch.stack(self.cross).mean(0)



# ------------------------------------------------------------------- tokens
def encode_with_tokens(text_encoder, ids: torch.Tensor, positions: list[int], tokens: torch.Tensor) -> torch.Tensor:
    """The text encoder's states for ``ids`` ``(1, length)`` with the input embeddings at
    ``positions`` replaced by ``tokens`` ``(len(positions), D)`` (the dynamic tokens; the authors
    put them in as new vocabulary entries, which gives the same states). Differentiable in ``tokens``."""
    def swap(module, args, output):
        output = output.clone()
        output[:, positions] = tokens.to(output.dtype)
        return output

    handle = text_encoder.get_input_embeddings().register_forward_hook(swap)
    try:
        return text_encoder(ids)[0]
    finally:
        handle.remove()


def optimise_tokens(pipe, recorder: AttentionRecorder, ids, positions, groups, tokens, latents, t, step: int,
                    background: torch.Tensor, settings: DPLSettings) -> tuple[torch.Tensor, dict[str, float]]:
    """One step's token updates (the authors' inner loop): forward the conditional prompt with the
    current tokens, stop if every loss is under its threshold, else one AdamW update; at most
    ``settings.token_steps`` passes and updates. Gradients go to the tokens only (never the UNet or the
    text encoder). Returns the tokens and the losses of the last pass (before its update)."""
    tokens = tokens.detach().clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([tokens], lr=settings.learning_rate)
    limits = settings.thresholds(step)
    losses = {}
    for _ in range(settings.token_steps):
        with torch.enable_grad():
            recorder.cross = []
            recorder.record_cross = True
            try:
                states = encode_with_tokens(pipe.text_encoder, ids, positions, tokens)
                pipe.unet(latents, t, encoder_hidden_states=states.to(pipe.unet.dtype), return_dict=False)
            finally:
                recorder.record_cross = False
            found = dpl_losses(recorder.cross_maps(), groups, background, settings)
            recorder.cross = []
            losses = {k: v.item() for k, v in found.items()}
            done = (losses["balance"] < limits[0] and losses["disjoint"] < limits[1]
                    and losses["background"] < limits[2])
            if done:
                break
            optimizer.zero_grad()
            found["total"].backward(inputs=[tokens])  # the tokens only: never the UNet or the text encoder
        optimizer.step()
    return tokens.detach(), losses


# ---------------------------------------------------------------- inversion
def noun_groups(tokenizer, prompt: str, words, length: int) -> list[list[int]]:
    """Token positions of each of ``words`` in ``prompt``; ``ValueError`` naming a word that is not there."""
    if isinstance(words, str):
        words = words.split()
    words = list(words or [])
    if not words:
        raise ValueError("DPL inversion needs the nouns whose tokens it learns (`words`, e.g. ['cat', 'dog'])")
    groups = []
    for word in words:
        positions = word_positions(tokenizer, prompt, word, length)
        if not positions:
            raise ValueError(f"DPL word {word!r} is not in the source prompt {prompt!r}")
        groups.append(positions)
    return groups


def dpl_inversion(pipe, image: PIL.Image.Image, prompt: str, words, num_inference_steps: int = 50,
                  guidance_scale: float = 7.5, height: int | None = None, width: int | None = None,
                  num_inner_steps: int = 10, early_stop_epsilon: float = 1e-5,
                  settings: DPLSettings | None = None, log: dict | None = None) -> Inversion:
    """Invert ``image`` described by ``prompt`` with DPL, learning the tokens of ``words`` (nouns of the prompt).

    DDIM inversion (with the background recorded), then null-text inversion
    (:func:`imageprompt.inversion.null_text_inversion`) in which each step first runs
    :func:`optimise_tokens`. Returns an :class:`~imageprompt.inversion.Inversion` with method
    ``"dpl"``, per-step null embeddings and per-step conditional embeddings (``cond_embeds``).
    Runs in float32 (UNet, VAE and text encoder upcast for the call); results in the UNet's dtype.
    ``log``: if a dict, it receives ``"background"`` (the mask, ``(h, w)`` at ``map_res``) and
    ``"losses"`` (each step's last losses, a list of dicts).
    """
    settings = settings or DPLSettings()
    check_sampler(pipe.scheduler)
    if not isinstance(num_inner_steps, int) or num_inner_steps < 1:
        raise ValueError(f"`num_inner_steps` must be a positive integer, got {num_inner_steps!r}")
    length = pipe.tokenizer.model_max_length
    groups = noun_groups(pipe.tokenizer, prompt, words, length)
    positions = sorted({p for g in groups for p in g})
    device, dtype = pipe._execution_device, pipe.unet.dtype
    height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    latent_size = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    heights = attention_heights(pipe.unet.config, latent_size[0])
    map_res = settings.map_res or default_resolution(pipe.unet.config, latent_size[0])
    cluster_res = settings.cluster_res or min(heights, key=lambda h: (abs(h - latent_size[0] / 2), -h))
    for name, res in (("map_res", map_res), ("cluster_res", cluster_res)):
        if res not in heights:
            raise ValueError(f"`{name}` {res} names no attention layer; this UNet has {heights} latent rows")
    pipe.scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = pipe.scheduler.timesteps
    recorder = AttentionRecorder(latent_size, map_res, cluster_res)
    ids = pipe.tokenize([prompt]).to(device)
    with float32_modules(pipe.unet, pipe.vae, pipe.text_encoder), recorder.attached(pipe.unet):
        with torch.no_grad():
            cond = pipe.text_encoder(ids)[0].float()
            latents = encode_image(pipe, image, height, width).float()
        recorder.record_cross = recorder.record_self = True
        trajectory = ddim_inversion(pipe, latents, cond, timesteps)
        recorder.record_cross = recorder.record_self = False
        background = background_mask(recorder.self_sum / recorder.self_count,
                                     recorder.cross_sum / recorder.cross_count, groups, settings)
        recorder.cross = []
        if log is not None:
            log["background"] = background
        with torch.no_grad():
            tokens = pipe.text_encoder.get_input_embeddings()(ids[:, positions])[0].float()
        conds, learned = [], []

        def step_cond(i, t, current):
            nonlocal tokens
            tokens, losses = optimise_tokens(pipe, recorder, ids, positions, groups, tokens, current, t, i,
                                             background, settings)
            if log is not None:
                log.setdefault("losses", []).append(losses)
            with torch.no_grad():
                states = encode_with_tokens(pipe.text_encoder, ids, positions, tokens).float()
            conds.append(states.to(dtype))
            learned.append({normalize_word(w): tokens[[positions.index(p) for p in g]].to(dtype)
                            for w, g in zip(words, groups)})
            return states

        empty, _ = pipe.encode_text([""], device)
        uncond = null_text_inversion(pipe, trajectory, step_cond, empty.float(), timesteps, guidance_scale,
                                     settings.null_inner_steps or num_inner_steps, early_stop_epsilon)
    trajectory = [x.to(dtype) for x in trajectory]
    return Inversion(trajectory[-1], [u.to(dtype) for u in uncond], trajectory, METHOD, num_inference_steps,
                     guidance_scale, cond_embeds=conds, cond_tokens=learned)


def step_conditioning(pipe, inversion: Inversion, prompts: list[str], step: int, cond: torch.Tensor) -> torch.Tensor:
    """The edit's conditional rows at ``step`` for a DPL inversion: row 0 (the source) is the
    inversion's embedding; each target is re-encoded with the learned tokens put in at the nouns
    it shares with the source (as the authors' edit captions keep the placeholder tokens of the
    nouns they do not change). ``cond``: the plain ``(rows, length, D)`` embeddings."""
    cond = cond.clone()
    cond[0] = inversion.cond_at(step)[0].to(cond)
    learned = inversion.cond_tokens[step] if inversion.cond_tokens else {}
    length = pipe.tokenizer.model_max_length
    for row, prompt in enumerate(prompts[1:], 1):
        positions, vectors = [], []
        for word, tokens in learned.items():
            found = word_positions(pipe.tokenizer, prompt, word, length)
            if found and len(found) % len(tokens) == 0:
                positions += found
                vectors += [tokens] * (len(found) // len(tokens))
        if positions:
            ids = pipe.tokenize([prompt]).to(cond.device)
            with torch.no_grad():
                states = encode_with_tokens(pipe.text_encoder, ids, positions, torch.cat(vectors).to(cond.device))
            cond[row] = states[0].to(cond)
    return cond


__all__ = ["METHOD", "DPLSettings", "disjoint_object_loss", "background_leakage_loss", "attention_balancing_loss",
           "gaussian_kernel", "word_maps_of", "dpl_losses", "kmeans", "background_mask", "AttentionRecorder",
           "encode_with_tokens", "optimise_tokens", "noun_groups", "dpl_inversion", "step_conditioning"]
