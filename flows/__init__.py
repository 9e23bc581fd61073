"""Prefect flows and tasks of the LOIRE pipeline: thin adapters over `loire` plus MLflow and S3 I/O."""
