"""Tracking: MLflow runs and experiments; nothing of models (``raytrain_at.model_refs`` joins the
two, ``raytrain_at.registry`` keeps registered versions)."""
