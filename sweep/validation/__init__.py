"""Checks of a config before anything loads: field ranges, method capabilities, the model's shapes."""
