"""Index structures over ASQ codes."""
