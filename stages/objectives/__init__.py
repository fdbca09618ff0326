"""Training objectives: one protocol (base.py) and composable parts (token selection, prediction heads)."""
