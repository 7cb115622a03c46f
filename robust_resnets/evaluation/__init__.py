"""Robustness evaluation, its results files and leaderboards (nothing here loads at package import)."""
from .evaluate import AttackResult, EvaluationResult, GradientMaskingWarning, evaluate

__all__ = ['evaluate', 'EvaluationResult', 'AttackResult', 'GradientMaskingWarning']
