"""steerjax: exact Jacobian geometry of activation steering in transformer LMs (JAX / Flax)."""

from steerjax.errors import (InputError, ModelNotFoundError, NonFiniteError, SteeringError, SteerjaxError,
                             UnsupportedModelError, WeightError)
from steerjax.model import ForwardOutput, LanguageModel, TokenBatch, load_model
from steerjax.jacobian import JacobianOperator, jacobian, jacobian_operator
from steerjax.extraction import extract_vector
from steerjax.generation import GenerationOutput, generate, generated_texts
from steerjax.model import load_sharded, shard_model
from steerjax.sharding import make_mesh
from steerjax.version import __version__
from steerjax.models.config import ModelConfig
from steerjax.steering import POSITION_MODES, Steer
from steerjax.strength import calibrate_alpha, layer_profile, steering_kl
from steerjax.control_vectors import (export_control_vector, export_steering_vectors, import_control_vector,
                                      import_steering_vectors, peer_layer_from_steerjax, steerjax_layer_from_peer)


__all__ = [
    "ForwardOutput", "extract_vector", "GenerationOutput", "generate", "generated_texts", "InputError",
    "JacobianOperator", "jacobian", "jacobian_operator", "LanguageModel", "ModelConfig", "ModelNotFoundError",
    "NonFiniteError", "POSITION_MODES",
    "Steer", "SteeringError", "SteerjaxError", "TokenBatch", "UnsupportedModelError", "WeightError",
    "load_model", "load_sharded", "make_mesh", "shard_model", "__version__",
    "export_control_vector", "export_steering_vectors", "import_control_vector", "import_steering_vectors",
    "peer_layer_from_steerjax", "steerjax_layer_from_peer", "calibrate_alpha", "layer_profile", "steering_kl",
]
