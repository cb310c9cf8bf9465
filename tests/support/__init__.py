"""Helpers shared by test modules (model builders, runners, comparisons)."""
