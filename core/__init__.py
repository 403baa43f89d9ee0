"""The core-collector: MQTT subscriber, datastores, receipts, its CLI."""
