"""raytrain_at: adversarially robust ImageNet classifiers trained at cluster scale.

Importing the package registers the project's models with timm (``convnext_tiny_cvst`` ...).
"""

from raytrain_at import models  # noqa: F401 - registers the timm models
from raytrain_at.errors import UserError
from raytrain_at.model_refs import load_model
from raytrain_at.models import create_robust_model

__version__ = "0.1.0"
__all__ = ["UserError", "create_robust_model", "load_model", "__version__"]
