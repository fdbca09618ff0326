"""Stage implementations: plain Python + torch, no prefect."""
