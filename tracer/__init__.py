"""tracer: which pretraining examples made the model say this? (TrackStar in JAX)."""

from tracer.correction import second_moment
from tracer.encoder import GradientEncoder, fit_preconditioner, unit_normalize
from tracer.errors import InputError
from tracer.hessian import Preconditioner

__version__ = "0.1.0"

__all__ = ["GradientEncoder", "InputError", "Preconditioner", "fit_preconditioner",
           "second_moment", "unit_normalize", "__version__"]
