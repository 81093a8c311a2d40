"""Packaging: the model card (jinja2 + matplotlib plots) rendered from a pipeline report, and the Hub upload."""

from .card import card_metadata, render_card
from .hub import PushResult, push_to_hub

__all__ = ["card_metadata", "render_card", "PushResult", "push_to_hub"]
