"""What the tests share besides fixtures: real servers and processes, the environment they get,
database and outbox helpers, and waiting for conditions. conftest.py files hold fixtures only
and import from here; no test imports a conftest."""
