"""Prompt-to-prompt against an independent reference written the way the authors' code computes it.

The reference below re-implements google/prompt-to-prompt (``ptp_utils.py``,
``seq_aligner.py`` and the notebook's ``AttentionStore``, ``AttentionReplace``,
``AttentionRefine``, ``AttentionReweight`` and ``LocalBlend``) from the paper and
the published code's behaviour. It imports nothing of :mod:`imageprompt.p2p`:
word positions, the replacement and refinement mappers, the step windows, the
attention store and the blend mask are all written out here, and every
attention layer forms full probability matrices (the textbook processor). It
stands in for the controller's attention hook and its step callback, so the same
pipeline, model, noise and scheduler run once with each; fp32, 1e-4.

Deliberate differences from the authors, kept out of the comparison:

- a replaced word with a different token count: the authors' replacement mapper
  sets ``mapper[j, j]`` after the swapped span, so later target words read the
  wrong source words; ours (and this reference) map them in order
  (``test_different_token_count_replacement_differs_from_authors_mapper``);
- layers: the authors replace self-attention in layers with at most 16x16 query
  tokens and blend on the 16x16 layers; ours picks layers by latent rows relative
  to the image size. Here the tiny model's latents are 16x16 and the runs pass
  ``self_res=16, map_res=16``, which selects the same layers.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imageprompt.p2p import PromptToPromptController

SOURCE = "a red cat on the beach"
LENGTH = 77
LATENT = 16  # the tiny model's latent rows and columns at its default size


# ----------------------------------------------- the authors' text helpers
def get_word_inds(text: str, word: str, tokenizer) -> np.ndarray:
    """``ptp_utils.get_word_inds``: token positions (1 = first word token) of every ``word`` in ``text``."""
    split_text = text.split(" ")
    word_place = [i for i, w in enumerate(split_text) if w == word]
    out = []
    if word_place:
        words_encode = [tokenizer.decode([item]).strip("#") for item in tokenizer.encode(text)][1:-1]
        cur_len, ptr = 0, 0
        for i in range(len(words_encode)):
            cur_len += len(words_encode[i])
            if ptr in word_place:
                out.append(i + 1)
            if cur_len >= len(split_text[ptr]):
                ptr += 1
                cur_len = 0
    return np.array(out, dtype=np.int64)


def _place_inds(text: str, place: int, tokenizer) -> list[int]:
    """``ptp_utils.get_word_inds`` with an integer word place."""
    split_text = text.split(" ")
    words_encode = [tokenizer.decode([item]).strip("#") for item in tokenizer.encode(text)][1:-1]
    out, cur_len, ptr = [], 0, 0
    for i in range(len(words_encode)):
        cur_len += len(words_encode[i])
        if ptr == place:
            out.append(i + 1)
        if cur_len >= len(split_text[ptr]):
            ptr += 1
            cur_len = 0
    return out


def authors_replacement_mapper(x: str, y: str, tokenizer, max_len: int = LENGTH, in_order: bool = False
                               ) -> torch.Tensor:
    """``seq_aligner.get_replacement_mapper_`` as published (``mapper[j, j]`` after the last swapped word).

    ``in_order``: keep the authors' middle branch (``mapper[i, j]``, in order) to the end instead. For
    words of equal token counts this is the same mapper; after a word whose token count changes it
    keeps pairing each later source token with its own target token.
    """
    words_x, words_y = x.split(" "), y.split(" ")
    inds_replace = [i for i in range(len(words_y)) if words_y[i] != words_x[i]]
    inds_source = [_place_inds(x, i, tokenizer) for i in inds_replace]
    inds_target = [_place_inds(y, i, tokenizer) for i in inds_replace]
    mapper = np.zeros((max_len, max_len))
    i = j = cur_inds = 0
    while i < max_len and j < max_len:
        if cur_inds < len(inds_source) and inds_source[cur_inds][0] == i:
            src, tgt = inds_source[cur_inds], inds_target[cur_inds]
            if len(src) == len(tgt):
                mapper[src, tgt] = 1
            else:
                for i_t in tgt:
                    mapper[src, i_t] = 1 / len(tgt)
            cur_inds += 1
            i += len(src)
            j += len(tgt)
        elif cur_inds < len(inds_source) or in_order:
            mapper[i, j] = 1
            i += 1
            j += 1
        else:
            mapper[j, j] = 1
            i += 1
            j += 1
    return torch.from_numpy(mapper).float()


def global_align(x, y):
    """``seq_aligner.global_align``, ``ScoreParams(gap=0, match=1, mismatch=-1)``; trace 1 left, 2 up, 3 diag."""
    matrix = np.zeros((len(x) + 1, len(y) + 1), dtype=np.int32)
    trace_back = np.zeros((len(x) + 1, len(y) + 1), dtype=np.int32)
    trace_back[0, 1:], trace_back[1:, 0], trace_back[0, 0] = 1, 2, 4
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            left, up = matrix[i, j - 1], matrix[i - 1, j]
            diag = matrix[i - 1, j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            matrix[i, j] = max(left, up, diag)
            trace_back[i, j] = 1 if matrix[i, j] == left else 2 if matrix[i, j] == up else 3
    return trace_back


def authors_refinement_mapper(x: str, y: str, tokenizer, max_len: int = LENGTH):
    """``seq_aligner.get_mapper``: ``(mapper, alphas)``; padding position ``j`` maps to ``j``."""
    x_seq, y_seq = tokenizer.encode(x), tokenizer.encode(y)
    trace_back = global_align(x_seq, y_seq)
    i, j, pairs = len(x_seq), len(y_seq), []
    while i > 0 or j > 0:
        if trace_back[i, j] == 3:
            i, j = i - 1, j - 1
            pairs.append((j, i))
        elif trace_back[i, j] == 1:
            j -= 1
            pairs.append((j, -1))
        elif trace_back[i, j] == 2:
            i -= 1
        else:
            break
    mapper_base = torch.tensor(pairs[::-1], dtype=torch.int64)
    alphas = torch.ones(max_len)
    alphas[:mapper_base.shape[0]] = mapper_base[:, 1].ne(-1).float()
    mapper = torch.zeros(max_len, dtype=torch.int64)
    mapper[:mapper_base.shape[0]] = mapper_base[:, 1]
    mapper[mapper_base.shape[0]:] = len(y_seq) + torch.arange(max_len - len(y_seq))
    return mapper, alphas


def authors_cross_alpha(prompts, num_steps, cross_replace_steps, tokenizer) -> torch.Tensor:
    """``ptp_utils.get_time_words_attention_alpha``: ``(num_steps + 1, targets, 77)``, window ``int(f * (N + 1))``."""
    if not isinstance(cross_replace_steps, dict):
        cross_replace_steps = {"default_": cross_replace_steps}
    cross_replace_steps = {"default_": (0.0, 1.0), **cross_replace_steps}
    alpha = torch.zeros(num_steps + 1, len(prompts) - 1, LENGTH)

    def update(bounds, prompt_ind, word_inds=None):
        if isinstance(bounds, float):
            bounds = 0, bounds
        start, end = int(bounds[0] * alpha.shape[0]), int(bounds[1] * alpha.shape[0])
        word_inds = torch.arange(LENGTH) if word_inds is None else torch.as_tensor(word_inds)
        alpha[:start, prompt_ind, word_inds] = 0
        alpha[start:end, prompt_ind, word_inds] = 1
        alpha[end:, prompt_ind, word_inds] = 0

    for i in range(len(prompts) - 1):
        update(cross_replace_steps["default_"], i)
    for key, item in cross_replace_steps.items():
        if key != "default_":
            for i in range(1, len(prompts)):
                inds = get_word_inds(prompts[i], key, tokenizer)
                if len(inds):
                    update(item, i - 1, inds)
    return alpha


# ----------------------------------------------- the authors' controllers
class AuthorsReference:
    """``AttentionStore`` + ``AttentionReplace``/``AttentionRefine``/``AttentionReweight`` + ``LocalBlend``.

    Called for every attention layer with ``(batch, heads, tokens, dim)`` query/key/value
    (unconditional rows first, then the conditional rows, source first).
    """

    def __init__(self, tokenizer, prompts, num_steps, mode, cross_steps=0.8, self_steps=0.4, equalizer=None,
                 blend_words=None, substruct_words=None, threshold=0.3, start_blend=0.0, mapper="authors"):
        self.prompts, self.num_steps, self.mode = prompts, num_steps, mode
        self.cross_replace_alpha = authors_cross_alpha(prompts, num_steps, cross_steps, tokenizer)
        if isinstance(self_steps, float):
            self_steps = 0.0, self_steps
        self.num_self_replace = int(num_steps * self_steps[0]), int(num_steps * self_steps[1])
        if mode == "replace":
            in_order = mapper != "authors"
            self.mapper = torch.stack([authors_replacement_mapper(prompts[0], p, tokenizer, in_order=in_order)
                                       for p in prompts[1:]])
        elif mode == "refine":
            pairs = [authors_refinement_mapper(prompts[0], p, tokenizer) for p in prompts[1:]]
            self.mapper = torch.stack([m for m, _ in pairs])
            self.refine_alphas = torch.stack([a for _, a in pairs])[:, None, None, :]
        self.equalizer = None
        if equalizer:
            self.equalizer = torch.ones(len(prompts) - 1, LENGTH)
            for word, value in equalizer.items():
                for t, p in enumerate(prompts[1:]):
                    self.equalizer[t, get_word_inds(p, word, tokenizer)] = value

        def layers(words):
            alpha = torch.zeros(len(prompts), LENGTH)
            for i, p in enumerate(prompts):
                for w in words:
                    alpha[i, get_word_inds(p, w, tokenizer)] = 1
            return alpha

        self.alpha_layers = layers(blend_words) if blend_words else None
        self.substruct_layers = layers(substruct_words) if substruct_words else None
        self.th = threshold
        self.start_blend = int(start_blend * num_steps)
        self.counter = 0
        self.cur_step = 0
        self.step_store, self.attention_store, self.store_steps = [], None, 0

    # AttentionReplace / AttentionRefine / AttentionReweight .replace_cross_attention
    def replace_cross_attention(self, attn_base, att_replace):
        if self.mode == "replace":
            out = torch.einsum("hpw,bwn->bhpn", attn_base, self.mapper)
        elif self.mode == "refine":
            out = attn_base[:, :, self.mapper].permute(2, 0, 1, 3)
            out = out * self.refine_alphas + att_replace * (1 - self.refine_alphas)
        else:
            out = attn_base[None].expand_as(att_replace)
        if self.equalizer is not None:
            out = out * self.equalizer[:, None, None, :]
        return out

    def __call__(self, processor, query, key, value, attention_mask=None):
        scores = query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5
        attn = (scores if attention_mask is None else scores + attention_mask).softmax(-1)
        cond = attn[-len(self.prompts):]  # a view: the edits below write into `attn`
        is_cross = processor.is_cross_attention
        if is_cross and cond.shape[2] == LATENT * LATENT:  # AttentionStore: the 16x16 cross layers
            self.step_store.append(cond)  # a view, stored before the in-place edit
        if is_cross or self.num_self_replace[0] <= self.cur_step < self.num_self_replace[1]:
            attn_base, attn_replace = cond[0], cond[1:]
            if is_cross:
                alpha_words = self.cross_replace_alpha[self.cur_step][:, None, None, :]
                new = self.replace_cross_attention(attn_base, attn_replace) * alpha_words \
                    + (1 - alpha_words) * attn_replace
            elif attn_replace.shape[2] <= 16 ** 2:
                new = attn_base[None].expand_as(attn_replace)
            else:
                new = attn_replace
            cond[1:] = new
        return attn @ value

    def step_callback(self, x_t):
        # AttentionStore.between_steps: sum the step's maps (mean over layers and heads) into the store
        step = torch.stack([a.mean(1) for a in self.step_store]).mean(0)  # (prompts, tokens, 77)
        self.attention_store = step if self.attention_store is None else self.attention_store + step
        self.store_steps += 1
        self.step_store = []
        if self.alpha_layers is not None:
            x_t = self.local_blend(x_t)
        self.cur_step += 1
        return x_t

    def get_mask(self, maps, alpha, use_pool, size):
        maps = (maps * alpha[:, None, :]).sum(-1).reshape(len(self.prompts), 1, LATENT, LATENT)
        if use_pool:
            maps = F.max_pool2d(maps, (3, 3), (1, 1), padding=(1, 1))
        mask = F.interpolate(maps, size=size)
        mask = mask / mask.max(2, keepdim=True)[0].max(3, keepdim=True)[0]
        mask = mask.gt(self.th)
        return mask[:1] | mask

    def local_blend(self, x_t):
        self.counter += 1
        if self.counter > self.start_blend:
            maps = self.attention_store
            mask = self.get_mask(maps, self.alpha_layers, True, x_t.shape[2:])
            if self.substruct_layers is not None:
                mask = mask & ~self.get_mask(maps, self.substruct_layers, False, x_t.shape[2:])
            x_t = x_t[:1] + mask.float() * (x_t - x_t[:1])
        return x_t

    def attention_maps(self):
        """The store averaged over steps (and layers, heads): ``(prompts, h, w, 77)``."""
        return (self.attention_store / self.store_steps).reshape(len(self.prompts), LATENT, LATENT, LENGTH)


# ---------------------------------------------------------------- cases
CASES = {
    "replace-9": (dict(target_prompt="a red dog on the beach", mode="replace", num_inference_steps=9), {}),
    "replace-words-25": (dict(target_prompt="a red dog on the beach", mode="replace", num_inference_steps=25,
                              weights={"dog": 2.0}, word_cross_steps={"dog": (0.2, 0.6)}, cross_steps=0.7,
                              self_steps=(0.1, 0.5)), {}),
    "refine-9": (dict(target_prompt="a big red cat on the snowy beach", mode="refine", num_inference_steps=9), {}),
    "reweight-25": (dict(mode="reweight", weights={"beach": 3.0}, num_inference_steps=25, cross_steps=(0.25, 1.0)),
                    {}),
    "replace-blend-9": (dict(target_prompt="a red dog on the beach", mode="replace", num_inference_steps=9,
                             blend_words=["cat", "dog"], blend_threshold=0.93), {}),
    "replace-blend-start-exclude-25": (dict(target_prompt="a red dog on the beach", mode="replace",
                                            num_inference_steps=25, blend_words=["cat", "dog"],
                                            blend_exclude=["beach"], blend_start=0.3, blend_threshold=0.93), {}),
    "replace-token-count-9": (dict(target_prompt="a red zebu on the beach", mode="replace", num_inference_steps=9),
                              dict(mapper="in-order")),
}


def reference_kwargs(tokenizer, edit, extra):
    target = edit.get("target_prompt", SOURCE)
    cross = edit.get("cross_steps", 0.8)
    if edit.get("word_cross_steps"):
        cross = {"default_": cross if isinstance(cross, tuple) else (0.0, cross), **edit["word_cross_steps"]}
    return dict(tokenizer=tokenizer, prompts=[SOURCE, target], num_steps=edit["num_inference_steps"],
                mode=edit["mode"], cross_steps=cross, self_steps=edit.get("self_steps", 0.4),
                equalizer=edit.get("weights"), blend_words=edit.get("blend_words"),
                substruct_words=edit.get("blend_exclude"), threshold=edit.get("blend_threshold", 0.3),
                start_blend=edit.get("blend_start", 0.0), **extra)


@pytest.fixture
def noise():
    return torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("name", list(CASES))
def test_matches_the_authors_controllers(p2p_pipe, noise, name, monkeypatch):
    edit, extra = CASES[name]
    kw = dict(source_prompt=SOURCE, latents=noise, output_type="latent", self_res=16, map_res=16, **edit)
    ours = p2p_pipe(**kw)
    ref = AuthorsReference(**reference_kwargs(p2p_pipe.tokenizer, edit, extra))
    with monkeypatch.context() as m:
        m.setattr(PromptToPromptController, "probs_rows", lambda ctl, layer, rows: 0)
        m.setattr(PromptToPromptController, "edit_attention", lambda ctl, layer, q, k, v, mask, attend: ref(
            SimpleNamespace(is_cross_attention=layer.is_cross), q, k, v, mask))
        m.setattr(PromptToPromptController, "end_step", lambda ctl, latents: ref.step_callback(latents))
        m.setattr(PromptToPromptController, "attention_maps", lambda ctl: ref.attention_maps())
        theirs = p2p_pipe(**kw)
    assert ref.cur_step == edit["num_inference_steps"]
    assert (ours.images - theirs.images).abs().max().item() <= 1e-4
    assert torch.allclose(ours.attention_maps, theirs.attention_maps, atol=1e-4)
    if "blend_words" in edit:  # the blend did something but not everything
        mask = ours.blend_mask
        assert mask is not None and 0 < mask.float().mean() < 1


def test_different_token_count_replacement_differs_from_authors_mapper(p2p_pipe):
    """The authors' ``mapper[j, j]`` after a swapped word of another token count: ours maps in order."""
    from imageprompt.p2p import replacement_mapper

    tok = p2p_pipe.tokenizer
    target = "a red zebu on the beach"
    zebu = _place_inds(target, 2, tok)
    assert len(zebu) > 1
    on_target = _place_inds(target, 3, tok)[0]
    on_source = _place_inds(SOURCE, 3, tok)[0]
    authors = authors_replacement_mapper(SOURCE, target, tok)
    assert authors[on_target, on_target] == 1 and authors[on_source, on_target] == 0  # reads "the", not "on"
    ours = replacement_mapper(tok, SOURCE, target, LENGTH)
    assert ours[on_source, on_target] == 1
    assert torch.equal(ours, authors_replacement_mapper(SOURCE, target, tok, in_order=True))


def test_step_windows_are_the_authors(p2p_pipe):
    """Nine steps at f = 0.8: the authors edit ``int(0.8 * 10) = 8`` steps (``int(0.8 * 9) = 7`` would be 7)."""
    alpha = authors_cross_alpha([SOURCE, SOURCE], 9, 0.8, p2p_pipe.tokenizer)
    assert alpha[:9, 0, 0].tolist() == [1] * 8 + [0]
    ctl = PromptToPromptController(p2p_pipe.tokenizer, SOURCE, "a red dog on the beach", cross_steps=0.8)
    ctl.setup(9, (LATENT, LATENT))
    assert torch.equal(ctl.alphas[:, 0], alpha[:9, 0])
