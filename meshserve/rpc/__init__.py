"""One gRPC process for every meshserve server: the lifecycle (`process`) and the interceptor that
maps the error tree to statuses, spans and metrics (`interceptor`)."""
