"""Helpers of the evaluate stage: token-loss dynamics, report and plots."""
