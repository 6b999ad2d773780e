"""Figures: each reads tables the pipeline wrote and never recomputes a metric."""
