"""PyTorch / transformers reference computations used by the tests (torch is a test-only dependency)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch


def hf_positions(mask: np.ndarray) -> np.ndarray:
    """HF generate's position ids for left-padded rows: cumsum(mask) - 1, clipped at 0."""
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0)


def text_decoder(model):
    """The decoder stack (.layers, .norm) of a causal LM, or of the language model of a multimodal one
    (Gemma3ForConditionalGeneration: model.model.language_model)."""
    return getattr(model.model, "language_model", model.model)


@contextlib.contextmanager
def hf_steering_hook(model, layer: int, vector, alpha: float, position_mask: np.ndarray):
    """Forward-pre-hook adding alpha * v at the masked positions (B, T) to the input of block `layer`
    (or of the final norm when layer == L), the way steering libraries hook HF models."""
    decoder = text_decoder(model)
    target = decoder.layers[layer] if layer < len(decoder.layers) else decoder.norm

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        v = torch.as_tensor(np.asarray(vector), dtype=hidden.dtype)
        m = torch.as_tensor(position_mask, dtype=hidden.dtype)[..., None]
        hidden = hidden + alpha * m * v
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = target.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def hf_forward(model, ids: np.ndarray, mask: np.ndarray | None = None):
    """(logits (B, T, V), hidden tuple of L + 1 (B, T, d), final-norm input (B, T, d)) as numpy."""
    mask = np.ones_like(ids) if mask is None else mask
    captured = {}
    handle = text_decoder(model).norm.register_forward_pre_hook(lambda m, args: captured.setdefault("h_L", args[0]))
    try:
        with torch.no_grad():
            out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                        attention_mask=torch.as_tensor(mask, dtype=torch.long),
                        position_ids=torch.as_tensor(hf_positions(mask), dtype=torch.long),
                        output_hidden_states=True)
    finally:
        handle.remove()
    return (out.logits.numpy(), [h.numpy() for h in out.hidden_states], captured["h_L"].numpy())


@contextlib.contextmanager
def hf_output_hook(model, block: int, vector):
    """Forward hook adding v at every position to the OUTPUT of decoder block `block` (its first element when the
    block returns a tuple), the way repeng's ControlModule and steering-vectors' decoder_block hook do."""
    target = text_decoder(model).layers[block]

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden + torch.as_tensor(np.array(vector), dtype=hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = target.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
