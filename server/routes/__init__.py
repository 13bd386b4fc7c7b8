"""HTTP routes: thin handlers over the service."""
