"""Shared by the API, the relay and the worker: settings, database, models, domain rules."""
