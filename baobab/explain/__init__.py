"""Interpretability: why a model said what it said (``baobab explain``, ``/v1/explain``).

Built on Captum (integrated gradients, gradient × input, occlusion, Grad-CAM) and forward
hooks around the finished model: nothing in ``baobab/models`` knows about explanations.
"""

from baobab.explain.api import check_methods, explain, family_name, planned_units, text_work
from baobab.explain.types import (
    METHODS,
    AttentionMaps,
    Attribution,
    ExplainError,
    Explanation,
    FeatureExplanation,
    ImageExplanation,
    InputItem,
    LogitLens,
    TextExplanation,
    TokenStep,
    to_json,
)

__all__ = [
    "METHODS",
    "AttentionMaps",
    "Attribution",
    "ExplainError",
    "Explanation",
    "FeatureExplanation",
    "ImageExplanation",
    "InputItem",
    "LogitLens",
    "TextExplanation",
    "TokenStep",
    "check_methods",
    "explain",
    "family_name",
    "planned_units",
    "text_work",
    "to_json",
]
