"""What the ingest and the workers share: settings, schemas, the database model, the queue."""
