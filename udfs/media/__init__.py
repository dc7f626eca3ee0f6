"""Reading and writing video media: probe, decode/encode helpers, the one-pass
clip transcoder and WebP previews."""
