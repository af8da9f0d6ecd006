"""MLflow: the store, runs and their tags, runs whose process died, the UI view, dataset inputs."""
