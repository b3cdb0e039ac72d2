"""Test-wide settings: never touch the Hugging Face Hub, keep threads modest."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

pytest_plugins = ["tests.hub_fixtures"]  # the `fake_hub` fixture (imported after the settings above)
