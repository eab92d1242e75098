"""One gRPC process for every meshserve server: the lifecycle (`process`), the interceptor that
maps the error tree to statuses, spans and metrics (`interceptor`), and the keepalive and
connection options of every channel and server (`channel_options`)."""
