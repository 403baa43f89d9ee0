"""Test and demo helpers: a real Mosquitto, an MQTT probe, the real data."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
