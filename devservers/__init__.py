"""Finding or starting PostgreSQL and Redis for development and tests (never used in production)."""
