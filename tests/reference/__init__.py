"""Independent reference implementations used to check the engine's numerics."""
