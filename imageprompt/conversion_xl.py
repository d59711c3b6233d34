"""Closed-form image-to-prompt conversion (SD-IPC) for Stable Diffusion XL.

Ding et al., "Closed-form image-to-prompt conversion for Stable Diffusion"
(SD-IPC), Sec. 3, extended here to SDXL's two text encoders. SDXL conditions on

- token states: the *penultimate* hidden states of CLIP ViT-L's and OpenCLIP
  bigG's text towers, concatenated (768 + 1280 = 2048 features), taken before
  any final layer norm;
- a pooled vector: bigG's projected text embedding ``W_t^G LN(x_last)[EOS]``,
  which lives in the same space as bigG's projected image embedding.

So:

- **pooled** = bigG's image embedding ``e_G``, rescaled to the typical norm of
  the pooled text embeddings (:func:`measure_text_stats`). Same space, no
  inversion: the only gap is CLIP's modality gap.
- **tokens**, per encoder: SD-IPC's closed form ``h = pinv(W_t, atol) e`` gives
  a state in the space of the *final-layer-normed last-layer* EOS states. Two
  ways to bring it to the penultimate layer (``mode``):

  * ``"last"``: use ``h`` as it is, rescaled to the typical norm of the
    penultimate EOS states;
  * ``"ln-inverse"``: undo the final layer norm, ``x = mu + sigma * (h - beta) / gamma``,
    with ``gamma``/``beta`` the layer norm's own weights and ``mu``/``sigma`` the
    typical per-token mean and spread of the last layer's EOS states (the only
    part the norm forgets). This is the last layer's *input to the norm*; SDXL
    reads the layer below, one transformer block earlier, which no closed form
    undoes.

  :func:`conversion_report` measures both against the real penultimate states of
  the same text. ``"last"`` is the default: the two point the same way (cosines
  within 0.015) and ``"last"`` has the smaller relative error on every tower
  measured, with no typical mean/spread to assume (figures: ``docs/sdxl.md``).

Exact: ``pinv(W_t) W_t y = y`` for every ``y`` in the row space of ``W_t``
(all of it when ``W_t`` is square and its singular values exceed ``atol``), and
the layer-norm inverse is exact given the token's own ``mu``/``sigma``.
Approximate: the typical ``mu``/``sigma`` stand for the unknown ones, the last
block is skipped, and image embeddings are not text embeddings.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from imageprompt.conversion import NORM_PROMPTS, PINV_ATOL, eos_positions

MODES = ("last", "ln-inverse")  # the first is the default (docs/sdxl.md: why)


def _tower(text_encoder):
    return getattr(text_encoder, "text_model", text_encoder)  # transformers 4 wraps the tower


@torch.no_grad()
def text_states(text_encoder, tokenizer, prompts) -> dict[str, torch.Tensor]:
    """At each prompt's EOS: ``last`` (pre-norm), ``normed`` (final layer norm), ``penultimate`` states, the
    ``ids``, the full penultimate sequences ``penultimate_all``, and ``pooled`` (projected) when there is a
    projection."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(text_encoder.device)
    out = text_encoder(ids, output_hidden_states=True)
    rows = torch.arange(len(ids))
    eos = eos_positions(ids, tokenizer.eos_token_id)
    normed = _tower(text_encoder).final_layer_norm(out.hidden_states[-1]).float()  # in the encoder's dtype
    last = out.hidden_states[-1].float()
    found = {"ids": ids, "last": last[rows, eos], "normed": normed[rows, eos],
             "penultimate": out.hidden_states[-2].float()[rows, eos], "penultimate_all": out.hidden_states[-2].float()}
    if getattr(out, "text_embeds", None) is not None:
        found["pooled"] = out.text_embeds.float()
    return found


