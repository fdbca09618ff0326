"""The one train loop and its parts: run state, optimiser and schedule, data order, RNG, devices."""
