"""The run of one grid point (load → calibrate → quantize → measure → log) and the sweep around it."""
