#!/bin/sh
# First start of the compose PostgreSQL: one database each for Prefect and MLflow (both keep an
# `alembic_version` table, so they cannot share one).
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres <<SQL
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
SQL