@torch.no_grad()
def measure_text_stats(text_encoder, tokenizer, prompts=NORM_PROMPTS) -> dict[str, float]:
    """Typical EOS statistics of an encoder: ``normed_norm`` (SD-IPC's scale), ``penultimate_norm``,
    ``last_mean`` / ``last_std`` (per-token mean and spread over features, before the final norm) and,
    for a projected encoder, ``pooled_norm``."""
    found = text_states(text_encoder, tokenizer, prompts)
    stats = {"normed_norm": found["normed"].norm(dim=-1).mean().item(),
             "penultimate_norm": found["penultimate"].norm(dim=-1).mean().item(),
             "last_mean": found["last"].mean(dim=-1).mean().item(),
             "last_std": found["last"].std(dim=-1, unbiased=False).mean().item()}
    if "pooled" in found:
        stats["pooled_norm"] = found["pooled"].norm(dim=-1).mean().item()
    return stats


def closed_form(embeds: torch.Tensor, inverse: torch.Tensor, scale: float) -> torch.Tensor:
    """SD-IPC: ``h = scale * (e P^T) / ||e P^T||`` (P the damped pseudo-inverse of ``W_t``)."""
    h = embeds.float() @ inverse.T
    return scale * h / h.norm(dim=-1, keepdim=True)


def to_penultimate(h: torch.Tensor, norm: nn.LayerNorm, stats: dict, mode: str = "ln-inverse") -> torch.Tensor:
    """Bring final-layer-normed states ``h`` to SDXL's penultimate layer (``mode`` in :data:`MODES`)."""
    if mode == "last":
        return stats["penultimate_norm"] * h / h.norm(dim=-1, keepdim=True)
    if mode != "ln-inverse":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    weight, bias = norm.weight.float(), norm.bias.float()
    safe = torch.where(weight.abs() < 1e-6, torch.full_like(weight, 1e-6), weight)
    z = (h.float() - bias) / safe
    z = (z - z.mean(dim=-1, keepdim=True)) / z.std(dim=-1, unbiased=False, keepdim=True).clamp_min(1e-6)
    return stats["last_mean"] + stats["last_std"] * z


