"""The object store of one target: objects as files under its data directory."""
