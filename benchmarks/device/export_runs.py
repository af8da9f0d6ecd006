"""Dump every run of an MLflow store (params, metrics, tags) to one CSV, for docs/benchmarks.md tables."""
import sys

import mlflow
import pandas as pd

out = sys.argv[1]
client = mlflow.MlflowClient()
experiments = client.search_experiments()
frames = [mlflow.search_runs(experiment_ids=[e.experiment_id]) for e in experiments]
frames = [f.assign(experiment=e.name) for f, e in zip(frames, experiments) if len(f)]
table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
table.to_csv(out, index=False)
print(f"{len(table)} runs -> {out}")
