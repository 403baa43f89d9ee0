"""The edge-spooler: spool intake, the SQLite outbox, the MQTT publisher."""
