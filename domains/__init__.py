"""Built-in domains, registered through the ``foundation.domains`` entry-point group (see pyproject.toml)."""
