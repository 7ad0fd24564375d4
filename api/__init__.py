"""The REST API: accounts and transfers."""
