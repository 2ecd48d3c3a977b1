"""CatTube against NATS JetStream, Redis Streams and RabbitMQ on the peers' own benchmark (issue 14).

    .venv/bin/python -m bench.peers [--systems ...] [--modes one,batch,c16] [--events 20000] [--runs 3]

N events of 1 KiB JSON go from one producer process to one consumer process, publish → deliver → ack,
each system through its own Python client. The end-to-end rate is delivered ÷ (last ack − first
publish); latency is from the publish call to the consumer's receipt; the server's CPU time per event
is read from /proc around each run. Every server is started here on free loopback ports in a temporary
directory and stopped by pid at the end. See bench/README.md, "Against NATS, Redis and RabbitMQ".
"""
