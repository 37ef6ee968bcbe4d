"""Declarative task specs (JSON data, not code), shipped as `lorahub_compeft.tasks`."""
