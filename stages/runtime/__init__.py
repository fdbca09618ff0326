"""Ground floor of stages/: devices, stop signals and progress, used by every stage and by flows."""
