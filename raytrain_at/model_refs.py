"""MODEL_REF: the one way commands name a model.

A reference is a model file (``model.safetensors`` with its spec), a folder holding one (a
training checkpoint), ``runs:/RUN_ID/model`` (a training run's final weights in MLflow) or
``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` (the registry) or ``run:EXPERIMENT/RUN_NAME``
(the latest run of that name's model: how an adversarial recipe names its clean pre-training,
whose ``model`` is already the selected epoch). Every form ends in the same
safetensors file and is rebuilt through the timm registry, never by unpickling.
"""

from __future__ import annotations


import torch
import torch.nn as nn

from raytrain_at.models.locate import local_model_file
from raytrain_at.models.model_files import LoadedModel, load_model_file

__all__ = ["load_model", "local_model_file", "resolve_model"]


def resolve_model(reference: str, *, resolution: int | None = None,
                  device: str | torch.device = "cpu",
                  tracking_uri: str | None = None) -> LoadedModel:
    """The model ``reference`` names, in eval mode on ``device``, with its spec and hash."""
    path = local_model_file(reference, tracking_uri)
    return load_model_file(path, reference=reference, resolution=resolution, device=device)


def load_model(reference: str, *, resolution: int | None = None,
               device: str | torch.device = "cpu", tracking_uri: str | None = None) -> nn.Module:
    """The module ``reference`` names, ready for evaluation (eval mode, [0, 1] inputs).

    Example:
        >>> model = raytrain_at.load_model("models:/convnext-tiny-cvst@champion-linf")
    """
    return resolve_model(reference, resolution=resolution, device=device,
                         tracking_uri=tracking_uri).module
