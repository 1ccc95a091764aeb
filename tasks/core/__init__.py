"""What every stage shares: config models, the stage protocol (fingerprints, manifests), unit
directories, storage mirroring, MLflow locations, and the thin Prefect task layer (`prefect_stage`)."""