class SDXLConverter(ModelMixin, ConfigMixin):
    """SD-IPC for SDXL: bigG and ViT-L image embeddings -> ``(token state (B, 2048), pooled (B, 1280))``.

    Holds each encoder's text projection ``W_t`` and final layer norm, and the
    statistics measured once on the model's own text encoders (:func:`measure_text_stats`).
    """

    @register_to_config
    def __init__(self, hidden_sizes: tuple = (768, 1280), projection_dims: tuple = (768, 1280),
                 stats: tuple = ({}, {}), atol: float = PINV_ATOL, mode: str = "last"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.text_projections = nn.ModuleList(nn.Linear(h, p, bias=False) for h, p in zip(hidden_sizes,
                                                                                           projection_dims))
        self.final_norms = nn.ModuleList(nn.LayerNorm(h) for h in hidden_sizes)

    @classmethod
    def from_encoders(cls, text_projection_l: nn.Linear, text_encoder, text_encoder_2, tokenizer, tokenizer_2,
                      mode: str = "last", atol: float = PINV_ATOL) -> SDXLConverter:
        """``text_projection_l``: CLIP ViT-L's text projection (SDXL's ``text_encoder`` has none)."""
        projections = (text_projection_l, text_encoder_2.text_projection)
        encoders = ((text_encoder, tokenizer), (text_encoder_2, tokenizer_2))
        stats = tuple(measure_text_stats(e, t) for e, t in encoders)
        converter = cls(hidden_sizes=tuple(p.weight.shape[1] for p in projections),
                        projection_dims=tuple(p.weight.shape[0] for p in projections), stats=stats, atol=atol,
                        mode=mode)
        for mine, theirs in zip(converter.text_projections, projections):
            mine.weight.data.copy_(theirs.weight.data.float())
        for mine, (encoder, _) in zip(converter.final_norms, encoders):
            mine.load_state_dict({k: v.float() for k, v in _tower(encoder).final_layer_norm.state_dict().items()})
        return converter.float()

    def tokens(self, embeds: torch.Tensor, which: int, mode: str | None = None) -> torch.Tensor:
        """Encoder ``which`` (0: ViT-L, 1: bigG): image embeddings -> penultimate-layer states ``(B, hidden)``."""
        stats = self.config.stats[which]
        cache = self.__dict__.setdefault("_inverses", {})
        if which not in cache:  # the weights are frozen: one pseudo-inverse per encoder (reset by `.to()`)
            cache[which] = torch.linalg.pinv(self.text_projections[which].weight.float(), atol=self.config.atol)
        inverse = cache[which]
        h = closed_form(embeds.to(inverse.device), inverse, stats["normed_norm"])
        return to_penultimate(h, self.final_norms[which], stats, mode or self.config.mode)

    def pooled(self, embeds_g: torch.Tensor) -> torch.Tensor:
        """bigG image embeddings rescaled to the typical pooled text norm: SDXL's pooled conditioning."""
        e = embeds_g.float()
        return self.config.stats[1]["pooled_norm"] * e / e.norm(dim=-1, keepdim=True)

    def forward(self, embeds_l: torch.Tensor, embeds_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.cat([self.tokens(embeds_l, 0), self.tokens(embeds_g, 1)], dim=-1)
        return h, self.pooled(embeds_g)

    def _apply(self, fn, *args, **kwargs):
        self.__dict__["_inverses"] = {}  # a device change invalidates the cache
        out = super()._apply(fn, *args, **kwargs)
        for p in self.parameters():  # `pipe.to(torch.float16)` casts every module: this one stays fp32
            if p.dtype != torch.float32:
                p.data = p.data.float()
        return out


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean().item()


@torch.no_grad()
def conversion_report(text_encoder, tokenizer, text_projection: nn.Linear, prompts, stats: dict | None = None,
                      atol: float = PINV_ATOL) -> dict[str, float]:
    """How close each :data:`MODES` gets to the real penultimate states, fed the *text's own* embedding.

    With ``e = W_t LN(x_last)[EOS]`` (what a perfect image embedding would be) the closed form is run and
    compared (cosine, mean over ``prompts``) with the same text's penultimate EOS state (``*_eos``) and with
    its penultimate states at every position from EOS on, where SD-IPC writes ``h`` (``*_tail``). Also:
    ``identity_pinv``: cos(pinv(W_t) e, LN(x_last)) (1 when exact); ``identity_ln``: the layer-norm inverse
    with the token's own mean/spread against ``x_last`` (exact); ``baseline_eos``: the normed last state itself
    vs the penultimate one.
    """
    stats = stats or measure_text_stats(text_encoder, tokenizer, prompts)
    found = text_states(text_encoder, tokenizer, prompts)
    norm = _tower(text_encoder).final_layer_norm
    weight = text_projection.weight.float().to(found["normed"].device)
    e = found["normed"] @ weight.T
    inverse = torch.linalg.pinv(weight, atol=atol)
    h = closed_form(e, inverse, stats["normed_norm"])
    last = found["last"]
    z = (found["normed"] - norm.bias.float()) / norm.weight.float()
    exact = last.mean(-1, keepdim=True) + last.std(-1, unbiased=False, keepdim=True) * z
    report = {"identity_pinv": _cos(e @ inverse.T, found["normed"]), "identity_ln": _cos(exact, last),
              "baseline_eos": _cos(found["normed"], found["penultimate"])}
    ids, tail = found["ids"], found["penultimate_all"]
    eos = eos_positions(ids, tokenizer.eos_token_id)
    positions = torch.arange(ids.shape[1], device=ids.device)[None, :] >= eos[:, None]
    for mode in MODES:
        x = to_penultimate(h, norm, stats, mode)
        report[f"{mode}_eos"] = _cos(x, found["penultimate"])
        sims = torch.nn.functional.cosine_similarity(x[:, None, :], tail, dim=-1)
        report[f"{mode}_tail"] = (sims * positions).sum().item() / positions.sum().item()
        report[f"{mode}_rel_err_eos"] = ((x - found["penultimate"]).norm(dim=-1)
                                         / found["penultimate"].norm(dim=-1)).mean().item()
    return report
