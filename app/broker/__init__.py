"""Events between databases over NATS JetStream (issue 15): the stream layout (stream.py), the
outbox rows a pseudo-subscriber publishes (publisher.py), the durable consumers that apply them
with the inbox on the other side (consumer.py), and the `nats-server` command line (server.py).
Nothing here is imported unless SWITCHBOARD_NATS_URL is set or `switchboard broker` runs."""
