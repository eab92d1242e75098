"""The job queue on NATS JetStream: where it is, its stream and bucket, and the records in them."""
