#!/bin/sh
# Run by the postgres image once, when it initialises an empty data directory (docker-compose.yml
# mounts this folder on /docker-entrypoint-initdb.d). Creates the role the service connects as:
# a login without superuser, database-creation or role-creation rights, member of outbox_app,
# which migration 0003 grants exactly the service's privileges on its tables.
# For a database that already exists, run the same two statements once by hand (README, Security).
set -eu
: "${SERVICE_DB_USER:?}" "${SERVICE_DB_PASSWORD:?}"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  --set=service_user="$SERVICE_DB_USER" --set=service_password="$SERVICE_DB_PASSWORD" <<'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'outbox_app') THEN CREATE ROLE outbox_app NOLOGIN; END IF;
END $$;
CREATE ROLE :"service_user" LOGIN PASSWORD :'service_password' NOSUPERUSER NOCREATEDB NOCREATEROLE IN ROLE outbox_app;
SQL
