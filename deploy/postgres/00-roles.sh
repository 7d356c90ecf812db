#!/bin/bash
# First start of the PostgreSQL container: the application's and Airflow's own roles and
# databases. The superuser (POSTGRES_USER) is for administration only; the services log in
# as these roles, which own their database and nothing else.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v app_user="$OPENSUBJECT_DB_USER" -v app_password="$OPENSUBJECT_DB_PASSWORD" \
     -v af_user="$AIRFLOW_DB_USER" -v af_password="$AIRFLOW_DB_PASSWORD" \
     -v events_password="$OPENSUBJECT_EVENTS_DB_PASSWORD" <<'SQL'
CREATE ROLE :"app_user" LOGIN PASSWORD :'app_password';
CREATE DATABASE opensubject OWNER :"app_user";
REVOKE ALL ON DATABASE opensubject FROM PUBLIC;
CREATE ROLE :"af_user" LOGIN PASSWORD :'af_password';
CREATE DATABASE airflow OWNER :"af_user";
REVOKE ALL ON DATABASE airflow FROM PUBLIC;
-- MinIO's bucket-notification target: appends to store_events, nothing else (the grant on
-- the table is in sql/007_listing_and_events.sql).
CREATE ROLE opensubject_events LOGIN PASSWORD :'events_password';
GRANT CONNECT ON DATABASE opensubject TO opensubject_events;
SQL
