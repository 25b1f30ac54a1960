"""Rotary position embedding, applied the way megatron-core's unfused path does (``[s, b, n, d]``,
freqs ``[s, 1, 1, rot_dim]``, halves rotated, dims past ``rot_dim`` passed through).

Why our own: megatron computes ``cos(freqs)`` and ``sin(freqs)`` inside every layer, and under
torch.compile inductor fuses them into the elementwise kernel that applies them, so every element
of q and k pays a sine and a cosine (about a third of a layer's elementwise time on CPU). Here the
tables come from an opaque op, so they are computed once per call at table size and read from
memory. Megatron reaches this function through its own extension point for a fused RoPE
(``apply_rope_fusion``, see ``install``).
"""
from __future__ import annotations

import torch


@torch.library.custom_op("fractal::rope_cos_sin", mutates_args=())
def rope_cos_sin(freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of the angle table; opaque to inductor so it is never fused into a consumer."""
    return freqs.cos(), freqs.sin()


@rope_cos_sin.register_fake
def _(freqs):
    return torch.empty_like(freqs), torch.empty_like(freqs)


def _rotate_half(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if not interleaved:
        x1, x2 = torch.chunk(x, 2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rotary_reference(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """``t [s, b, n, d]``, ``freqs [s, 1, 1, rot_dim]`` (angles) -> t rotated on its first
    ``rot_dim`` channels: ``t * cos + rotate_half(t) * sin``."""
    rot_dim = freqs.shape[-1]
    t_rot, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    cos, sin = rope_cos_sin(freqs)
    out = t_rot * cos.to(t.dtype) + _rotate_half(t_rot, interleaved) * sin.to(t.dtype)
    return out if t_pass.shape[-1] == 0 else torch.cat((out, t_pass), dim=-1)


def apply_rotary(t: torch.Tensor, freqs: torch.Tensor, transpose_output_memory: bool = False,
                 interleaved: bool = False) -> torch.Tensor:
    """Dispatcher with TransformerEngine's ``fused_apply_rotary_pos_emb`` signature, the one
    megatron calls when ``apply_rope_fusion`` is set (``transpose_output_memory`` is a TE layout
    hint with no effect on values)."""
    return rotary_reference(t, freqs, interleaved)


def install() -> None:
    """Make megatron's ``apply_rope_fusion=True`` path call ``apply_rotary``, unless
    TransformerEngine already provides its fused kernel there (kept: it is the faster one)."""
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = apply_rotary
