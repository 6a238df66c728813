"""The base layer: the one exception class, registries, the frames' column names and the
activation catalogue. Everything else imports it; it imports nothing of flowscope."""
