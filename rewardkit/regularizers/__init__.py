"""Regularizer plugins: the base protocol and the built-in techniques."""

from rewardkit.regularizers.base import Regularizer

__all__ = ["Regularizer"]
