"""Edge-to-cloud transport, cloud side: the ingest stream, shards, control and auth."""
