"""The ingest: a Flask app that verifies, records, queues and acknowledges Dodo deliveries."""

from ingest.app import create_app

__all__ = ["create_app"]
