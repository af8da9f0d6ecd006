"""The model: the embedded default, local and Hub loading, random-init shapes, checks of a model directory."""
