"""The HTTP gateway: authenticates, validates and publishes events to Kafka; 202 only after the ack."""
