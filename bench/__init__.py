"""`make bench`: the service measured against baselines run on the same machine in the same run."""
