"""Errors steerjax raises on bad input: one class per kind of problem, all `ValueError`s."""


class SteerjaxError(ValueError):
    """Base class: a message that names the problem and, where possible, the fix."""


class ModelNotFoundError(SteerjaxError, FileNotFoundError):
    """The model spec names no folder, file or locally cached model id."""


class UnsupportedModelError(SteerjaxError):
    """The checkpoint's architecture (model_type, rope scaling, ...) is not implemented."""


class WeightError(SteerjaxError):
    """Weight tensors are missing, corrupt or of the wrong shape."""


class SteeringError(SteerjaxError):
    """A steering intervention is invalid for this model (layer, vector shape, non-finite values)."""


class InputError(SteerjaxError):
    """Token ids, masks or prompts are malformed."""


class NonFiniteError(SteerjaxError):
    """A computation produced inf or NaN (e.g. a float16 model whose activations overflow)."""
